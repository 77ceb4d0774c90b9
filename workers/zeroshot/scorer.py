"""3DzAL as the ``zeroshot`` scorer: anomaly maps for a product never seen in training.
Design, paper sections, choices and measurements: docs/design/zeroshot.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.backends import NetworkRunner
from workers.base import Scorer, ScoreResult
from workers.components.fpfh import MIN_POINTS, check_points, fpfh_features
from workers.preprocess import PreparedCloud
from workers.zeroshot.fitting import fit_model
from workers.zeroshot.params import ZeroShotParams
from workers.zeroshot.patches import (
    IMAGE_SIZE,
    PatchSet,
    cloud_point_scores,
    extract_patches,
    organized_point_scores,
)
from workers.zeroshot.pointnet2 import PointNet2
from workers.zeroshot.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet50
from workers.zeroshot.torch_model import FEATURE_DIM, ZeroShotModel
from workers.zeroshot.training import (
    abnormal_probability,
    encode,
    perturb,
)

log = logging.getLogger("inspectd.zeroshot")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (restored afterwards); ``n <= 0`` leaves them alone."""
    if n <= 0:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Prepared:
    """One cloud's patches and features, every array a tensor on one device."""

    cloud: PreparedCloud
    points: torch.Tensor
    """M×3 voxel centroids in the geometry dtype (float64 on a CPU, float32 on a GPU)."""
    fpfh: torch.Tensor
    """M×33: open3d's float64 on a CPU (faster there), ``workers.geometry``'s float32 on a GPU."""
    patches: PatchSet
    patch_fpfh: torch.Tensor
    """P×33 (FPFH's dtype)."""
    xyz: torch.Tensor
    """P×k×3 float32 absolute patch points."""
    source_flat: torch.Tensor | None
    voxel_of_source: torch.Tensor | None
    """Organized clouds: ``cloud``'s pixel → voxel arrays on the device (None otherwise)."""


