"""Part library, defect carving and the simulated structured-light camera, with real open3d."""

from __future__ import annotations

import numpy as np
import pytest

from sensors.defects import DEFECT_KINDS, carve_defect, label_points, sample_cloud
from sensors.frame import Frame
from sensors.mesh import subdivide_uniform
from sensors.parts import PART_CLASSES, make_part
from sensors.simcam import MIN_VISIBLE_GT_PIXELS, CameraParams, render, simulate_frame
from sensors.tolerance import permissible_deviation


def _edges(mesh) -> np.ndarray:
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    return np.linalg.norm(v[f] - v[np.roll(f, -1, axis=1)], axis=-1)


@pytest.fixture(scope="module")
def nut():
    return subdivide_uniform(make_part("nut", np.random.default_rng(0)), 1.0)


def test_part_classes_build_on_the_plane():
    assert len(PART_CLASSES) >= 10
    for cls in PART_CLASSES:
        mesh = make_part(cls, np.random.default_rng(1))
        v = np.asarray(mesh.vertices)
        ext = np.ptp(v, axis=0)
        assert 25.0 < ext[:2].max() < 85.0, (cls, ext)
        assert abs(v[:, 2].min()) < 1e-9, cls
        lo, hi = v.min(axis=0), v.max(axis=0)
        assert np.allclose((lo + hi)[:2] / 2, 0.0, atol=1e-9), cls
        # closed surfaces (merged components may intersect, but have no open edges)
        assert len(mesh.get_non_manifold_edges(allow_boundary_edges=False)) == 0, cls


def test_make_part_variation_and_unknown_class():
    a = np.asarray(make_part("gear", np.random.default_rng(3)).vertices)
    b = np.asarray(make_part("gear", np.random.default_rng(3)).vertices)
    c = np.asarray(make_part("gear", np.random.default_rng(4)).vertices)
    assert np.array_equal(a, b)
    assert a.shape == c.shape and not np.allclose(a, c)
    # ISO 2768-m: the gear's 64 mm outer diameter is the sum of two jittered radii (±0.3 mm each)
    assert np.abs(np.ptp(a, axis=0) - np.ptp(c, axis=0)).max() <= 1.2 + 1e-9
    wide = np.asarray(make_part("gear", np.random.default_rng(4), tolerance=0.1).vertices)
    assert np.abs(np.ptp(wide, axis=0) - np.ptp(a, axis=0)).max() > 1.2  # a ±10 % family is wider
    with pytest.raises(ValueError, match="flange"):
        make_part("sprocket", np.random.default_rng(0))
    with pytest.raises(ValueError, match="ISO 2768"):
        make_part("gear", np.random.default_rng(0), tolerance="x")


def test_permissible_deviation_follows_iso_2768_1():
    assert [permissible_deviation(x, "m") for x in (1.2, 3.0, 4.0, 30.0, 31.0, 130.0)] == [0.1, 0.1, 0.1, 0.2, 0.3, 0.5]
    assert [permissible_deviation(x, "f") for x in (10.0, 60.0)] == [0.1, 0.15]
    assert permissible_deviation(50.0, 0.02) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="relative"):
        permissible_deviation(50.0, 1.5)


def test_subdivide_uniform_bounds_edges_and_keeps_surface():
    coarse = make_part("bracket", np.random.default_rng(0))
    fine = subdivide_uniform(coarse, 1.0)
    assert _edges(fine).max() <= 1.0 + 1e-9
    assert fine.get_surface_area() == pytest.approx(coarse.get_surface_area(), rel=1e-9)
    assert len(fine.get_non_manifold_edges(allow_boundary_edges=False)) == 0
    assert len(fine.triangles) < 40 * fine.get_surface_area()  # no blow-up of needle triangles


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_carve_defect_changes_a_bounded_part_of_the_surface(nut, kind):
    defective, info = carve_defect(nut, kind, np.random.default_rng(5))
    assert info["kind"] == kind
    assert 0.003 < info["affected_fraction"] < 0.35, info["affected_fraction"]
    pts, labels = sample_cloud(defective, nut, 20000, np.random.default_rng(0), noise_sigma=0.02, info=info)
    assert pts.dtype == np.float32 and pts.shape == (20000, 3)
    assert labels.dtype == np.uint8 and 0 < labels.mean() < 0.4


def test_good_cloud_has_no_labels(nut):
    pts, labels = sample_cloud(nut, nut, 5000, np.random.default_rng(0), noise_sigma=0.05)
    assert pts.shape == (5000, 3) and not labels.any()
    assert not label_points(pts[:100].astype(np.float64), nut, tol=0.3).any()


def test_render_nan_for_invalid_pixels_and_world_frame(nut):
    cam = CameraParams(width=200, height=160)
    pts, gt = render(nut, cam, np.random.default_rng(0))
    assert gt is None
    assert pts.shape == (160, 200, 3) and pts.dtype == np.float32
    finite = np.isfinite(pts)
    assert (finite.all(axis=-1) == finite.any(axis=-1)).all()  # NaN in all three or none
    valid = finite.all(axis=-1)
    assert 0.8 < valid.mean() < 1.0  # dropout, grazing walls and projector shadows
    z = pts[..., 2][valid]
    assert np.median(z) == pytest.approx(0.0, abs=0.2)  # the table, in world mm
    assert z.max() == pytest.approx(np.asarray(nut.vertices)[:, 2].max(), abs=0.5)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_kind_is_visible_on_a_frame(kind):
    frame = simulate_frame("flange", True, np.random.default_rng(11), seq=3, defect_kinds=(kind,))
    assert isinstance(frame, Frame) and frame.organized
    assert frame.meta.truth == {"defective": True, "defect": kind}
    assert frame.gt_mask is not None and frame.gt_mask.dtype == np.uint8
    visible = frame.gt_mask.astype(bool) & frame.valid_mask()
    assert visible.sum() >= MIN_VISIBLE_GT_PIXELS
    assert frame.gt_mask.mean() < 0.1


def test_good_frame_has_empty_gt_and_validates():
    frame = simulate_frame("washer", False, np.random.default_rng(2), seq=7, sensor_id="simcam-1")
    assert frame.meta.truth == {"defective": False, "defect": None}
    assert frame.meta.units == "mm" and frame.meta.product == "washer" and frame.meta.seq == 7
    assert frame.meta.part_id and frame.meta.sensor_id == "simcam-1"
    assert frame.points.shape == (400, 400, 3) and not frame.gt_mask.any()
    Frame(points=frame.points, meta=frame.meta, gt_mask=frame.gt_mask)  # validates again
    assert 0.9 < frame.valid_mask().mean() < 1.0


def test_simulate_frame_is_deterministic_for_a_seed():
    a = simulate_frame("gear", True, np.random.default_rng(42))
    b = simulate_frame("gear", True, np.random.default_rng(42))
    c = simulate_frame("gear", True, np.random.default_rng(43))
    assert np.array_equal(a.points, b.points, equal_nan=True)
    assert np.array_equal(a.gt_mask, b.gt_mask)
    assert a.meta.truth == b.meta.truth
    assert not np.array_equal(a.points, c.points, equal_nan=True)
