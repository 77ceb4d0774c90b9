"""Backend parity: every backend present gives the torch-cpu reference's outputs, for a small
network and for the network scorers (imrnet, zeroshot) on the same fitted model.

Tolerances: 1e-5 absolute for float32 backends (ONNX Runtime, torch CUDA), 2e-2 relative for
TensorRT FP16. GPU backends run where a GPU is present (the device machine), else skip and say so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.backends import (
    available_backends,
    backend_unavailable_reason,
    make_runner,
    resolve_backend,
)


class TinyPointNet(torch.nn.Module):
    """A mini-PointNet (shared MLP + max pool), the shape of the networks our scorers run."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128))
        self.head = torch.nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.mlp(x).amax(dim=1)
        return self.head(feat), feat


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, torch.Tensor, list[np.ndarray]]:
    torch.manual_seed(0)
    net = TinyPointNet().eval()
    x = torch.randn(4, 64, 3)
    return net, x, make_runner("torch-cpu", net, [x], n_outputs=2).run(x)


@pytest.mark.parametrize("backend,tol", [("onnxruntime", 1e-5), ("torch-cuda", 1e-4), ("tensorrt", 2e-2)])
def test_backend_matches_torch_cpu(backend: str, tol: float, reference, tmp_path) -> None:
    reason = backend_unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    net, x, ref = reference
    out = make_runner(backend, net, [x], n_outputs=2, cache_dir=tmp_path).run(x)
    for o, r in zip(out, ref, strict=True):
        diff = float(np.abs(o - r).max())
        print(f"{backend}: max abs diff {diff:.3g}")
        assert diff <= tol * max(1.0, float(np.abs(r).max()))
    other = make_runner(backend, net, [x], n_outputs=2, cache_dir=tmp_path).run(x[:1])  # dynamic batch
    assert other[0].shape == (1, 16)


