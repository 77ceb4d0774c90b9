"""The defect-aware head: raise a part's score where it looks like a defect an operator confirmed.

Why: a line's operators confirm defects every day; a good-only model throws that away. Like
Open3D-AD (a few real anomalies added to the normal data), the head keeps a small **defect
bank**: point descriptors taken from confirmed-defect regions. A new part's points that resemble
a bank entry get their anomaly raised; a part with nothing like a confirmed defect is scored nearly as
before, so kinds never confirmed keep the good-only model's behaviour (measured in
docs/results/few-defects.md).

Descriptor of a point (``descriptors``): its FPFH divided by ``fpfh_scale`` and its template
deviation divided by ``template_scale`` (the fused scorer's good-part 99th percentiles of the
patchcore and template point scores), so one unit in either part means "as far as the worst 1 %
of good points", and the local shape (FPFH) and the deviation from the golden part (template)
count alike. Base score ``b``: the fused scorer's point map (template + patchcore, good-normalized).

Bank (``bank_entries``): from each confirmed part, the points of the marked region (the
operator's mask; without one, the ``fallback_fraction`` highest-scoring points) whose base score
is at least ``min_base`` (beyond what good parts show: a descriptor from inside a bulge that
looks like a smooth face would otherwise make every smooth face suspect), at most
``max_per_part`` of them, the highest first. The bank is searched exactly
(``workers.components.memory_bank.MemoryBank``, the patchcore bank's chunked matmul).

Evidence (``evidence``): ``e(x) = b(x)^γ · exp(-d(x)² / (2 r²))`` with ``d`` the descriptor distance
to the nearest bank entry, ``r`` the ``radius`` and γ the ``base_power``, averaged over the point's
``smoothing_k`` spatial neighbours. With γ = 1 a good part's points, whose ``b`` is low, keep ``e``
low whatever they resemble, and a defect's points keep their ``b`` when they resemble a confirmed
defect; γ = 0 is a pure similarity to confirmed defects (it can lift a subtle defect the base
score does not see, and is riskier for good parts that happen to resemble one). The part
gains ``weight × mean of the top top_fraction of e`` on its object score and ``weight × e`` on
its point map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from workers.components.memory_bank import MemoryBank


@dataclass(frozen=True)
class HeadParams:
    """The head's hyper-parameters (chosen on seed 1's validation split, docs/results/few-defects.md)."""

    weight: float = 4.0
    radius: float = 1.0
    base_power: float = 0.0
    min_base: float = 1.0
    max_per_part: int = 64
    fallback_fraction: float = 0.02
    smoothing_k: int = 8
    top_fraction: float = 0.005
    top_min: int = 5

    def __post_init__(self) -> None:
        if self.weight < 0 or self.radius <= 0 or self.max_per_part < 1 or self.base_power < 0:
            raise ValueError("defect head: weight, base_power must be >= 0, radius > 0, max_per_part >= 1")
        if not 0 < self.fallback_fraction <= 1 or not 0 < self.top_fraction <= 1:
            raise ValueError("defect head: fallback_fraction and top_fraction must be in (0, 1]")


def descriptors(fpfh: np.ndarray, template_points: np.ndarray, fpfh_scale: float, template_scale: float) -> np.ndarray:
    """Per-point descriptors (M × (F+1) float32): FPFH / fpfh_scale and template deviation / template_scale."""
    f = np.asarray(fpfh, np.float32) / np.float32(fpfh_scale)
    t = np.asarray(template_points, np.float32).reshape(-1, 1) / np.float32(template_scale)
    return np.concatenate([f, t], axis=1)


def voxel_mask(source_flat: np.ndarray, voxel_of_source: np.ndarray, n_voxels: int, point_mask: np.ndarray) -> np.ndarray:
    """Per-voxel mask from a per-input-point mask: a voxel is in the region when any of its points is."""
    out = np.zeros(n_voxels, dtype=bool)
    m = np.asarray(point_mask, bool).reshape(-1)
    keep = m[source_flat]
    out[voxel_of_source[keep]] = True
    return out


def bank_entries(desc: np.ndarray, base: np.ndarray, region: np.ndarray | None, p: HeadParams) -> np.ndarray:
    """The descriptors one confirmed part adds to the bank (see the module doc); possibly none."""
    b = np.asarray(base, np.float64)
    if region is None or not region.any():
        k = max(1, int(round(p.fallback_fraction * len(b))))
        region = np.zeros(len(b), bool)
        region[np.argsort(-b, kind="stable")[:k]] = True
    idx = np.flatnonzero(region & (b >= p.min_base))
    idx = idx[np.argsort(-b[idx], kind="stable")][: p.max_per_part]
    return desc[idx].astype(np.float32)


def bank_distance(desc: np.ndarray, bank: MemoryBank) -> np.ndarray:
    """Descriptor distance (M,) of every point to its nearest defect-bank entry (exact, chunked matmul)."""
    return bank.nearest_distances(bank.centre(np.asarray(desc, np.float32))).cpu().numpy().astype(np.float64)


def neighbours(points: np.ndarray, k: int, tree: cKDTree | None = None) -> np.ndarray | None:
    """Indices (M×k) of each point's k nearest spatial neighbours, itself included; None for k <= 1."""
    k = min(int(k), len(points))
    if k <= 1:
        return None
    return (tree if tree is not None else cKDTree(points)).query(points, k=k)[1]


def evidence_from_distance(dist: np.ndarray, base: np.ndarray, nbr: np.ndarray | None, p: HeadParams) -> tuple[float, np.ndarray]:
    """(object-score gain, per-point gain) from the bank distances (see the module doc)."""
    e = np.maximum(np.asarray(base, np.float64), 0.0) ** p.base_power * np.exp(-0.5 * (dist / p.radius) ** 2)
    if nbr is not None:
        e = e[nbr].mean(axis=1)
    k = min(len(e), max(p.top_min, int(round(p.top_fraction * len(e)))))
    top = float(np.partition(e, len(e) - k)[-k:].mean())
    return p.weight * top, (p.weight * e).astype(np.float32)


def evidence(points: np.ndarray, desc: np.ndarray, base: np.ndarray, bank: MemoryBank | None, p: HeadParams,
             tree: cKDTree | None = None) -> tuple[float, np.ndarray]:
    """(object-score gain, per-point gain) for one part; zeros when there is no bank."""
    if bank is None or p.weight == 0 or len(base) == 0:
        return 0.0, np.zeros(len(base), np.float32)
    return evidence_from_distance(bank_distance(desc, bank), base, neighbours(points, p.smoothing_k, tree), p)
