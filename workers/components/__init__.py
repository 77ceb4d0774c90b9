"""Shared building blocks of the scorers, one implementation each behind a public API.

* :mod:`workers.components.fpfh`: FPFH descriptors (open3d on a CPU, torch on any device);
* :mod:`workers.components.memory_bank`: PatchCore's greedy coreset and exact memory-bank search
  with PatchCore's reweighting (:class:`MemoryBank`);
* :mod:`workers.components.knn`: exact k nearest neighbours for numpy arrays (scipy KD-tree) and
  torch tensors (``workers.geometry.knn``);
* :mod:`workers.components.registration`: rigid registration, global (PCA-axes hypotheses,
  batched coarse ICP) then point-to-plane ICP refinement.

Scorers import these rather than each other's internals.
"""
