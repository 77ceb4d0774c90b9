"""Backend parity: every backend present gives the torch-cpu reference's outputs.

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
    from workers.patchcore import MemoryBankScorer
    from workers.preprocess import PreparedCloud

    rng = np.random.default_rng(0)

    def cloud(seed: int) -> PreparedCloud:
        pts = np.random.default_rng(seed).uniform(0, 30, size=(2000, 3)).astype(np.float32)
        pts[:, 2] = np.sin(pts[:, 0] / 5) * 3
        return PreparedCloud(points=pts, source_flat=np.arange(2000), voxel_of_source=np.arange(2000))

    s = MemoryBankScorer()
    s.fit([cloud(i) for i in range(3)])
    test = cloud(int(rng.integers(100, 200)))
    cpu = s.score(test)
    s.use_backend("torch-cuda")
    gpu = s.score(test)
    assert abs(gpu.object_score - cpu.object_score) <= 1e-3 * max(1.0, abs(cpu.object_score))
    np.testing.assert_allclose(gpu.point_scores, cpu.point_scores, rtol=1e-3, atol=1e-3)
