"""The fitted template as one ``nn.Module``: the fused golden part and its tolerance map as buffers.

The buffers are the reference surface (``reference_points``, ``reference_normals``) and, per
reference point, the tolerance map (``tolerance_offset``, ``tolerance_spread``, ``visibility``);
their names are the artifact's tensor names, so saved models still load, and ``.to(device)`` /
``state_dict()`` come free. They are held in float64 (the precision fit computes them in; an
artifact stores float32). What the model computes is only what needs the fitted state: a
registered part's tolerance-normalized deviation (:meth:`TemplateModel.deviation`) and the
missing-material score its points take (:meth:`TemplateModel.missing`). Both run on the CPU
(scipy's KD-tree). The scorer (``workers.template.scorer``) fits, registers, smooths and scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from workers.template.reference import face_offsets, signed_deviation

KEYS = ("reference_points", "reference_normals", "tolerance_offset", "tolerance_spread", "visibility")
MIN_REFERENCE_POINTS = 10


class TemplateModel(nn.Module):
    """The fused reference surface (points, normals) with its offset, spread and visibility per point."""

    reference_points: torch.Tensor
    reference_normals: torch.Tensor
    tolerance_offset: torch.Tensor
    """Mean signed deviation of good parts at each reference point."""
    tolerance_spread: torch.Tensor
    """Tolerance: standard deviation of the signed deviation (floored), > 0."""
    visibility: torch.Tensor
    """Fraction of good parts with a point within the cover distance of each reference point."""

    def __init__(self, points: np.ndarray, normals: np.ndarray, offset: np.ndarray, spread: np.ndarray,
                 visibility: np.ndarray) -> None:
        super().__init__()
        for key, value in zip(KEYS, (points, normals, offset, spread, visibility), strict=True):
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))
        self._tree: tuple[torch.Tensor, cKDTree] | None = None

    def array(self, key: str) -> np.ndarray:
        """Buffer ``key`` as a float64 host array (a view when the model is on the CPU)."""
        return getattr(self, key).detach().cpu().numpy()

    @property
    def tree(self) -> cKDTree:
        """KD-tree of the reference points (built once per points tensor)."""
        if self._tree is None or self._tree[0] is not self.reference_points:
            self._tree = (self.reference_points, cKDTree(self.array("reference_points")))
        return self._tree[1]

    def deviation(self, moved: np.ndarray, voxel_size: float, faces: np.ndarray | None = None,
                  face_shrink: float = 0.0, nearest: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Per registered part point: its signed deviation from the nearest reference point, less
        that point's good offset and, with ``faces`` (a face label per reference point), less its
        face's shift in this part (``reference.face_offsets``); or its distance beyond one voxel,
        if larger; in tolerances. ``nearest``: registration's bounded nearest-point answer
        (``reference.signed_deviation``), which spares most of the search."""
        signed, dist, j = signed_deviation(moved, self.array("reference_points"), self.array("reference_normals"),
                                           self.tree, nearest)
        if faces is not None:
            signed = signed - face_offsets(faces[j], signed, face_shrink)
        return np.maximum(np.abs(signed - self.array("tolerance_offset")[j]), dist - voxel_size) / \
            self.array("tolerance_spread")[j]

    def missing(self, part_tree: cKDTree, missing_dist: float, min_visibility: float, rims: Sequence[int],
                pose: np.ndarray | None = None, covered: np.ndarray | None = None) -> np.ndarray:
        """Per rim size k in ``rims`` and per part point (of ``part_tree``'s points), a row of the
        largest gap score of a reference point the good parts cover (visibility >=
        ``min_visibility``) with no part point within ``missing_dist``, taken by the k part points
        nearest that reference point (0 elsewhere; k = 0: a row of zeros): one search serves every
        rim (``len(rims)``×N). ``pose`` (4×4) takes the tree's points onto the reference (registration's
        transform): the reference points are moved into the part's frame by its inverse, so the
        part's own KD-tree, built once per cloud, serves (None: the tree is of registered points).

        ``covered`` (bool per reference point): points already known to have a part point within
        ``missing_dist`` (the nearest reference point of a part point that near, from
        registration's query), which need no search. The others are searched with
        ``missing_dist`` as the bound (a bounded search stops early); only the few beyond it are
        searched again for their rim."""
        seen = self.array("visibility") >= min_visibility
        if covered is not None:
            seen &= ~covered
        ref_seen = self.array("reference_points")[seen]
        if pose is not None:
            ref_seen = (ref_seen - pose[:3, 3]) @ pose[:3, :3]
        gap, _ = part_tree.query(ref_seen, distance_upper_bound=missing_dist, workers=1)
        miss = ~np.isfinite(gap)
        out = np.zeros((len(rims), part_tree.n))
        if miss.any():
            kk = min(max(max(rims), 1), part_tree.n)
            d_rim, rim = part_tree.query(ref_seen[miss], k=kk, workers=1)
            d_rim, rim = d_rim.reshape(-1, kk), rim.reshape(-1, kk)
            gap_score = (d_rim[:, 0] - missing_dist) / self.array("tolerance_spread")[seen][miss]
            for row, k in zip(out, rims, strict=True):  # one pass per rim size, vectorized over points
                if k > 0:
                    k = min(k, kk)
                    np.maximum.at(row, rim[:, :k].ravel(), np.repeat(gap_score, k))
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        """The artifact's tensors: ``state_dict()`` on the host, in float32."""
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> TemplateModel:
        """Rebuild a fitted model from :meth:`tensors`, refusing missing, inconsistent or non-finite arrays."""
        missing = [k for k in KEYS if k not in t]
        if missing:
            raise ValueError(f"template state lacks {missing}")
        pts = np.asarray(t["reference_points"], dtype=np.float64)
        n = len(pts)
        if pts.ndim != 2 or pts.shape[1] != 3 or n < MIN_REFERENCE_POINTS or any(len(t[k]) != n for k in KEYS):
            raise ValueError("template state: reference arrays have inconsistent shapes")
        if not all(np.isfinite(np.asarray(t[k])).all() for k in KEYS):
            raise ValueError("template state holds non-finite values")
        if (np.asarray(t["tolerance_spread"]) <= 0).any():
            raise ValueError("template state: tolerance spread must be positive")
        return cls(*(np.asarray(t[k], dtype=np.float64) for k in KEYS)).eval()
