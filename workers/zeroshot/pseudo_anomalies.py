"""Pseudo-abnormal patches from task-irrelevant data (3DzAL Sec. 3.2, Fig. 4).

* **Points of interest** (``collect_pois``): every task-irrelevant sample is turned into an
  ordered 224×224 xyz image and fed to the untrained, He-initialized ResNet-50
  (``workers.zeroshot.resnet``); the top p = 0.1 % of its part pixels under the fused
  multi-scale soft mask are its POIs, kept as voxel indices of that sample's cloud.
* **"Adding-point"** anomalies (bulges, contamination, bends): a POI of a task-irrelevant sample
  plus its surrounding points (its ``part_points`` nearest voxels: "the anomaly points part") is
  attached to a normal sample with its geometric centre at an anchor point of the normal
  surface; the pseudo-abnormal patch is the KD-tree search of the ``k`` nearest points of the
  anchor in the normal cloud *plus* the attached points, so it holds both.
* **"Removing-point"** anomalies (cuts, holes): at a random anchor of the normal surface, the
  patch of its ``k`` nearest points loses a ratio r of its points.
* The two kinds are mixed with the quantity ratio ``mix`` (fraction of adding-point patches).

Choices where the paper is vague (stated):

* Ordered image of a sample: an organized frame is resized (nearest) to 224×224 with every
  measured pixel (plane included: the paper feeds the whole ordered sample), POIs are taken
  among the *part's* pixels only (the points ``prepare`` kept). An unorganized cloud is
  projected orthographically along its smallest principal axis onto a 224×224 grid (z-buffer:
  the point nearest the viewer wins), keeping its xyz in the channels.
* The attached part is rotated by a uniform random rotation about its centre
  (``rotate_parts=True``), so that it stands off the normal surface instead of lying flat in it
  when both were scanned from the same viewpoint; its size is kept (both clouds are voxelized
  at the same ``voxel_size``, in mm).
* Removal is spatially coherent: the r·k removed points are those nearest to a random point of
  the inner half of the patch (a hole or cut, as the paper wants to resemble), r uniform in
  ``remove_ratio`` = [0.25, 0.6]; the patch keeps ``k − round(r·k)`` points and is resampled
  to ``k`` for the network (``workers.zeroshot.patches.resample_to``).
* Task-irrelevance: a POI is only ever attached to a normal sample of a *different* product
  (``Frame.meta.product``); with a single product, POIs come from that product (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from workers.preprocess import PreparedCloud
from workers.zeroshot.patches import (
    IMAGE_SIZE,
    foreground_index_224,
    grid_view,
    is_organized,
    knn_indices,
    resample_to,
)
from workers.zeroshot.resnet import (
    ResNet50,
    fused_activation,
    he_init,
    normalize_ordered_xyz,
    top_percent_mask,
)

log = logging.getLogger("inspectd.zeroshot")

__all__ = [
    "ordered_image",
    "collect_pois",
    "PoiPool",
    "random_rotations",
    "attach_points",
    "adding_point_patches",
    "removing_point_patches",
    "NormalCloud",
    "generate_pseudo_anomalies",
]


def ordered_image(cloud: PreparedCloud, size: int = IMAGE_SIZE, crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(size×size×3 xyz with NaN where empty, size×size int64 voxel index of each part pixel or −1)."""
    if is_organized(cloud):
        assert cloud.frame is not None
        h, w = cloud.frame.points.shape[:2]
        view = grid_view(cloud, crop=crop)
        rows, cols = view.source_rows(h, size).numpy(), view.source_cols(w, size).numpy()
        xyz = cloud.frame.points[np.ix_(np.maximum(rows, 0), np.maximum(cols, 0))].copy()
        xyz[(rows[:, None] < 0) | (cols[None, :] < 0)] = np.nan
        return np.ascontiguousarray(xyz, dtype=np.float32), foreground_index_224(cloud, view, size=size).numpy()
    pts = cloud.points.astype(np.float64)
    c = pts - pts.mean(axis=0)
    _, vecs = np.linalg.eigh(c.T @ c)
    uvw = c @ vecs[:, ::-1]  # largest variance first; w = smallest = viewing axis
    lo, hi = uvw[:, :2].min(axis=0), uvw[:, :2].max(axis=0)
    scale = (size - 1) / max(float((hi - lo).max()), 1e-9)
    off = ((size - 1) - (hi - lo) * scale) / 2
    ij = np.clip(np.round((uvw[:, :2] - lo) * scale + off).astype(np.int64), 0, size - 1)
    pix = ij[:, 1] * size + ij[:, 0]
    order = np.lexsort((-uvw[:, 2], pix))  # per pixel, the point nearest the viewer first
    _, first = np.unique(pix[order], return_index=True)
    win = order[first]
    vox = np.full(size * size, -1, dtype=np.int64)
    vox[pix[win]] = win
    xyz = np.full((size * size, 3), np.nan, dtype=np.float32)
    xyz[pix[win]] = cloud.points[win]
    return xyz.reshape(size, size, 3), vox.reshape(size, size)


@dataclass
class PoiPool:
    """Points of interest of the task-irrelevant samples."""

    points: list[np.ndarray]
    """Per source sample: its voxel centroids (M×3 float32)."""
    trees: list[cKDTree]
    poi: list[np.ndarray]
    """Per source sample: voxel indices of its POIs."""
    products: list[str]

    def __len__(self) -> int:
        return len(self.points)


