"""IMRNet's device path: ``geometry_impl="torch"`` runs the whole of ``score`` in torch on
the scorer's device. Here: the CPU default stays the numpy path bit for bit, the torch path on CPU
tensors agrees with it, the torch ICP recovers a known pose, and (with a GPU) the same on CUDA.

Tolerances (score units are standard deviations of the good parts' maps, a map spans ~10):
CPU torch vs numpy, |Δ| ≤ 1e-4 for point and object scores (both paths search neighbours in
float64, sample and group with the same CPU-seeded picks; measured 0 for point scores, ≤ 1e-6 for
object scores, the float32 top-k mean summed in another order). CUDA vs numpy: object score within
1e-3 relative, 99.5 % of point scores within 1e-3 and all within 0.5 (float32 matmul-based patch
grouping on the GPU can order a near-tie differently and move one patch member).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_imrnet import BUMP, TINY, box_cloud

from workers.imrnet.align import apply, icp_align, icp_align_torch, rot_z, rotation_deg
from workers.imrnet.scorer import IMRNetScorer
from workers.preprocess import PreparedCloud

CPU_TOL = 1e-4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def moved(cloud: PreparedCloud, deg: float, shift: tuple[float, float, float]) -> PreparedCloud:
    """``cloud`` rotated about z by ``deg`` and shifted (mm): a part lying in another pose."""
    t = rot_z(deg)
    t[:3, 3] = shift
    pts = apply(t, cloud.points)
    return PreparedCloud(points=pts, source_flat=cloud.source_flat, voxel_of_source=cloud.voxel_of_source)


def sample_clouds() -> dict[str, PreparedCloud]:
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 20, size=(200, 3)).astype(np.float32)  # fewer points than n_points
    return {
        "good": box_cloud(100),
        "bump": box_cloud(200, bump=BUMP),
        "rotated bump": moved(box_cloud(201, bump=BUMP), 6.0, (1.0, -0.5, 0.0)),
        "small": PreparedCloud(points=small, source_flat=np.arange(200), voxel_of_source=np.arange(200)),
    }


@pytest.fixture(scope="module")
def fitted() -> IMRNetScorer:
    torch.manual_seed(0)
    scorer = IMRNetScorer(**TINY, pretrained="none", finetune_steps=10, batch_size=4, finetune_lr=2e-3,
                          finetune_samplings=2, template_samplings=2, aug_rotate_deg=0.0)
    scorer.fit([box_cloud(0), moved(box_cloud(1), -4.0, (0.5, 0.5, 0.0)), box_cloud(2)])
    return scorer


def variant(scorer: IMRNetScorer, **params: object) -> IMRNetScorer:
    return IMRNetScorer.from_state({**scorer.params(), **params}, scorer.tensors())


def diffs(a, b) -> tuple[float, float, np.ndarray]:
    d = np.abs(a.point_scores.astype(np.float64) - b.point_scores)
    return abs(a.object_score - b.object_score), float(d.max()), d


def test_auto_resolves_by_backend() -> None:
    cases = {"torch-cpu": ("numpy", "cpu"), "onnxruntime": ("numpy", "cpu"), "tensorrt": ("numpy", "cpu"),
             "torch-cuda": ("torch", "cuda")}
    for backend, (mode, device) in cases.items():
        scorer = IMRNetScorer(**TINY)
        scorer.use_backend(backend)  # unfitted: only records the choice
        assert (scorer.geometry_mode, scorer.device.type) == (mode, device), backend
    assert IMRNetScorer(geometry_impl="torch").geometry_mode == "torch"
    assert IMRNetScorer(geometry_impl="numpy").params()["geometry_impl"] == "numpy"
    with pytest.raises(ValueError, match="geometry_impl"):
        IMRNetScorer(geometry_impl="open3d")


def test_default_cpu_path_is_the_numpy_path_bit_for_bit(fitted: IMRNetScorer) -> None:
    """The results in docs/results/imrnet.md were measured with the numpy path: the CPU default is it."""
    assert fitted.geometry_impl == "auto" and fitted.geometry_mode == "numpy"
    numpy_path = variant(fitted, geometry_impl="numpy")
    for name, cloud in sample_clouds().items():
        a, b = fitted.score(cloud), numpy_path.score(cloud)
        assert a.object_score == b.object_score, name
        assert np.array_equal(a.point_scores, b.point_scores), name


@pytest.mark.parametrize("params", [{}, {"point_score": "knn", "sampler": "random", "reference": "none"}],
                         ids=["default", "knn-random-noref"])
def test_torch_geometry_matches_numpy_on_cpu(fitted: IMRNetScorer, params: dict) -> None:
    numpy_path = variant(fitted, geometry_impl="numpy", **params)
    torch_path = variant(fitted, geometry_impl="torch", **params)
    assert torch_path.geometry_mode == "torch" and torch_path.device.type == "cpu"
    for name, cloud in sample_clouds().items():
        a, b = numpy_path.score(cloud), torch_path.score(cloud)
        d_obj, d_max, _ = diffs(a, b)
        assert b.point_scores.dtype == np.float32 and b.point_scores.shape == a.point_scores.shape
        assert d_obj <= CPU_TOL and d_max <= CPU_TOL, (
            f"{name}: torch vs numpy, object |Δ| = {d_obj:.3g}, point scores max |Δ| = {d_max:.3g} (tol {CPU_TOL})")
        assert set(b.timings) == set(a.timings)


def test_fit_with_torch_geometry_matches_numpy() -> None:
    """``fit`` shares the helpers: with ``geometry_impl="torch"`` (CPU tensors) it builds the same model."""
    clouds = [box_cloud(0), moved(box_cloud(1), 5.0, (0.5, 0.0, 0.0))]
    kw = dict(**TINY, pretrained="none", finetune_steps=2, batch_size=2, finetune_samplings=1, template_samplings=1)
    fits = {}
    for impl in ("numpy", "torch"):
        torch.manual_seed(0)
        fits[impl] = IMRNetScorer(**kw, geometry_impl=impl)
        fits[impl].fit(clouds)
    a, b = fits["numpy"], fits["torch"]
    assert np.array_equal(a.align_reference, b.align_reference)
    d_tmpl = float((a.template - b.template).abs().max())
    d_stats = float(np.abs(a.stats - b.stats).max())
    assert d_tmpl <= CPU_TOL and d_stats <= CPU_TOL, f"template max |Δ| {d_tmpl:.3g}, stats max |Δ| {d_stats:.3g}"


@pytest.mark.parametrize("method", ["plane", "point"])
def test_torch_icp_recovers_a_known_pose(method: str) -> None:
    ref = box_cloud(0).points
    ref = (ref - ref.mean(axis=0)) / 20.0
    pose = rot_z(8.0)
    pose[:3, 3] = [0.03, -0.02, 0.0]
    src = apply(np.linalg.inv(pose), ref)  # the same surface, moved
    if method == "point":  # converges linearly (~30 iterations): a third of the source keeps the test short
        src = src[::3]
        ref_sub = ref[::3]
    else:
        ref_sub = ref
    est, info = icp_align_torch(torch.from_numpy(src), torch.from_numpy(ref), method=method)
    assert est.dtype == torch.float64 and est.shape == (4, 4)
    assert info["fitness"] > 0.99
    assert rotation_deg(est) == pytest.approx(8.0, abs=0.3)
    moved_src = apply(est, torch.from_numpy(src)).numpy()
    assert np.abs(moved_src - ref_sub).max() < 1e-3, f"max residual {np.abs(moved_src - ref_sub).max():.3g}"
    if method == "plane":  # the numpy ICP's algorithm: the same transform
        est_np, info_np = icp_align(src, ref)
        assert np.abs(est.numpy() - est_np).max() < 1e-9
        assert info["fitness"] == info_np["fitness"]


@needs_cuda
def test_torch_icp_on_cuda_matches_cpu() -> None:
    ref = box_cloud(0).points
    ref = (ref - ref.mean(axis=0)) / 20.0
    pose = rot_z(-7.0)
    pose[:3, 3] = [0.02, 0.01, 0.0]
    src = apply(np.linalg.inv(pose), ref)
    cpu, _ = icp_align_torch(torch.from_numpy(src), torch.from_numpy(ref))
    gpu, info = icp_align_torch(torch.from_numpy(src).cuda(), torch.from_numpy(ref).cuda())
    assert gpu.device.type == "cuda" and info["fitness"] > 0.99
    assert float((gpu.cpu() - cpu).abs().max()) < 1e-6


@needs_cuda
def test_torch_cuda_scores_match_the_numpy_path(fitted: IMRNetScorer) -> None:
    numpy_path = variant(fitted, geometry_impl="numpy")
    gpu = variant(fitted)
    gpu.use_backend("torch-cuda")
    assert gpu.geometry_mode == "torch" and gpu.device.type == "cuda"
    for name, cloud in sample_clouds().items():
        dev_cloud = PreparedCloud(points=cloud.points, source_flat=cloud.source_flat,
                                  voxel_of_source=cloud.voxel_of_source,
                                  device_points=torch.from_numpy(cloud.points).cuda())
        for c in (cloud, dev_cloud):  # uploaded by the scorer, or already on the device (device preprocessing)
            a, b = numpy_path.score(c), gpu.score(c)
            d_obj, d_max, d = diffs(a, b)
            q = float(np.quantile(d, 0.995))
            assert d_obj <= 1e-3 * max(1.0, abs(a.object_score)) and q <= 1e-3 and d_max <= 0.5, (
                f"{name}: CUDA vs numpy, object |Δ| = {d_obj:.3g}, point scores max |Δ| = {d_max:.3g}, "
                f"99.5th percentile {q:.3g}")
