"""The ``patchcore-fpfh`` scorer: FPFH features, coreset fitting, smoothing and map-back around
the memory bank model of ``workers.patchcore.torch_model``. Design, paper sections and measured
choices: docs/design/patchcore-fpfh.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from workers.base import Scorer, ScoreResult
from workers.components.fpfh import FPFH_IMPLS, fpfh_features
from workers.components.knn import knn, smooth_over_neighbours
from workers.components.memory_bank import coreset_size, greedy_coreset
from workers.params import ScorerParams, fit_field, infer_field
from workers.patchcore.torch_model import PatchCoreModel
from workers.preprocess import PreparedCloud

__all__ = ["FPFH_IMPLS", "PatchCoreFPFHScorer", "fpfh_features", "greedy_coreset"]


class PatchCoreFPFHParams(ScorerParams):
    """Parameters of ``patchcore-fpfh`` (design: docs/design/patchcore-fpfh.md)."""

    normal_radius_factor: float = fit_field(2.0, "Normal estimation radius, in voxels.", gt=0)
    feature_radius_factor: float = fit_field(5.0, "FPFH radius, in voxels.", gt=0)
    coreset_ratio: float = fit_field(0.1, "Fraction of the training features kept by the greedy coreset "
                                     "(>= 1 keeps them all).", gt=0)
    coreset_max: int = fit_field(20000, "Most features the memory bank keeps.", ge=1)
    coreset_projection_dim: int = fit_field(128, "Features wider than this are randomly projected to it "
                                            "for the coreset selection.", ge=1)
    seed: int = fit_field(0, "Seed of the coreset's start and projection.")
    reweight_neighbors: int = infer_field(3, "Bank neighbours of PatchCore's object-score reweighting "
                                          "(<= 1: off).", ge=0)
    score_smoothing_k: int = infer_field(8, "Point scores are averaged over this many nearest points.", ge=0)
    fpfh_impl: Literal["auto", "open3d", "torch"] = infer_field(
        "auto", "FPFH implementation: open3d (CPU), torch (any device), auto (torch on a GPU backend).")


class PatchCoreFPFHScorer(Scorer):
    """PatchCore memory bank over FPFH features (the BTF baseline). See the module docstring."""

    name = "patchcore-fpfh"
    version = "1.0.0"
    backends = ("torch-cpu", "torch-cuda")
    """The bank search and reweighting run on the backend's device; FPFH too unless ``fpfh_impl="open3d"``."""
    batch_devices = ("cuda",)
    """A batch shares one bank search (``score_many``). On the CPU that was measured not to pay
    (bench/results/batching-2core.md: 0.98-1.08x the CPU time per frame at batch 4, within the
    shared machine's noise; FPFH, preprocessing and smoothing dominate a frame), so the CPU scores
    part by part. On a GPU one search replaces a kernel stream per part; not measured yet (no GPU
    was at hand): ``inspectd bench --batch 1,4,8 --backend torch-cuda``."""

    Params = PatchCoreFPFHParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.model: PatchCoreModel | None = None
        """The fitted FPFH memory bank and its search (``workers.patchcore.torch_model``), on ``device``."""
        self.device = torch.device("cpu")

    # -- state ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("patchcore-fpfh is not fitted: nothing to save")
        return self.model.tensors()

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> PatchCoreFPFHScorer:
        model = PatchCoreModel.from_tensors(tensors)
        scorer = cls(**params)
        scorer.model = model.to(scorer.device)
        return scorer

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        """Keep the bank on the CUDA device for ``torch-cuda``; features are uploaded per frame."""
        super().use_backend(backend, cache_dir)
        self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
        if self.model is not None:
            self.model.to(self.device)

    @property
    def fitted(self) -> bool:
        return self.model is not None

    @property
    def memory_bank_size(self) -> int:
        return 0 if self.model is None else len(self.model)

    # -- fit / score ---------------------------------------------------------------------------

    @property
    def feature_impl(self) -> str:
        """The FPFH implementation in use: ``fpfh_impl``, with ``auto`` resolved by the device."""
        if self.fpfh_impl != "auto":
            return self.fpfh_impl
        return "open3d" if self.device.type == "cpu" else "torch"

    def features(self, cloud: PreparedCloud) -> np.ndarray:
        """FPFH (M×33 float32) of ``cloud.points`` with this scorer's radii."""
        return self.features_t(cloud).cpu().numpy()

    def _device_points(self, cloud: PreparedCloud) -> torch.Tensor:
        """``cloud``'s points on this scorer's device (float64 on a CPU, float32 on a GPU)."""
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        pts = cloud.device_points
        if pts is None or pts.device != self.device:
            pts = torch.from_numpy(np.asarray(cloud.points))
        return pts.to(device=self.device, dtype=dtype)

    def features_t(self, cloud: PreparedCloud) -> torch.Tensor:
        """FPFH (M×33 float32) on this scorer's device, by the implementation in use."""
        if self.feature_impl == "open3d":
            feat = fpfh_features(cloud.points, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor,
                                 impl="open3d")
            return torch.from_numpy(feat).to(self.device)
        pts = self._device_points(cloud)
        return fpfh_features(pts, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor,
                             impl="torch").float()

    def coreset_size(self, n: int) -> int:
        """How many bank elements the coreset keeps out of ``n``."""
        return coreset_size(n, self.coreset_ratio, self.coreset_max)

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        from tqdm import tqdm

        if len(clouds) == 0:
            raise ValueError("patchcore-fpfh needs at least one good training cloud")
        feats = [self.features(c) for c in tqdm(clouds, desc="fpfh", disable=not progress, leave=False)]
        # the coreset selection runs on the CPU (numpy argmax per pick); fit is offline
        bank = np.concatenate(feats, axis=0)
        n_keep = self.coreset_size(len(bank))
        if n_keep < len(bank):
            idx = greedy_coreset(bank, n_keep, self.coreset_projection_dim, self.seed, progress)
            bank = bank[idx]
        self.model = PatchCoreModel(bank).to(self.device)

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        return self.score_many([cloud])[0]

    def score_many(self, clouds: Sequence[PreparedCloud]) -> list[ScoreResult]:
        """Score a batch: FPFH per part (a radius search within each part), then ONE bank search
        over the features of every part together (one matmul stream instead of one per part),
        then smoothing and reweighting per part. ``search`` timings are the batch's shared
        search time split by feature rows."""
        if self.model is None:
            raise RuntimeError("patchcore-fpfh is not fitted: call fit() or load an artifact first")
        feats, feat_s = [], []
        for cloud in clouds:
            t0 = time.perf_counter()
            feats.append(self.features_t(cloud))
            feat_s.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        q_all, d_all = self.model(torch.cat(feats) if len(feats) > 1 else feats[0])
        search = time.perf_counter() - t1
        sizes = [len(f) for f in feats]
        out = []
        for cloud, q, d, fs in zip(clouds, q_all.split(sizes), d_all.split(sizes), feat_s, strict=True):
            t2 = time.perf_counter()
            object_score, scores = self._finish(cloud, q, d)
            timings = {"features": fs, "search": search * len(q) / max(1, len(q_all)),
                       "smooth": time.perf_counter() - t2}
            out.append(ScoreResult(object_score=object_score, point_scores=scores, timings=timings))
        return out

    def _finish(self, cloud: PreparedCloud, q: torch.Tensor, scores_t: torch.Tensor) -> tuple[float, np.ndarray]:
        """Smooth one part's nearest-bank distances over its neighbours, then PatchCore's object
        score (the top point reweighted by its bank neighbourhood); returns it and the point scores."""
        k = min(self.score_smoothing_k, len(scores_t))
        if k > 1:
            if self.device.type == "cpu":  # scipy's KD-tree; brute force is for devices
                scores_t = torch.from_numpy(smooth_over_neighbours(cloud.points, scores_t.numpy(), k,
                                                                   neighbours=cloud.neighbours(k)))
            else:
                _, nbr_t = knn(*[self._device_points(cloud)] * 2, k)
                scores_t = scores_t[nbr_t].mean(dim=1)
        star = int(torch.argmax(scores_t))
        assert self.model is not None
        object_score = float(scores_t[star]) * self.model.reweight(q[star], self.reweight_neighbors)
        return object_score, scores_t.float().cpu().numpy()

    def score_features(self, cloud: PreparedCloud, feat: torch.Tensor) -> ScoreResult:
        """``score`` from FPFH features already computed (``features_t``), for a scorer that
        also uses the features themselves (``fused-defects``); ``timings`` lacks ``features``."""
        if self.model is None:
            raise RuntimeError("patchcore-fpfh is not fitted: call fit() or load an artifact first")
        t1 = time.perf_counter()
        q, d = self.model(feat)
        t2 = time.perf_counter()
        object_score, scores = self._finish(cloud, q, d)
        return ScoreResult(object_score=object_score, point_scores=scores,
                           timings={"search": t2 - t1, "smooth": time.perf_counter() - t2})