class ZeroShotScorer(Scorer):
    """3DzAL (docs/design/zeroshot.md). Ablation knobs: ``use_learned``, ``use_classifier``,
    ``use_perturbation``, ``pseudo_mix``, ``contrastive_weight``, ``disentangle_weight``. One
    pipeline, in torch on the scorer's device (the CPU, or the GPU of ``torch-cuda``)."""

    name = "zeroshot"
    version = "1.0.0"
    backends = ("torch-cpu", "torch-cuda", "onnxruntime")
    preprocess_overrides = {"organized": "voxel"}
    """Its patches, pseudo-anomalies and published figures are on voxel-grid samples; on camera-grid
    blocks its toy dent test loses its margin, and that path is not measured for it."""

    Params = ZeroShotParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.model: ZeroShotModel | None = None
        """Networks, memory bank and scales (``workers.zeroshot.torch_model``), on ``device``."""
        self.fit_info: dict[str, Any] = {}
        self.backend = "torch-cpu"
        self.device = torch.device("cpu")
        self._cache_dir: Path | None = None
        self._runners: dict[str, NetworkRunner] = {}
        """ONNX Runtime runners of f_θ / g_φ (``onnxruntime``)."""

    # -- state ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        if self.model is None or not self.model.fitted:
            raise RuntimeError("zeroshot is not fitted: nothing to save")
        return self.model.tensors()

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> ZeroShotScorer:
        scorer = cls(**params)
        scorer.model = ZeroShotModel.from_tensors(tensors, scorer.width)
        return scorer

    @property
    def encoder(self) -> PointNet2 | None:
        return None if self.model is None else self.model.encoder

    @property
    def classifier(self) -> PointNet2 | None:
        return None if self.model is None else self.model.classifier

    @property
    def rgb_model(self) -> ResNet50 | None:
        return None if self.model is None else self.model.rgb

    # -- backends ------------------------------------------------------------------------------

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        """Run the networks (and, on CUDA, the memory bank) on ``backend`` (see the module
        docstring). Before ``fit`` this only records the choice."""
        super().use_backend(backend, cache_dir)
        self.backend = backend
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
        self._runners = {}
        if self.model is not None:
            self.model.to(self.device)
        if backend == "onnxruntime":
            from workers.backends import make_runner

            example = [torch.zeros(2, self.patch_points, 3).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))]
            for name, net in (("encoder", self.encoder), ("classifier", self.classifier)):
                if net is not None:
                    self._runners[name] = make_runner("onnxruntime", net, example, threads=max(1, self.torch_threads))
        log.info("3DzAL networks on %s", backend)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """f_θ's L2-normalized features of normalized patches, on the chosen backend; the result on
        ``x``'s device."""
        assert self.encoder is not None
        if "encoder" in self._runners:  # ONNX Runtime runs on the host
            run, xh = self._runners["encoder"].run, x.cpu()
            out = [F.normalize(torch.from_numpy(run(xh[i : i + 1024])[0]), dim=1) for i in range(0, len(xh), 1024)]
            return (torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)).to(x.device)
        return encode(self.encoder, x.to(_module_device(self.encoder))).to(x.device)

    def _abnormal(self, x: torch.Tensor) -> torch.Tensor:
        """S_abnormal (Eq. 9–10) of normalized patches, on the chosen backend; the result on ``x``'s
        device. Eq. 8's perturbation needs g_φ's input gradient, so it runs in torch even when
        ONNX Runtime runs the final forward."""
        assert self.classifier is not None
        eps, pert, direction = self.perturbation_epsilon, self.use_perturbation, self.perturbation_direction
        if "classifier" in self._runners:
            out, xh = [], x.cpu()
            for i in range(0, len(xh), 1024):
                xb = xh[i : i + 1024]
                if pert and eps > 0:
                    xb = perturb(self.classifier, xb, eps, direction)
                logits = torch.from_numpy(self._runners["classifier"].run(xb)[0])
                out.append(torch.softmax(logits, dim=1)[:, 1])
            return (torch.cat(out).float() if out else torch.zeros(0)).to(x.device)
        net = self.classifier
        return abnormal_probability(net, x.to(_module_device(net)), eps, pert, direction).to(x.device)

    @property
    def fitted(self) -> bool:
        return self.model is not None and self.model.fitted

    @property
    def memory_bank_size(self) -> int:
        return 0 if self.model is None else int(self.model.memory_bank.shape[0])

    # -- features ------------------------------------------------------------------------------

    def _normalize(self, xyz: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Network input: per-patch unit ball, or (``patch_scale="fixed"``) the median radius of
        the normal training patches as one length for all patches."""
        assert self.model is not None
        return self.model.normalize(xyz, self.patch_scale == "fixed")

    def _geometry_points(self, cloud: PreparedCloud, device: torch.device) -> torch.Tensor:
        """``cloud``'s voxel centroids on ``device`` for the device path: float64 on a CPU (the
        precision of open3d's and the KD-tree's arithmetic), float32 on a GPU. A frame prepared
        on the device (``PreparedCloud.device_points``) is used where it lies: no upload."""
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        pts = cloud.device_points
        if pts is None or pts.device != device:
            pts = torch.from_numpy(np.asarray(cloud.points))
        pts = pts.to(device=device, dtype=dtype)
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < MIN_POINTS or not bool(torch.isfinite(pts).all()):
            check_points(np.asarray(cloud.points))  # raises with the CPU path's message
        return pts

    def _prepare(
        self, cloud: PreparedCloud, timings: dict[str, float] | None = None, device: torch.device | None = None
    ) -> Prepared:
        """FPFH and patches of ``cloud`` on ``device`` (default: the scorer's; FPFH by open3d on a
        CPU, where it is faster, by ``workers.geometry`` on a GPU)."""
        dev = self.device if device is None else device
        t0 = time.perf_counter()
        pts = self._geometry_points(cloud, dev)
        fpfh = fpfh_features(pts, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor).to(pts.dtype)
        _sync(dev)
        t1 = time.perf_counter()
        sf = vs = None
        if cloud.frame is not None and cloud.frame.organized and self.patch_mode != "unorganized":
            sf = torch.from_numpy(np.asarray(cloud.source_flat)).to(dev).long()
            vs = torch.from_numpy(np.asarray(cloud.voxel_of_source)).to(dev).long()
        patches = extract_patches(
            cloud, pts, self.patch_points, self.patch_mode, self.unorganized_patches, self.min_cell_pixels,
            self.crop_to_part, sf, vs,
        )
        xyz = pts.float()[patches.neighbors]
        prep = Prepared(cloud, pts, fpfh, patches, patches.pooled(fpfh, self.fpfh_pool), xyz, sf, vs)
        _sync(dev)
        if timings is not None:
            timings.update({"fpfh": t1 - t0, "patches": time.perf_counter() - t1})
        return prep

    @torch.no_grad()
    def _rgb_cells(self, cloud: PreparedCloud) -> np.ndarray:
        """784×C PatchCore features (layer2 ‖ layer3, 3×3 avg-pooled) of an organized RGB frame."""
        assert self.rgb_model is not None
        frame = cloud.frame
        if frame is None or not frame.organized or frame.rgb is None:
            raise ValueError("the zeroshot model has an RGB branch: every cloud needs an organized frame with RGB")
        dev = next(self.rgb_model.parameters()).device
        img = torch.from_numpy(np.ascontiguousarray(frame.rgb)).permute(2, 0, 1)[None].float().to(dev) / 255.0
        img = F.interpolate(img, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        img = (img - torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD, device=dev).view(1, 3, 1, 1)
        feats = self.rgb_model.forward_features(img, ("layer2", "layer3"))
        l2 = F.avg_pool2d(feats["layer2"], 3, 1, 1)
        l3 = F.avg_pool2d(feats["layer3"], 3, 1, 1)
        l3 = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.cat([l2, l3], dim=1)[0]
        return out.reshape(out.shape[0], -1).T.cpu().numpy()

    def _blocks(self, prep: Prepared, timings: dict[str, float] | None = None) -> list[torch.Tensor]:
        """The raw feature blocks (FPFH, learned, RGB as present) of one cloud's patches, float32
        on its device (the RGB branch, when present, runs on the CPU; its cell features are uploaded)."""
        dev = prep.xyz.device
        t0 = time.perf_counter()
        blocks = [prep.patch_fpfh.float()]
        if self.encoder is not None:
            blocks.append(self._encode(self._normalize(prep.xyz)))
        _sync(dev)
        if timings is not None:
            timings["encoder"] = time.perf_counter() - t0
        if self.rgb_model is not None:
            if prep.patches.cells is None:
                raise ValueError("the zeroshot model has an RGB branch: it needs organized patches")
            rgb = self._rgb_cells(prep.cloud)[prep.patches.cells.cpu().numpy()]
            blocks.append(torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).to(dev))
        return blocks

    # -- fit -----------------------------------------------------------------------------------

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        """Fit on good parts of other products (see the module docstring: bank = ``clouds``'
        patches; POIs from ``clouds`` too, only attached across products)."""
        with torch_threads(self.torch_threads):
            self._fit(clouds, None, progress)

    def fit_zero_shot(
        self, train: Sequence[PreparedCloud], auxiliary: Sequence[PreparedCloud], progress: bool = False
    ) -> None:
        """The paper's protocol: normal patches and memory bank from ``train`` (one training
        class), points of interest from the task-irrelevant ``auxiliary`` clouds only."""
        if len(auxiliary) == 0:
            raise ValueError("fit_zero_shot needs task-irrelevant auxiliary clouds")
        with torch_threads(self.torch_threads):
            self._fit(train, auxiliary, progress)

    def _fit(
        self, clouds: Sequence[PreparedCloud], auxiliary: Sequence[PreparedCloud] | None, progress: bool
    ) -> None:
        """Fit on the CPU (``workers.zeroshot.fitting``), then set the chosen backend up again."""
        self.device, self._runners = torch.device("cpu"), {}
        self.fit_info = fit_model(self, clouds, auxiliary, progress)
        self.use_backend(self.backend, self._cache_dir)

    # -- score ---------------------------------------------------------------------------------

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        if not self.fitted:
            raise RuntimeError("zeroshot is not fitted: call fit() or load an artifact first")
        with torch_threads(self.torch_threads):
            return self._score(cloud)

    def patch_scores(
        self, prep: Prepared, timings: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(distance score per patch / dist_scale, S_abnormal per patch (zeros without a
        classifier)) as float32 tensors on ``prep``'s device, and PatchCore's weight w of the maximal patch."""
        assert self.model is not None
        dev = prep.xyz.device
        inner: dict[str, float] = {}
        blocks = self._blocks(prep, inner)
        t0 = time.perf_counter()
        dist, w = self.model.distances(self.model.combine(blocks, self.learned_weight), self.reweight_neighbors)
        t1 = time.perf_counter()
        if self.use_classifier and self.classifier is not None:
            cls = self._abnormal(self._normalize(prep.xyz))
        else:
            cls = torch.zeros(dist.shape[0], dtype=torch.float32, device=dev)
        _sync(dev)
        if timings is not None:
            timings.update({"encoder": inner.get("encoder", 0.0), "search": t1 - t0,
                            "classifier": time.perf_counter() - t1})
        return dist.float(), cls, w

    def _score(self, cloud: PreparedCloud) -> ScoreResult:
        """One upload of the points (none when the frame was prepared on the device), the
        per-point scores and two scalars back."""
        timings: dict[str, float] = {}
        prep = self._prepare(cloud, timings)
        dist, cls, w = self.patch_scores(prep, timings)
        t2 = time.perf_counter()
        use_c = self.use_classifier and self.classifier is not None
        lam_c = self.classifier_weight if use_c else 0.0
        values = self.distance_weight * dist + lam_c * cls
        if prep.patches.organized:
            points = organized_point_scores(values, prep.patches, cloud, self.blur_sigma, prep.source_flat,
                                              prep.voxel_of_source)
        else:
            points = cloud_point_scores(values, prep.patches, prep.points, self.cloud_blur_k,
                                          self.cloud_blur_sigma_factor * self.voxel_size)
        maxima = torch.stack([dist.max(), cls.max() if cls.numel() else dist.new_zeros(())]).tolist()
        s_dist = w * float(maxima[0])  # Eq. 4–6
        s_cls = float(maxima[1]) if use_c else 0.0  # Eq. 9
        obj = self.distance_weight * s_dist + lam_c * s_cls  # Eq. 12
        point_scores = points.cpu().numpy().astype(np.float32)
        t3 = time.perf_counter()
        return ScoreResult(object_score=float(obj), point_scores=point_scores, timings={**timings, "upsample": t3 - t2})


def _module_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so stage timings are not just launch times (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
