"""Exact k nearest neighbours, for numpy arrays and torch tensors alike: the one kNN of the scorers.

On a CPU, scipy's C++ KD-tree (the fastest exact search there: for CPU tensors too, which are
searched through a zero-copy numpy view and answered as tensors); on a GPU,
``workers.geometry.knn`` (grid + brute force) on the tensors' device. Both return what
``cKDTree(ref).query(query, k)`` returns, as 2-D arrays (tensors for tensors) even for ``k == 1``;
only exact distance ties may order differently between the two.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from workers import geometry


def knn(ref: np.ndarray | torch.Tensor | cKDTree, query: np.ndarray | torch.Tensor, k: int,
        workers: int = 1) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """``(distances, indices)`` (Q×k, ascending) of the ``k`` points of ``ref`` nearest each query.

    ``ref`` may be a KD-tree already built (a set searched many times). ``k`` is capped at the
    number of reference points. ``workers`` is scipy's thread count (numpy path only).
    """
    if isinstance(ref, cKDTree):
        kk = int(min(max(k, 1), ref.n))
        d, i = ref.query(np.asarray(query, dtype=np.float64), k=kk, workers=workers)
        return np.asarray(d).reshape(-1, kk), np.asarray(i).reshape(-1, kk)
    if isinstance(ref, torch.Tensor) or isinstance(query, torch.Tensor):
        r = torch.as_tensor(ref)
        q = torch.as_tensor(query).to(device=r.device, dtype=r.dtype)
        if r.device.type != "cpu":
            return geometry.knn(r, q, k)
        d, i = knn(r.detach().numpy(), q.detach().numpy(), k, workers)
        return torch.from_numpy(d).to(r.dtype), torch.from_numpy(i).long()
    ref_np = np.asarray(ref, dtype=np.float64)
    kk = int(min(max(k, 1), len(ref_np)))
    d, i = cKDTree(ref_np).query(np.asarray(query, dtype=np.float64), k=kk, workers=workers)
    return np.asarray(d).reshape(-1, kk), np.asarray(i).reshape(-1, kk)


def smooth_over_neighbours(points: np.ndarray, values: np.ndarray, k: int, tree: cKDTree | None = None,
                           neighbours: np.ndarray | None = None) -> np.ndarray:
    """Every value replaced by the mean over its point's ``k`` nearest neighbours (itself included).

    Damps per-point noise of an anomaly map while keeping a defect that spans many points.
    ``k <= 1`` returns ``values`` unchanged. ``tree``: a KD-tree of ``points`` already built;
    ``neighbours``: the points' nearest-neighbour indices already found (M×k' with k' >= ``k``,
    ascending, e.g. ``PreparedCloud.neighbours``), so no search is made.
    """
    k = min(int(k), len(points))
    if k <= 1:
        return np.asarray(values)
    if neighbours is None or neighbours.shape[1] < k:
        _, neighbours = (tree if tree is not None else cKDTree(points)).query(points, k=k)
    return np.asarray(values)[neighbours[:, :k]].mean(axis=1)


def max_over_neighbours(values: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Every value replaced by the largest over its point's neighbours (``neighbours``: M×k indices,
    the point itself included, e.g. ``PreparedCloud.neighbours``): a dilation of an anomaly map,
    which widens a detected region by about one neighbourhood radius and moves no maximum."""
    return np.asarray(values)[neighbours].max(axis=1)