def collect_pois(
    clouds: Sequence[PreparedCloud],
    p: float = 0.001,
    seed: int = 0,
    batch: int = 4,
    model: ResNet50 | None = None,
    crop: bool = True,
) -> PoiPool:
    """POIs of every cloud (see the module docstring); one He-initialized ResNet-50 for all."""
    net = model if model is not None else he_init(ResNet50(), seed).eval()
    images = [ordered_image(c, crop=crop) for c in clouds]
    pois: list[np.ndarray] = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        x = torch.stack([normalize_ordered_xyz(xyz) for xyz, _ in chunk])
        soft = fused_activation(net, x).numpy()
        for s, (_, vox) in zip(soft, chunk, strict=True):
            mask = top_percent_mask(s, vox >= 0, p)
            pois.append(np.unique(vox[mask]))
    products = [_product(c) for c in clouds]
    return PoiPool([c.points for c in clouds], [cKDTree(c.points) for c in clouds], pois, products)


def _product(cloud: PreparedCloud) -> str:
    return cloud.frame.meta.product if cloud.frame is not None else ""


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n×3×3 uniformly distributed rotation matrices (random unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )


def attach_points(points: np.ndarray, part: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The normal cloud plus ``part`` moved so that its geometric centre is ``anchor``."""
    moved = part - part.mean(axis=0) + np.asarray(anchor)[None, :]
    return np.concatenate([points, moved.astype(points.dtype)], axis=0)


def adding_point_patches(
    points: np.ndarray, tree: cKDTree, anchors: np.ndarray, parts: np.ndarray, k: int
) -> np.ndarray:
    """A×k×3 adding-point patches: the k nearest of each anchor in (normal cloud ∪ its part).

    ``anchors`` are A voxel indices of ``points``; ``parts`` A×q×3 (any centre; each is moved
    so that its centroid is its anchor). Batched: the k nearest normal points come from the
    KD-tree, then the union with the q part points is cut to the k nearest of the anchor, which
    equals a KD-tree search over the union.
    """
    a = points[anchors].astype(np.float64)
    moved = parts - parts.mean(axis=1, keepdims=True) + a[:, None, :]
    near = points[knn_indices(tree, a, k)].astype(np.float64)
    union = np.concatenate([near, moved], axis=1)
    d = np.linalg.norm(union - a[:, None, :], axis=-1)
    sel = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(union, sel[..., None], axis=1).astype(np.float32)


def removing_point_patches(
    points: np.ndarray, tree: cKDTree, anchors: np.ndarray, ratios: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(A×k×3 patches, A×k validity): each anchor's k nearest points, of which the
    ``round(ratio·k)`` nearest to a random point of the patch's inner half are removed."""
    idx = knn_indices(tree, points[anchors], k)
    patch = points[idx].astype(np.float32)
    a = len(anchors)
    hole = patch[np.arange(a), rng.integers(0, max(1, k // 2), size=a)]
    d = np.linalg.norm(patch - hole[:, None, :], axis=-1)
    rank = np.argsort(np.argsort(d, axis=1, kind="stable"), axis=1, kind="stable")
    n_rm = np.minimum(np.round(np.asarray(ratios) * k).astype(np.int64), k - 1)
    return patch, rank >= n_rm[:, None]


@dataclass
class NormalCloud:
    points: np.ndarray
    tree: cKDTree
    product: str


def _sample_parts(pool: PoiPool, n: int, exclude: str, part_points: int, rng: np.random.Generator,
                  rotate: bool) -> np.ndarray:
    """n×q×3 centred parts around random POIs of sources whose product is not ``exclude``."""
    src = np.array([i for i in range(len(pool)) if pool.products[i] != exclude and len(pool.poi[i])])
    if src.size == 0:
        src = np.array([i for i in range(len(pool)) if len(pool.poi[i])])
    if src.size == 0:
        raise ValueError("no points of interest in the task-irrelevant samples")
    which = src[rng.integers(0, src.size, size=n)]
    out = np.empty((n, part_points, 3), dtype=np.float64)
    for s in np.unique(which):
        rows = np.flatnonzero(which == s)
        seeds = pool.poi[s][rng.integers(0, len(pool.poi[s]), size=rows.size)]
        idx = knn_indices(pool.trees[s], pool.points[s][seeds], part_points)
        out[rows] = pool.points[s][idx]
    out -= out.mean(axis=1, keepdims=True)
    if rotate:
        out = np.einsum("nij,nqj->nqi", random_rotations(n, rng), out)
    return out


def generate_pseudo_anomalies(
    normals: Sequence[NormalCloud],
    pool: PoiPool,
    n: int,
    k: int = 64,
    mix: float = 0.5,
    part_points: int = 24,
    remove_ratio: tuple[float, float] = (0.25, 0.6),
    rotate_parts: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pseudo-abnormal patches (n×k×3, absolute mm) and their kind (1 adding, 0 removing).

    Anchors are uniform over the normal clouds and, within one, over its voxels; a fraction
    ``mix`` (rounded) are adding-point patches.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"pseudo-anomaly mix must be in [0, 1], got {mix}")
    kind = np.zeros(n, dtype=np.int64)
    kind[: int(round(mix * n))] = 1
    rng.shuffle(kind)
    which = rng.integers(0, len(normals), size=n)
    out = np.empty((n, k, 3), dtype=np.float32)
    lo, hi = remove_ratio
    for c in np.unique(which):
        nc = normals[c]
        rows = np.flatnonzero(which == c)
        anchors = rng.integers(0, len(nc.points), size=rows.size)
        add = kind[rows] == 1
        if add.any():
            parts = _sample_parts(pool, int(add.sum()), nc.product, part_points, rng, rotate_parts)
            out[rows[add]] = adding_point_patches(nc.points, nc.tree, anchors[add], parts, k)
        if (~add).any():
            ratios = rng.uniform(lo, hi, size=int((~add).sum()))
            patch, valid = removing_point_patches(nc.points, nc.tree, anchors[~add], ratios, k, rng)
            out[rows[~add]] = resample_to(patch, valid, k, rng)
    return out, kind
