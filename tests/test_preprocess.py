"""Preprocessing: plane removal, voxel downsampling, and scores mapped back to every point."""

from __future__ import annotations

import numpy as np
import pytest

from sensors.frame import Frame, FrameError, FrameMeta
from workers.preprocess import PreprocessParams, prepare, voxel_downsample
from workers.score_frame import map_back


def box_on_plane(seed: int = 0) -> Frame:
    """A 200×200 grid at 0.5 mm: a plane at z=0 with a 40×30×10 mm box; 1% invalid pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:200, 0:200] * 0.5
    box = (np.abs(x - 50) < 20) & (np.abs(y - 50) < 15)
    z = np.where(box, 10.0, 0.0) + rng.normal(0, 0.03, x.shape)
    pts = np.stack([x, y, z], -1).astype(np.float32)
    pts[rng.random(x.shape) < 0.01] = np.nan
    return Frame(points=pts, meta=FrameMeta("t", "box", "p", 0, 0.0))


def test_plane_is_removed_and_the_part_kept() -> None:
    f = box_on_plane()
    c = prepare(f, PreprocessParams(voxel_size=1.0))
    flat_pts = f.points.reshape(-1, 3)[c.source_flat]
    assert (flat_pts[:, 2] > 5).all()  # only box-top points survive
    box_valid = int(((f.points[..., 2] > 5) & f.valid_mask()).sum())
    assert len(c.source_flat) == box_valid
    assert len(c.points) < len(c.source_flat)  # downsampled


def test_no_plane_removal_for_tight_crops() -> None:
    f = box_on_plane()
    crop = Frame(points=np.ascontiguousarray(f.points[72:128, 72:128]), meta=f.meta)
    c = prepare(crop, PreprocessParams(voxel_size=0.0))
    assert len(c.points) == int(crop.valid_mask().sum())


def test_voxel_downsample_centroids_and_inverse() -> None:
    pts = np.array([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.5, 0.2, 0.2]], dtype=np.float32)
    cent, inv = voxel_downsample(pts, 1.0)
    assert len(cent) == 2 and inv[0] == inv[1] != inv[2]
    np.testing.assert_allclose(cent[inv[0]], [0.2, 0.2, 0.2], atol=1e-6)


def test_map_back_covers_every_pixel() -> None:
    f = box_on_plane()
    c = prepare(f, PreprocessParams(voxel_size=1.0))
    amap = map_back(c, np.arange(len(c.points), dtype=np.float32) + 1, f)
    assert amap.shape == (200, 200)
    assert np.isnan(amap[~f.valid_mask()]).all()
    fg = amap.reshape(-1)[c.source_flat]
    assert (fg >= 1).all()
    assert np.count_nonzero(np.nan_to_num(amap)) == len(c.source_flat)  # background is 0


def test_dense_map_fills_the_part_region_from_the_nearest_scored_pixel() -> None:
    f = box_on_plane()
    c = prepare(f, PreprocessParams(voxel_size=1.0))
    scores = np.arange(len(c.points), dtype=np.float32) + 1
    sparse = map_back(c, scores, f)
    dense = map_back(c, scores, f, dense=True)
    assert np.isfinite(dense).all()
    flat = dense.reshape(-1)
    np.testing.assert_array_equal(flat[c.source_flat], sparse.reshape(-1)[c.source_flat])
    rows, cols = np.divmod(c.source_flat, 200)
    top = int(rows.min())  # first box row
    inside = [(r, q) for r, q in zip(*np.nonzero(~f.valid_mask()), strict=True) if top < r < rows.max() and cols.min() < q < cols.max()]
    assert inside  # invalid pixels on the box top: holes in the scored mask
    for r, q in inside[:5] + [(top - 1, 100), (top - 3, 100)]:  # holes, and the 3 px fringe
        d2 = (rows - r) ** 2 + (cols - q) ** 2
        assert dense[r, q] in set(flat[c.source_flat[d2 == d2.min()]].tolist())
    assert dense[top - 4, 100] == 0 and dense[0, 0] == 0  # beyond the fringe: the floor


def test_frames_without_points_are_refused() -> None:
    f = box_on_plane()
    empty = Frame(points=np.full((4, 4, 3), np.nan, np.float32), meta=f.meta)
    with pytest.raises(FrameError) as e:
        prepare(empty, PreprocessParams())
    assert e.value.reason == "no_finite_points"
    flat = Frame(points=f.points[:1, :10].copy(), meta=f.meta)
    with pytest.raises(FrameError) as e:
        prepare(flat, PreprocessParams())
    assert e.value.reason == "too_few_points"


def test_grid_downsampling_follows_the_camera_grid() -> None:
    """Camera frames are downsampled by pixel blocks as wide as a voxel (0.5 mm pitch, 1 mm
    voxel: 2×2 blocks), and every block centroid lies on the box top, never in mid-air."""
    f = box_on_plane()
    grid = prepare(f, PreprocessParams(voxel_size=1.0, organized="grid"))
    vox = prepare(f, PreprocessParams(voxel_size=1.0, organized="voxel"))
    np.testing.assert_array_equal(grid.source_flat, vox.source_flat)  # same foreground
    rows, cols = np.divmod(grid.source_flat, 200)
    block = (rows // 2) * 100 + cols // 2
    for cell in np.unique(grid.voxel_of_source)[:50]:  # each cell is one 2×2 block
        assert len(np.unique(block[grid.voxel_of_source == cell])) == 1
    assert np.abs(grid.points[:, 2] - 10.0).max() < 0.2
    assert 0.8 < len(grid.points) / len(vox.points) < 1.6


def test_depth_layers_split_a_block_across_a_step() -> None:
    """A 4×4 block straddling a 10 mm step gives two centroids, one on each level."""
    y, x = np.mgrid[0:4, 0:4] * 0.25
    z = np.where(x < 0.5, 0.0, 10.0)
    f = Frame(points=np.stack([x, y, z], -1).astype(np.float32), meta=FrameMeta("t", "s", "p", 0, 0.0))
    c = prepare(f, PreprocessParams(voxel_size=1.0, remove_plane=False, min_points=1, organized="grid"))
    assert sorted(np.round(c.points[:, 2], 3).tolist()) == [0.0, 10.0]


def test_plane_fitted_on_a_pixel_stride_removes_the_same_table() -> None:
    """A large frame's plane is fitted on a strided sub-grid; the foreground matches the fit on
    every pixel."""
    f = box_on_plane()
    few = prepare(f, PreprocessParams(voxel_size=1.0, plane_samples=2_000))
    every = prepare(f, PreprocessParams(voxel_size=1.0, plane_samples=10**9))
    np.testing.assert_array_equal(few.source_flat, every.source_flat)


def test_cloud_neighbours_are_searched_once_per_cloud() -> None:
    from scipy.spatial import cKDTree

    from workers.preprocess import PreparedCloud

    pts = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    cloud = PreparedCloud(points=pts, source_flat=np.arange(500), voxel_of_source=np.arange(500))
    _, expected = cKDTree(pts.astype(np.float64)).query(pts.astype(np.float64), k=8)
    first = cloud.neighbours(8)
    np.testing.assert_array_equal(first, expected)
    assert cloud.neighbours(8) is first and cloud.tree is cloud.tree
    np.testing.assert_array_equal(cloud.neighbours(4), expected[:, :4])  # the wider search serves
    cloud.points = pts[:100].copy()  # new points: new searches
    assert cloud.tree.n == 100 and cloud.neighbours(8).shape == (100, 8)
