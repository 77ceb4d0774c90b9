"""3DzAL (``zeroshot``): its one torch pipeline, against KD-tree / numpy oracles and across devices.

The pipeline runs in torch on the scorer's device (float64 geometry on a CPU, float32 on a GPU).
The oracles below are the CPU constructions the published figures (docs/results/zeroshot.md)
were first measured with: scipy KD-tree patches, the 28×28 cell layout in numpy, numpy / scipy
maps. They live here only, to check the pipeline; nothing in workers/ calls them.

Tolerances, stated: on a CPU the patches are the oracle's indices (an exact distance tie at a
patch's 64th neighbour may break differently: none here) and the maps agree to 1e-5. On CUDA the
geometry is float32, and a float32 normal can move one FPFH pair across open3d's source/target
swap (docs/design/patchcore-fpfh.md), so the CUDA test allows ``CUDA_RTOL`` = 2e-2 of the
largest point score and prints what it measured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from test_zeroshot import SMALL, cloud_of

from workers.preprocess import PreparedCloud
from workers.registry import load_scorer
from workers.zeroshot import ZeroShotScorer
from workers.zeroshot.patches import (
    CELL,
    GRID,
    cloud_point_scores,
    extract_patches,
    foreground_index_224,
    grid_view,
    organized_map,
    organized_point_scores,
)
from workers.zeroshot.pointnet2 import farthest_point_sample
from workers.zeroshot.scorer import torch_threads

CUDA_RTOL = 2e-2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def fitted() -> ZeroShotScorer:
    train = [cloud_of("block", s) for s in range(2)] + [cloud_of("dome", s) for s in range(2)]
    scorer = ZeroShotScorer(voxel_size=1.0, **SMALL)
    scorer.fit(train)
    return scorer


def unorganized(c: PreparedCloud) -> PreparedCloud:
    return PreparedCloud(c.points, np.arange(len(c.points)), np.arange(len(c.points)))


@pytest.fixture(scope="module")
def clouds() -> list[PreparedCloud]:
    """Never-seen 'roll' parts: a good one, a dented one (organized) and the dented one as a bare cloud."""
    good, bad = cloud_of("roll", 10), cloud_of("roll", 12, dent=(5.0, 0.0, 5.0, 3.0))
    return [good, bad, unorganized(bad)]


# -- oracles: the CPU constructions, in numpy / scipy -----------------------------------------------


def oracle_patches(c: PreparedCloud, k: int = 64, max_patches: int = GRID * GRID, min_cell_pixels: int = 8):
    """(centres, neighbours, cells or None): organized cells by numpy index arithmetic, FPS centres
    by ``pointnet2.farthest_point_sample``, the k nearest voxels of each centre by a KD-tree."""
    pts = c.points
    if c.frame is not None and c.frame.organized:
        vox = foreground_index_224(c, grid_view(c)).numpy()
        cells = vox.reshape(GRID, CELL, GRID, CELL).transpose(0, 2, 1, 3).reshape(GRID * GRID, CELL * CELL)
        keep = np.flatnonzero((cells >= 0).sum(axis=1) >= max(1, min_cell_pixels))
        r, col = np.divmod(np.arange(CELL * CELL), CELL)
        d2 = (r - (CELL - 1) / 2) ** 2 + (col - (CELL - 1) / 2) ** 2
        centre = cells[keep, np.argmin(np.where(cells[keep] >= 0, d2[None, :], np.inf), axis=1)]
    else:
        keep = None
        n = min(max_patches, len(pts))
        centre = farthest_point_sample(torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float32))[None], n)[0].numpy()
    _, nbr = cKDTree(pts).query(pts[centre].astype(np.float64), k=k)
    return centre, nbr, keep


def oracle_organized_scores(values: np.ndarray, ps, c: PreparedCloud, sigma: float) -> np.ndarray:
    amap = organized_map(values, ps.cells.numpy(), ps.fg224.numpy(), sigma)
    r, col = np.divmod(c.source_flat, c.frame.points.shape[1])
    v = ps.view
    gx, gy = (col + 0.5 - v.c0) / v.w * 2 - 1, (r + 0.5 - v.r0) / v.h * 2 - 1
    grid = torch.stack([torch.as_tensor(gx, dtype=torch.float32), torch.as_tensor(gy, dtype=torch.float32)], -1)
    px = F.grid_sample(amap[None, None], grid.view(1, 1, -1, 2), mode="bilinear", padding_mode="border",
                       align_corners=False).view(-1).numpy().astype(np.float64)
    sums = np.bincount(c.voxel_of_source, weights=px, minlength=len(c.points))
    return (sums / np.maximum(np.bincount(c.voxel_of_source, minlength=len(c.points)), 1)).astype(np.float32)


def oracle_cloud_scores(values: np.ndarray, centers: np.ndarray, pts: np.ndarray, blur_k: int, sigma: float):
    d, i = cKDTree(pts[centers]).query(pts, k=3)
    w = 1.0 / (d + 1e-6)
    s = (values.astype(np.float64)[i] * w).sum(axis=1) / w.sum(axis=1)
    d, i = cKDTree(pts).query(pts, k=blur_k)
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return ((s[i] * g).sum(axis=1) / g.sum(axis=1)).astype(np.float32)


# -- the pipeline against them -----------------------------------------------------------------------


def test_patches_are_the_oracle_patches(clouds) -> None:
    """Organized cells / centres and FPS centres are the same indices; kNN patches the same sets."""
    for c in clouds:
        ps = extract_patches(c, None, 64, "auto", 784, 8)
        centre, nbr, cells = oracle_patches(c)
        assert ps.organized == (cells is not None)
        assert np.array_equal(ps.centers.numpy(), centre)
        assert np.array_equal(np.sort(ps.neighbors.numpy(), axis=1), np.sort(nbr, axis=1))
        if cells is not None:
            assert np.array_equal(ps.cells.numpy(), cells)


def test_maps_match_the_oracle_maps(clouds) -> None:
    """Upsampling + blur + mapping to points (organized) and IDW + kNN blur (clouds), same values in."""
    rng = np.random.default_rng(0)
    for c in clouds:
        ps = extract_patches(c)
        values = rng.uniform(0, 5, len(ps)).astype(np.float32)
        if ps.organized:
            ref = oracle_organized_scores(values, ps, c, 4.0)
            out = organized_point_scores(torch.from_numpy(values), ps, c, 4.0).numpy()
        else:
            ref = oracle_cloud_scores(values, ps.centers.numpy(), c.points, 16, 2.0)
            out = cloud_point_scores(torch.from_numpy(values), ps, torch.from_numpy(c.points).double(), 16, 2.0).numpy()
        diff = float(np.abs(ref - out).max())
        assert diff <= 1e-5, f"max abs diff {diff:.3g}"


def test_scores_survive_a_save_load_round_trip(fitted: ZeroShotScorer, clouds, tmp_path) -> None:
    fitted.save(tmp_path, train_hash="x")
    loaded = load_scorer(tmp_path)
    for c in clouds:
        a, b = fitted.score(c), loaded.score(c)
        assert a.object_score == b.object_score and np.array_equal(a.point_scores, b.point_scores)
        assert a.point_scores.dtype == np.float32 and a.point_scores.shape == (len(c.points),)


def test_models_saved_with_the_retired_geometry_impl_still_load() -> None:
    """Models saved when there were two pipelines carry ``geometry_impl``; it is dropped on load."""
    scorer = ZeroShotScorer(**SMALL, geometry_impl="numpy")
    assert "geometry_impl" not in scorer.params()


@cuda
def test_cuda_scores_match_the_cpu(fitted: ZeroShotScorer, clouds) -> None:
    """On ``torch-cuda`` every stage runs on the GPU; scores stay close to the CPU's (float32 geometry)."""
    ref = [fitted.score(c) for c in clouds]
    try:
        fitted.use_backend("torch-cuda")
        prep = fitted._prepare(clouds[1])
        assert prep.fpfh.is_cuda and prep.patches.neighbors.is_cuda and prep.xyz.is_cuda
        assert prep.patches.cells is not None and prep.patches.cells.is_cuda
        out = [fitted.score(c) for c in clouds]
    finally:
        fitted.use_backend("torch-cpu")
    d_obj = max(abs(a.object_score - b.object_score) for a, b in zip(ref, out, strict=True))
    d_pts = max(float(np.abs(a.point_scores - b.point_scores).max()) for a, b in zip(ref, out, strict=True))
    tol = CUDA_RTOL * max(1.0, *(float(np.abs(a.point_scores).max()) for a in ref))
    msg = f"torch-cuda vs CPU: max abs diff object {d_obj:.3g}, points {d_pts:.3g} (tolerance {tol:.3g})"
    print(msg)
    assert d_obj <= tol and d_pts <= tol, msg
    back = [fitted.score(c) for c in clouds]  # back on torch-cpu: the same scores, bit for bit
    assert all(np.array_equal(a.point_scores, r.point_scores) for a, r in zip(back, ref, strict=True))


@cuda
def test_cuda_scores_a_frame_prepared_on_the_device() -> None:
    """A frame prepared on the GPU (``device_points``) is scored without leaving it."""
    from test_zeroshot import PP, render

    from workers.preprocess import prepare

    scorer = ZeroShotScorer(voxel_size=1.0, **{**SMALL, "use_learned": False, "use_classifier": False})
    scorer.fit([cloud_of("block", 0), cloud_of("dome", 0)])
    scorer.use_backend("torch-cuda")
    c = prepare(render("roll", 12, dent=(5.0, 0.0, 5.0, 3.0)), PP, device="cuda")
    assert c.device_points is not None and c.device_points.is_cuda
    r = scorer.score(c)
    assert r.point_scores.shape == (len(c.points),) and np.isfinite(r.point_scores).all() and r.object_score > 0