def test_resolve_backend() -> None:
    assert resolve_backend("auto", ["torch-cpu"]) == "torch-cpu"
    assert "torch-cpu" in available_backends()
    with pytest.raises(ValueError, match="not supported"):
        resolve_backend("tensorrt", ["torch-cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available here"):
            resolve_backend("torch-cuda", ["torch-cpu", "torch-cuda"])


def test_patchcore_search_on_cuda_matches_cpu() -> None:
    """The memory-bank search on the GPU gives the CPU's scores (float32 matmul tolerance)."""
    reason = backend_unavailable_reason("torch-cuda")
    if reason:
        pytest.skip(f"torch-cuda: {reason}")
    from workers.patchcore import PatchCoreFPFHScorer
    from workers.preprocess import PreparedCloud

    rng = np.random.default_rng(0)

    def cloud(seed: int) -> PreparedCloud:
        pts = np.random.default_rng(seed).uniform(0, 30, size=(2000, 3)).astype(np.float32)
        pts[:, 2] = np.sin(pts[:, 0] / 5) * 3
        return PreparedCloud(points=pts, source_flat=np.arange(2000), voxel_of_source=np.arange(2000))

    s = PatchCoreFPFHScorer()
    s.fit([cloud(i) for i in range(3)])
    test = cloud(int(rng.integers(100, 200)))
    cpu = s.score(test)
    s.use_backend("torch-cuda")
    gpu = s.score(test)
    assert abs(gpu.object_score - cpu.object_score) <= 1e-3 * max(1.0, abs(cpu.object_score))
    np.testing.assert_allclose(gpu.point_scores, cpu.point_scores, rtol=1e-3, atol=1e-3)


# -- the network scorers on every backend present ---------------------------------------------
#
# Tolerances on the scorers' own scores (object score and every point score), stated here:
# ONNX Runtime and torch CUDA compute in float32 like the reference, so the scores agree to
# float32 rounding carried through the scoring (1e-3 absolute on scores that are standardized,
# O(1..100)); TensorRT may use FP16 (kept only where its network outputs stay within 1 %), so 5e-2
# relative to the largest score. A nearest-template tie that flips on rounding would show up
# here as a larger difference, which is why the scores, not only the graphs, are compared.

SCORE_TOL = {"onnxruntime": 1e-3, "torch-cuda": 1e-3, "tensorrt": 5e-2}


def _compare_scores(backend: str, ref: list, out: list) -> float:
    diff = 0.0
    for r, o in zip(ref, out, strict=True):
        assert o.point_scores.shape == r.point_scores.shape
        diff = max(diff, abs(o.object_score - r.object_score), float(np.abs(o.point_scores - r.point_scores).max()))
    scale = max(1.0, *(float(np.abs(r.point_scores).max()) for r in ref))
    tol = SCORE_TOL[backend] * (scale if backend == "tensorrt" else 1.0)
    print(f"{backend}: max abs score difference vs torch-cpu {diff:.3g} (tolerance {tol:.3g})")
    assert diff <= tol
    return diff


@pytest.fixture(scope="module")
def imrnet_fitted():
    from test_imrnet import TINY, box_cloud

    from workers.imrnet.scorer import IMRNetScorer

    torch.manual_seed(0)
    scorer = IMRNetScorer(**TINY, pretrained="none", finetune_steps=30, batch_size=4, finetune_lr=2e-3,
                          finetune_samplings=2, template_samplings=2, aug_rotate_deg=0.0)
    scorer.fit([box_cloud(seed) for seed in range(3)])
    return scorer


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_imrnet_scores_match_torch_cpu(backend: str, imrnet_fitted, tmp_path) -> None:
    """imrnet's object and point scores on ``backend`` = torch-cpu's, same fitted model
    (torch-cuda moves the whole pipeline, float32 geometry included: tests/test_imrnet_device.py)."""
    reason = backend_unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    from test_imrnet import BUMP, box_cloud

    scorer = imrnet_fitted
    clouds = [box_cloud(100), box_cloud(200, bump=BUMP)]
    ref = [scorer.score(c) for c in clouds]
    try:
        scorer.use_backend(backend, tmp_path / "cache")
        out = [scorer.score(c) for c in clouds]
        assert scorer._runners is not None and scorer._runners["features"].backend == backend
    finally:
        scorer.use_backend("torch-cpu")
    _compare_scores(backend, ref, out)
    if backend != "torch-cuda":  # the export is cached on disk, keyed by the weights
        assert len(list((tmp_path / "cache").glob("imrnet-*/*.onnx"))) == 2
    back = [scorer.score(c) for c in clouds]  # back on torch-cpu: the reference, bit for bit
    assert all(np.array_equal(a.point_scores, r.point_scores) for a, r in zip(back, ref, strict=True))


@pytest.fixture(scope="module")
def zeroshot_fitted():
    from test_zeroshot import SMALL, cloud_of

    from workers.zeroshot.scorer import ZeroShotScorer, torch_threads

    with torch_threads(1):
        train = [cloud_of("block", s) for s in range(2)] + [cloud_of("dome", s) for s in range(2)]
        scorer = ZeroShotScorer(voxel_size=1.0, **SMALL)
        scorer.fit(train)
    return scorer


@pytest.mark.parametrize("backend", ["onnxruntime"])
def test_zeroshot_scores_match_torch_cpu(backend: str, zeroshot_fitted) -> None:
    """zeroshot's object and point scores on ``backend`` = torch-cpu's, same fitted model
    (torch-cuda moves the whole pipeline, float32 geometry included: tests/test_zeroshot_device.py)."""
    reason = backend_unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    from test_zeroshot import cloud_of

    scorer = zeroshot_fitted
    clouds = [cloud_of("roll", 10), cloud_of("roll", 12, dent=(5.0, 0.0, 5.0, 3.0))]
    ref = [scorer.score(c) for c in clouds]
    try:
        scorer.use_backend(backend)
        out = [scorer.score(c) for c in clouds]
    finally:
        scorer.use_backend("torch-cpu")
    _compare_scores(backend, ref, out)
    back = [scorer.score(c) for c in clouds]
    assert all(np.array_equal(a.point_scores, r.point_scores) for a, r in zip(back, ref, strict=True))


def test_network_scorers_declare_their_backends() -> None:
    from workers.registry import scorer_class

    assert scorer_class("imrnet").backends == ("torch-cpu", "torch-cuda", "onnxruntime", "tensorrt")
    assert scorer_class("zeroshot").backends == ("torch-cpu", "torch-cuda", "onnxruntime")


def test_bench_plan_and_stage_names(imrnet_fitted, zeroshot_fitted) -> None:
    """``inspectd bench --scorer all --backend all`` plans every scorer on every backend available
    here; every timing key the network scorers report maps onto one of the issue's stages."""
    from test_imrnet import box_cloud
    from test_zeroshot import cloud_of

    from tools.bench.run import bench_plan
    from tools.bench.stages import STAGE_OF, STAGES, map_stages

    plan, skipped = bench_plan(["all"], ["all"])
    assert ("imrnet", "onnxruntime") in plan and ("zeroshot", "torch-cpu") in plan
    assert ("patchcore-fpfh", "torch-cpu") in plan and not skipped
    assert all(backend_unavailable_reason(b) is None for _, b in plan)
    plan, skipped = bench_plan(["patchcore-fpfh"], ["torch-cpu", "onnxruntime"])
    assert plan == [("patchcore-fpfh", "torch-cpu")] and "not supported" in skipped[0]["reason"]
    keys = set(imrnet_fitted.score(box_cloud(7)).timings) | set(zeroshot_fitted.score(cloud_of("roll", 7)).timings)
    assert keys <= set(STAGE_OF), keys - set(STAGE_OF)
    stages = map_stages({"decode": 1.0, "features": 2.0, "search": 3.0, "smooth": 1.0})
    assert stages["network"] is None and stages["search"] == 4.0 and set(STAGES) <= set(stages)
