"""The golden part: good parts registered to one another, fused into one reference surface, with a tolerance map.

:func:`build_reference` registers every good part onto the first one (global hypotheses + ICP,
``workers.components.registration``), fuses all of them into voxel centroids of ``voxel_size``
(the reference points), estimates the reference normals, then registers every part once more
onto that fused surface and fuses again (the first anchor's own noise no longer sets the frame).

:func:`tolerance_map` measures, for every reference point, the signed point-to-plane deviation
of the good parts' points that fall nearest to it: their mean (a systematic offset, e.g. the
voxel-centroid bias on a curved face) and spread, and how many good parts cover it at all
(visibility: a camera sees only part of a product; a point cloud should cover all of it). The
spread is floored by the pooled robust spread of all deviations, so a location seen by few
points cannot get a near-zero tolerance. The fitted result is held by
``workers.template.torch_model.TemplateModel``.

Faces (:func:`segment_faces`): the reference split into connected regions of near-constant
normal. Part-to-part variation of a dimension (a wall a little thicker, a boss a little taller)
moves a whole face along its normal; :func:`face_offsets` measures that shift per face as the
median signed deviation of a part's points on it, so that it can be removed before the part
is scored (a bulge or a dent covers only part of a face and survives the median). The
tolerance map is measured after the same removal, so it holds what the scorer compares.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from workers import geometry
from workers.components.registration import Registrar, estimate_normals

NORMAL_K = 16
FACE_NORMAL_K = 8
"""Neighbours of the sharper normals the faces are grown on (the reference's own, k = 16, blur edges)."""
FACE_NEIGHBOURS = 8
FACE_LINK_VOXELS = 1.5
"""Two reference points join one face when one is among the other's 8 nearest, at most
1.5 voxels apart, and their normals agree to ``face_cos``."""


def fuse(clouds: Sequence[np.ndarray], voxel_size: float) -> np.ndarray:
    """Voxel centroids (float64) of all ``clouds`` together."""
    pts = torch.from_numpy(np.concatenate([np.asarray(c, dtype=np.float64) for c in clouds]))
    return geometry.voxel_downsample(pts, voxel_size)[0].numpy().astype(np.float64)


def signed_deviation(points: np.ndarray, reference: np.ndarray, normals: np.ndarray, tree: cKDTree,
                     nearest: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signed point-to-plane deviation, Euclidean distance, index of the nearest reference point).

    ``nearest``: (distances, indices) of a bounded query of ``points`` against ``tree`` already
    made (``inf`` / ``tree.n`` beyond its bound, e.g. registration's fitness query): only the
    points beyond the bound are searched again, so the answer is the unbounded query's."""
    if nearest is None:
        d, j = tree.query(points, workers=1)
    else:
        d, j = nearest
        far = ~np.isfinite(d)
        if far.any():
            d, j = d.copy(), j.copy()
            d[far], j[far] = tree.query(points[far], workers=1)
    signed = np.einsum("ij,ij->i", points - reference[j], normals[j])
    return signed, d, j


def segment_faces(points: np.ndarray, voxel_size: float, cos: float) -> np.ndarray:
    """Face label (0..F-1) of every reference point: connected components of the graph joining
    near neighbours whose (sharp, k = 8) normals agree to ``cos`` in absolute value."""
    pts = np.asarray(points, dtype=np.float64)
    normals = estimate_normals(pts, FACE_NORMAL_K)
    k = min(FACE_NEIGHBOURS, len(pts) - 1)
    d, nb = cKDTree(pts).query(pts, k=k + 1, workers=1)
    i = np.repeat(np.arange(len(pts)), k)
    j = nb[:, 1:].ravel()
    ok = (np.abs(np.einsum("ij,ij->i", normals[i], normals[j])) > cos) & (d[:, 1:].ravel() < FACE_LINK_VOXELS * voxel_size)
    graph = coo_matrix((np.ones(int(ok.sum())), (i[ok], j[ok])), shape=(len(pts), len(pts)))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def face_offsets(faces: np.ndarray, signed: np.ndarray, shrink: float) -> np.ndarray:
    """Per point, the shift of its face: the median of ``signed`` over the points of that face
    (``faces``: the face of each point), shrunk towards 0 by n / (n + ``shrink``) for a face
    with n points, so a face seen by a few points is barely moved."""
    faces = np.asarray(faces, dtype=np.int64)
    signed = np.asarray(signed, dtype=np.float64)
    if len(signed) == 0:
        return signed
    n_faces = int(faces.max()) + 1
    order = np.lexsort((signed, faces))
    count = np.bincount(faces, minlength=n_faces)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    median = np.zeros(n_faces)
    seen = count > 0
    median[seen] = signed[order][start[seen] + count[seen] // 2]
    return (median * count / (count + shrink))[faces]


def build_reference(clouds: Sequence[np.ndarray], voxel_size: float, registrar_kw: dict,
                    rounds: int = 2, min_fitness: float = 0.0,
                    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[float]]:
    """Fuse good parts into a reference: (points, normals, the registered parts it holds,
    registration fitness of every part in the last round).

    A part registered under ``min_fitness`` in a round is left out of that round's fusion and
    of the returned parts: registered at a wrong pose, it would fuse in a shifted copy of
    itself (a ghost) that later parts register onto (docs/design/template.md, "Ghosts in the
    reference"). It is registered again in the next round, onto the others' fused surface.
    When most parts fall under ``min_fitness`` (the first part, the anchor, is the odd one),
    all of them are fused, as they were before this bound existed."""
    parts = [np.asarray(c, dtype=np.float64) for c in clouds]
    anchor = parts[0]
    fitness: list[float] = []
    kept = registered = parts
    for _ in range(max(1, rounds)):
        reg = Registrar(anchor, **registrar_kw)
        results = [reg.register(p) for p in parts]
        registered = [p @ r.transform[:3, :3].T + r.transform[:3, 3] for p, r in zip(parts, results, strict=True)]
        fitness = [r.fitness for r in results]
        kept = [p for p, f in zip(registered, fitness, strict=True) if f >= min_fitness]
        if 2 * len(kept) < len(parts):
            kept = registered
        anchor = fuse(kept, voxel_size)
    normals = estimate_normals(anchor, NORMAL_K)
    return anchor, normals, kept, fitness


def tolerance_map(registered: Sequence[np.ndarray], points: np.ndarray, normals: np.ndarray,
                  cover_dist: float, floor_min: float, faces: np.ndarray | None = None,
                  face_shrink: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, spread, visibility) per reference point from the registered good parts; with
    ``faces``, each part's face shifts (:func:`face_offsets`) are removed first."""
    tree = cKDTree(points)
    n = len(points)
    s1 = np.zeros(n)
    s2 = np.zeros(n)
    cnt = np.zeros(n)
    cover = np.zeros(n)
    pooled = []
    for part in registered:  # one iteration per good part, vectorized over its points
        signed, _, j = signed_deviation(part, points, normals, tree)
        if faces is not None:
            signed = signed - face_offsets(faces[j], signed, face_shrink)
        s1 += np.bincount(j, signed, n)
        s2 += np.bincount(j, signed * signed, n)
        cnt += np.bincount(j, minlength=n)
        pooled.append(signed)
        d, _ = cKDTree(part).query(points, distance_upper_bound=cover_dist, workers=1)
        cover += np.isfinite(d)
    offset = np.where(cnt > 0, s1 / np.maximum(cnt, 1), 0.0)
    var = np.where(cnt > 1, s2 / np.maximum(cnt, 1) - offset * offset, 0.0).clip(min=0.0)
    allp = np.concatenate(pooled)
    floor = max(1.4826 * float(np.median(np.abs(allp - np.median(allp)))), floor_min)
    spread = np.sqrt(var + floor * floor)
    return offset, spread, cover / max(1, len(registered))
