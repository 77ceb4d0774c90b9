"""PatchCore over FPFH features: the BTF baseline as an inspectd scorer (``patchcore-fpfh``).

What: every voxel centroid of a good training part is described by its Fast Point Feature
Histogram (FPFH, Rusu et al. 2009, 33-D), the histograms of all training parts are stacked into
a memory bank, and the bank is thinned by PatchCore's greedy k-center coreset (Roth et al.,
"Towards Total Recall in Industrial Anomaly Detection", CVPR 2022). A new part's point score is
the Euclidean distance of its FPFH to the nearest bank element; its object score is PatchCore's
reweighted maximum. This is "Back to the Feature" (Horwitz & Hoshen, CVPRW 2023), the
training-free FPFH baseline of MVTec 3D-AD.

Why: no training beyond feature extraction and a coreset, a few MB of state, a CPU-friendly
exact nearest-neighbour search, and per-point anomaly maps out of the box.

Choices (all vectorized; the only Python loop is over the coreset picks):

* FPFH as in BTF: normals from a hybrid KD-tree search with radius
  ``normal_radius_factor × voxel_size`` (at most 30 neighbours), FPFH with radius
  ``feature_radius_factor × voxel_size`` (at most 100 neighbours). ``voxel_size`` is the scale
  of the feature, in mm; the clouds are already voxelized by preprocessing. Two
  implementations of the same formulas, chosen by ``fpfh_impl``: ``open3d`` (C++ KD-tree, CPU)
  and ``torch`` (``workers.geometry``: grid neighbour search, batched PCA and histograms, on the
  scorer's device). ``auto`` (default) takes torch when the backend is ``torch-cuda``, so on a
  GPU the frame's points, normals, FPFH, bank search, smoothing and reweighting all stay on the
  device and only the M point scores come back; and open3d on a CPU, where it is faster: on a
  28 386-point cloud (a voxelized 90×70×50 mm box surface, ``OMP_NUM_THREADS=1``, 2-core
  shared machine) open3d normals + FPFH take 0.9–1.2 s, torch 4.9 s in float64 (0.4 s normals,
  4.5 s FPFH, 1.4 s of it the radius-5 neighbour search) and 3.0 s in float32. The two agree:
  with the same normals the torch FPFH is open3d's to 4e-13 (float64) / 9e-5 (float32, the
  device dtype); normals agree to |cos| > 1 − 1e-12. End to end a normal that differs in the
  last bits can still move a pair across open3d's source/target swap (``|n1·d| = |n2·d|``),
  which flips θ's sign and moves one pair's count (100/k) between bins: on the cloud above
  1.5 % of the rows differ, by at most 1.5 (of 100 per block). A model keeps one
  implementation for fit and score unless its backend changes.
* Normal orientation (FPFH is sign-sensitive): every normal is flipped to point away from the
  cloud's centroid. Unlike "towards the camera" this works for both sensor families (a
  single-view camera scan and a 360° stitched scan) and does not depend on where the part sits
  in the sensor frame; it is exact for convex parts and consistent for a given product, which
  is what matters as training and test parts are oriented by the same rule. Known limit: a
  single-view scan of a nearly flat sheet (centroid in the surface) gets ambiguous signs; such a
  product would want a "towards the camera" rule. A point without enough neighbours gets an
  all-zero FPFH (open3d's behaviour), which is kept.
* Coreset: exact greedy k-center (farthest-point) selection from a seeded random start, one
  matrix-vector product per pick in torch. Features are projected to
  ``coreset_projection_dim`` dimensions by a seeded Gaussian (Johnson-Lindenstrauss) matrix
  first, as PatchCore does, only when their dimension exceeds it (FPFH is 33-D: no
  projection by default). Selection stops early when every bank element coincides with a
  selected one. Size: ``min(coreset_max, max(1, int(coreset_ratio × N)))``; ``coreset_ratio
  >= 1`` keeps the whole bank.
* Search: exact, ``‖a‖² + ‖b‖² − 2ab`` by chunked matmul in torch on features centred on the
  bank mean (distances are unchanged, float32 cancellation is smaller), clamped at 0.
* Point scores are averaged over each point's ``score_smoothing_k`` nearest spatial neighbours
  (itself included) to damp FPFH noise; a real defect spans many voxels.
* Object score: PatchCore's reweighting on the smoothed map. The point with the highest
  (smoothed) score gives s* and its feature m_test*; m* is m_test*'s nearest bank element and
  N_b(m*) the b nearest bank elements of m* (m* itself included, as in anomalib);
  ``w = 1 − softmax(‖m_test* − m‖ for m in N_b(m*))[m*]`` (a softmax, so numerically
  stable), ``score = w · s*``. ``reweight_neighbors <= 1`` turns the reweighting off (w = 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.components.fpfh import (
    MIN_POINTS,
    check_points,
    fpfh_features,
    fpfh_features_torch,
)
from workers.components.knn import knn, smooth_over_neighbours
from workers.components.memory_bank import MemoryBank, coreset_size, greedy_coreset
from workers.preprocess import PreparedCloud
from workers.scorer import Scorer, ScoreResult, register

__all__ = ["FPFH_IMPLS", "MemoryBankScorer", "fpfh_features", "fpfh_features_torch", "greedy_coreset"]

FPFH_IMPLS = ("auto", "open3d", "torch")


@register
class MemoryBankScorer(Scorer):
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

    def __init__(
        self,
        voxel_size: float = 1.0,
        normal_radius_factor: float = 2.0,
        feature_radius_factor: float = 5.0,
        coreset_ratio: float = 0.1,
        coreset_max: int = 20000,
        coreset_projection_dim: int = 128,
        reweight_neighbors: int = 3,
        score_smoothing_k: int = 8,
        seed: int = 0,
        fpfh_impl: str = "auto",
    ) -> None:
        if fpfh_impl not in FPFH_IMPLS:
            raise ValueError(f"fpfh_impl must be one of {FPFH_IMPLS}, got {fpfh_impl!r}")
        if voxel_size <= 0 or normal_radius_factor <= 0 or feature_radius_factor <= 0:
            raise ValueError("voxel_size and the radius factors must be positive")
        if coreset_ratio <= 0 or coreset_max < 1:
            raise ValueError("coreset_ratio must be > 0 and coreset_max >= 1")
        if reweight_neighbors < 0 or score_smoothing_k < 0:
            raise ValueError("reweight_neighbors and score_smoothing_k must be >= 0")
        self.voxel_size = float(voxel_size)
        self.normal_radius_factor = float(normal_radius_factor)
        self.feature_radius_factor = float(feature_radius_factor)
        self.coreset_ratio = float(coreset_ratio)
        self.coreset_max = int(coreset_max)
        self.coreset_projection_dim = int(coreset_projection_dim)
        self.reweight_neighbors = int(reweight_neighbors)
        self.score_smoothing_k = int(score_smoothing_k)
        self.seed = int(seed)
        self.fpfh_impl = fpfh_impl
        self.bank: MemoryBank | None = None
        """The fitted FPFH memory bank, on this scorer's device."""
        self.device = torch.device("cpu")

    # -- state ---------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {
            "voxel_size": self.voxel_size,
            "normal_radius_factor": self.normal_radius_factor,
            "feature_radius_factor": self.feature_radius_factor,
            "coreset_ratio": self.coreset_ratio,
            "coreset_max": self.coreset_max,
            "coreset_projection_dim": self.coreset_projection_dim,
            "reweight_neighbors": self.reweight_neighbors,
            "score_smoothing_k": self.score_smoothing_k,
            "seed": self.seed,
            "fpfh_impl": self.fpfh_impl,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        if self.bank is None:
            raise RuntimeError("patchcore-fpfh is not fitted: nothing to save")
        return {"memory_bank": self.bank.array}

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> MemoryBankScorer:
        if "memory_bank" not in tensors:
            raise ValueError("patchcore-fpfh state has no 'memory_bank' tensor")
        scorer = cls(**params)
        scorer.bank = MemoryBank(tensors["memory_bank"], scorer.device)
        return scorer

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        """Keep the bank on the CUDA device for ``torch-cuda``; features are uploaded per frame."""
        super().use_backend(backend, cache_dir)
        self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
        if self.bank is not None:
            self.bank = self.bank.to(self.device)

    @property
    def fitted(self) -> bool:
        return self.bank is not None

    @property
    def memory_bank_size(self) -> int:
        return 0 if self.bank is None else len(self.bank)

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
            feat = fpfh_features(cloud.points, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor)
            return torch.from_numpy(feat).to(self.device)
        pts = self._device_points(cloud)
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < MIN_POINTS or not bool(torch.isfinite(pts).all()):
            check_points(pts.cpu().numpy())
        feat = fpfh_features_torch(pts, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor)
        return feat.float()

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
        self.bank = MemoryBank(bank, self.device)

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        return self.score_many([cloud])[0]

    def score_many(self, clouds: Sequence[PreparedCloud]) -> list[ScoreResult]:
        """Score a batch: FPFH per part (a radius search within each part), then ONE bank search
        over the features of every part together (one matmul stream instead of one per part),
        then smoothing and reweighting per part. ``search`` timings are the batch's shared
        search time split by feature rows."""
        if self.bank is None:
            raise RuntimeError("patchcore-fpfh is not fitted: call fit() or load an artifact first")
        feats, feat_s = [], []
        for cloud in clouds:
            t0 = time.perf_counter()
            feats.append(self.features_t(cloud))
            feat_s.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        q_all = self.bank.centre(torch.cat(feats) if len(feats) > 1 else feats[0])
        d_all = self.bank.nearest_distances(q_all)
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
                scores_t = torch.from_numpy(smooth_over_neighbours(cloud.points, scores_t.numpy(), k))
            else:
                _, nbr_t = knn(*[self._device_points(cloud)] * 2, k)
                scores_t = scores_t[nbr_t].mean(dim=1)
        star = int(torch.argmax(scores_t))
        object_score = float(scores_t[star]) * self.bank.reweight(q[star], self.reweight_neighbors)
        return object_score, scores_t.float().cpu().numpy()

    def score_features(self, cloud: PreparedCloud, feat: torch.Tensor) -> ScoreResult:
        """``score`` from FPFH features already computed (``features_t``), for a scorer that
        also uses the features themselves (``fused-defects``); ``timings`` lacks ``features``."""
        if self.bank is None:
            raise RuntimeError("patchcore-fpfh is not fitted: call fit() or load an artifact first")
        t1 = time.perf_counter()
        q = self.bank.centre(feat)
        d = self.bank.nearest_distances(q)
        t2 = time.perf_counter()
        object_score, scores = self._finish(cloud, q, d)
        return ScoreResult(object_score=object_score, point_scores=scores,
                           timings={"search": t2 - t1, "smooth": time.perf_counter() - t2})
