"""3DzAL (``zeroshot``) device path: ``geometry_impl="torch"`` against the numpy path.

The numpy path (``geometry_impl="numpy"``, what ``"auto"`` resolves to on the CPU) is the reference
the results in docs/results/zeroshot.md were measured with: the default must stay it, bit for bit.
The torch path (what ``"auto"`` resolves to on ``torch-cuda``) runs FPFH, patches, pooling, the
search, the classifier and the maps in torch on the scorer's device; here it runs on CPU tensors
(float64 geometry, as open3d and the KD-tree compute), on the same fitted model.

Tolerances, stated: on CPU tensors the torch path's object and point scores are the numpy path's
to ``CPU_RTOL`` = 1e-4 of the largest point score (measured 1.5e-5 absolute on scores ~60: the
FPFH of ``workers.geometry`` is open3d's to float64 rounding, the patches are the same indices,
what remains is float32 summation order). On CUDA the geometry is float32, and a float32 normal
can move one FPFH pair across open3d's source/target swap (see ``workers.patchcore``), so the
CUDA test allows ``CUDA_RTOL`` = 2e-2 of the largest point score and prints what it measured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_zeroshot import SMALL, cloud_of

from workers.backends import backend_unavailable_reason
from workers.preprocess import PreparedCloud
from workers.registry import load_scorer
from workers.zeroshot import ZeroShotScorer
from workers.zeroshot.patches import (
    cloud_point_scores,
    cloud_point_scores_t,
    extract_patches,
    extract_patches_t,
    organized_point_scores,
    organized_point_scores_t,
)
from workers.zeroshot.scorer import torch_threads

CPU_RTOL = 1e-4
CUDA_RTOL = 2e-2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def fitted() -> ZeroShotScorer:
    """Fitted on block + dome (default ``geometry_impl``: the numpy path on the CPU)."""
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


def score_with(scorer: ZeroShotScorer, impl: str, cloud: PreparedCloud):
    old = scorer.geometry_impl
    scorer.geometry_impl = impl
    try:
        return scorer.score(cloud)
    finally:
        scorer.geometry_impl = old


def max_diff(ref: list, out: list) -> tuple[float, float, float]:
    """(max |Δ object score|, max |Δ point score|, largest |reference point score|)."""
    d_obj = max(abs(a.object_score - b.object_score) for a, b in zip(ref, out, strict=True))
    d_pts = max(float(np.abs(a.point_scores - b.point_scores).max()) for a, b in zip(ref, out, strict=True))
    scale = max(1.0, *(float(np.abs(a.point_scores).max()) for a in ref))
    return d_obj, d_pts, scale


def test_default_path_is_the_numpy_path_bit_for_bit(fitted: ZeroShotScorer, clouds) -> None:
    """``geometry_impl="auto"`` on torch-cpu is the numpy path: identical object and point scores."""
    assert fitted.geometry_impl == "auto" and fitted.geometry_path == "numpy"
    for c in clouds:
        a, b = fitted.score(c), score_with(fitted, "numpy", c)
        assert a.object_score == b.object_score
        assert np.array_equal(a.point_scores, b.point_scores)


def test_torch_path_matches_numpy_path_on_cpu(fitted: ZeroShotScorer, clouds) -> None:
    ref = [score_with(fitted, "numpy", c) for c in clouds]
    out = [score_with(fitted, "torch", c) for c in clouds]
    for r, o in zip(ref, out, strict=True):
        assert o.point_scores.shape == r.point_scores.shape and o.point_scores.dtype == np.float32
        assert set(o.timings) == set(r.timings)
    d_obj, d_pts, scale = max_diff(ref, out)
    tol = CPU_RTOL * scale
    msg = f"torch vs numpy path on CPU: max abs diff object {d_obj:.3g}, points {d_pts:.3g} (tolerance {tol:.3g})"
    print(msg)
    assert d_obj <= tol and d_pts <= tol, msg


def test_device_patches_are_the_numpy_patches(fitted: ZeroShotScorer, clouds) -> None:
    """Organized cells / centres and FPS centres are the same indices; kNN patches the same sets."""
    for c in clouds:
        ref = extract_patches(c, 64, "auto", 784, 8)
        out = extract_patches_t(c, torch.from_numpy(c.points).double(), 64, "auto", 784, 8).to_host()
        assert ref.organized == out.organized
        assert np.array_equal(ref.centers, out.centers)
        assert np.array_equal(np.sort(ref.neighbors, axis=1), np.sort(out.neighbors, axis=1))
        if ref.organized:
            assert np.array_equal(ref.cells, out.cells) and np.array_equal(ref.fg224, out.fg224)
            assert np.array_equal(ref.cell_voxels, out.cell_voxels) and ref.view == out.view


def test_device_maps_match_the_numpy_maps(clouds) -> None:
    """Upsampling + blur + mapping to points (organized) and IDW + kNN blur (clouds), same values in."""
    rng = np.random.default_rng(0)
    for c in clouds:
        ps_t = extract_patches_t(c, torch.from_numpy(c.points).double())
        ps = ps_t.to_host()
        values = rng.uniform(0, 5, len(ps)).astype(np.float32)
        if ps.organized:
            ref = organized_point_scores(values, ps, c, 4.0)
            out = organized_point_scores_t(torch.from_numpy(values), ps_t, c, 4.0).numpy()
        else:
            ref = cloud_point_scores(values, ps, c.points, None, 16, 2.0)
            out = cloud_point_scores_t(torch.from_numpy(values), ps_t, torch.from_numpy(c.points).double(), 16, 2.0)
            out = out.numpy()
        diff = float(np.abs(ref - out).max())
        assert diff <= 1e-5, f"max abs diff {diff:.3g}"


def test_geometry_impl_is_a_saved_param(fitted: ZeroShotScorer, clouds, tmp_path) -> None:
    with pytest.raises(ValueError, match="geometry_impl"):
        ZeroShotScorer(geometry_impl="cupy")
    fitted.geometry_impl = "torch"
    try:
        fitted.save(tmp_path, train_hash="x")
        loaded = load_scorer(tmp_path)
        assert isinstance(loaded, ZeroShotScorer) and loaded.params()["geometry_impl"] == "torch"
        a, b = fitted.score(clouds[1]), loaded.score(clouds[1])
        assert a.object_score == b.object_score and np.array_equal(a.point_scores, b.point_scores)
    finally:
        fitted.geometry_impl = "auto"


def test_fit_on_the_torch_path_builds_the_same_bank() -> None:
    """An explicit ``geometry_impl="torch"`` also prepares the training clouds with torch (on CPU
    tensors): the FPFH-only bank (whole, no coreset: a greedy coreset may pick another of two
    near-equal elements) is the numpy path's to float32 rounding.

    Tolerance, stated: rounding differs with the CPU's vector width (AVX2 vs AVX-512 summation
    order), and one rounded normal can move one FPFH pair across a histogram bin, which shifts
    the rows that pair touches (seen: 0.0099 on a bank whose largest entry is ~1.9). So the
    largest difference may reach ``CUDA_RTOL`` of the bank's scale, while 99 % of the rows must
    still agree to ``CPU_RTOL``."""
    train = [cloud_of("block", 0), cloud_of("dome", 0)]
    fast = {**SMALL, "use_learned": False, "use_classifier": False, "coreset_ratio": 1.0}
    a, b = ZeroShotScorer(**fast), ZeroShotScorer(geometry_impl="torch", **fast)
    a.fit(train)
    b.fit(train)
    ba, bb = a.tensors()["memory_bank"], b.tensors()["memory_bank"]
    assert ba.shape == bb.shape
    scale = float(np.abs(ba).max())
    rows = np.abs(ba - bb).max(axis=1)
    diff, typical = float(rows.max()), float(np.quantile(rows, 0.99))
    assert diff <= CUDA_RTOL * scale, f"bank max abs diff {diff:.3g} (scale {scale:.3g})"
    assert typical <= CPU_RTOL * scale, f"99th percentile row diff {typical:.3g} (scale {scale:.3g})"


def test_torch_path_with_onnxruntime_networks(fitted: ZeroShotScorer, clouds) -> None:
    """``onnxruntime`` keeps the numpy path by default; with ``geometry_impl="torch"`` the
    networks still run in ONNX Runtime (host tensors) and the scores stay within tolerance."""
    reason = backend_unavailable_reason("onnxruntime")
    if reason:
        pytest.skip(f"onnxruntime: {reason}")
    c = clouds[1]
    try:
        fitted.use_backend("onnxruntime")
        assert fitted.geometry_path == "numpy"
        ref, out = fitted.score(c), score_with(fitted, "torch", c)
    finally:
        fitted.use_backend("torch-cpu")
    d_obj, d_pts, scale = max_diff([ref], [out])
    tol = 1e-3 * scale
    assert d_obj <= tol and d_pts <= tol, f"max abs diff object {d_obj:.3g}, points {d_pts:.3g} (tolerance {tol:.3g})"


@cuda
def test_cuda_torch_path_matches_cpu_numpy_path(fitted: ZeroShotScorer, clouds) -> None:
    """On ``torch-cuda`` ``auto`` is the torch path: every stage on the GPU, scores close to the
    CPU reference (float32 geometry: see the module docstring for the tolerance)."""
    ref = [fitted.score(c) for c in clouds]
    try:
        fitted.use_backend("torch-cuda")
        assert fitted.geometry_path == "torch"
        prep = fitted._prepare_t(clouds[1])
        assert prep.fpfh.is_cuda and prep.patches.neighbors.is_cuda and prep.xyz.is_cuda
        assert prep.patches.cells is not None and prep.patches.cells.is_cuda
        out = [fitted.score(c) for c in clouds]
    finally:
        fitted.use_backend("torch-cpu")
    d_obj, d_pts, scale = max_diff(ref, out)
    tol = CUDA_RTOL * scale
    msg = f"torch-cuda torch path vs CPU numpy path: max abs diff object {d_obj:.3g}, points {d_pts:.3g} (tolerance {tol:.3g})"
    print(msg)
    assert d_obj <= tol and d_pts <= tol, msg
    back = [fitted.score(c) for c in clouds]  # back on torch-cpu: the reference, bit for bit
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
