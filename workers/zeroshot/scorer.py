"""3DzAL as the ``zeroshot`` scorer: anomaly maps for a product never seen in training.
Design, paper sections, choices and measurements: docs/design/zeroshot.md.
"""

from __future__ import annotations

import copy
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
from scipy.spatial import cKDTree

from workers.backends import NetworkRunner
from workers.base import Scorer, ScoreResult
from workers.components.fpfh import MIN_POINTS, check_points, fpfh_features, fpfh_features_torch
from workers.components.memory_bank import MemoryBank, greedy_coreset
from workers.preprocess import PreparedCloud
from workers.zeroshot.params import ZeroShotParams, parse_mix
from workers.zeroshot.patches import (
    IMAGE_SIZE,
    DevicePatchSet,
    PatchSet,
    cloud_point_scores,
    cloud_point_scores_t,
    extract_patches,
    extract_patches_t,
    normalize_patches,
    organized_point_scores,
    organized_point_scores_t,
    patch_radius,
)
from workers.zeroshot.pointnet2 import PointNet2
from workers.zeroshot.pseudo_anomalies import NormalCloud, collect_pois, generate_pseudo_anomalies
from workers.zeroshot.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet50, load_checkpoint
from workers.zeroshot.training import (
    TrainConfig,
    abnormal_probability,
    abnormal_probability_tensor,
    encode,
    perturb,
    train_networks,
)

log = logging.getLogger("inspectd.zeroshot")

FPFH_DIM = 33
FEATURE_DIM = FPFH_DIM
"""The learned feature has the FPFH's dimension so that Eq. 2's cosine is defined."""


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
class _Prepared:
    cloud: PreparedCloud
    tree: cKDTree
    fpfh: np.ndarray
    patches: PatchSet
    patch_fpfh: np.ndarray
    xyz: np.ndarray
    """P×k×3 float32 absolute patch points."""


@dataclass
class _DevicePrepared:
    """:class:`_Prepared` of the device path: every array a tensor on the scorer's device."""

    cloud: PreparedCloud
    points: torch.Tensor
    """M×3 voxel centroids in the geometry dtype (float64 on a CPU, float32 on a GPU)."""
    fpfh: torch.Tensor
    """M×33 float32."""
    patches: DevicePatchSet
    patch_fpfh: torch.Tensor
    """P×33 float32."""
    xyz: torch.Tensor
    """P×k×3 float32 absolute patch points."""
    source_flat: torch.Tensor | None
    voxel_of_source: torch.Tensor | None
    """Organized clouds: ``cloud``'s pixel → voxel arrays on the device (None otherwise)."""

    def to_host(self) -> _Prepared:
        """The numpy :class:`_Prepared` of the same patches (``fit``: pseudo anomalies need a KD-tree)."""
        pts = self.cloud.points
        return _Prepared(self.cloud, cKDTree(pts), self.fpfh.cpu().numpy(), self.patches.to_host(),
                         self.patch_fpfh.cpu().numpy(), self.xyz.cpu().numpy())


class ZeroShotScorer(Scorer):
    """3DzAL (see the module docstring). Ablation knobs: ``use_learned``, ``use_classifier``,
    ``use_perturbation``, ``pseudo_mix``, ``contrastive_weight``, ``disentangle_weight``.
    ``geometry_impl`` ("auto" | "numpy" | "torch", saved with the params) picks the patch
    pipeline: numpy/open3d on the CPU, or torch on the scorer's device (module docstring,
    "Device path")."""

    name = "zeroshot"
    version = "1.0.0"
    backends = ("torch-cpu", "torch-cuda", "onnxruntime")
    preprocess_overrides = {"organized": "voxel"}
    """Its patches, pseudo-anomalies and published figures are on voxel-grid samples; on camera-grid
    blocks its toy dent test loses its margin, and that path is not measured for it."""

    Params = ZeroShotParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.encoder: PointNet2 | None = None
        self.classifier: PointNet2 | None = None
        self.rgb_model: ResNet50 | None = None
        self._bank: MemoryBank | None = None
        self._block_scale: np.ndarray | None = None
        self._fpfh_mean: np.ndarray | None = None
        self._dist_scale: float = 1.0
        self._patch_scale: float = 1.0
        self.fit_info: dict[str, Any] = {}
        self.backend = "torch-cpu"
        self.device = torch.device("cpu")
        self._cache_dir: Path | None = None
        self._dev_encoder: PointNet2 | None = None
        self._dev_classifier: PointNet2 | None = None
        """f_θ and g_φ on ``device`` (torch-cuda); None: the CPU modules themselves."""
        self._runners: dict[str, NetworkRunner] = {}
        """ONNX Runtime runners of f_θ / g_φ (``onnxruntime``)."""

    # -- state ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        if self._bank is None or self._block_scale is None or self._fpfh_mean is None:
            raise RuntimeError("zeroshot is not fitted: nothing to save")
        out: dict[str, np.ndarray] = {
            "memory_bank": self._bank.array,
            "block_scale": self._block_scale.astype(np.float32),
            "fpfh_mean": self._fpfh_mean.astype(np.float32),
            "dist_scale": np.asarray([self._dist_scale], dtype=np.float32),
            "patch_scale": np.asarray([self._patch_scale], dtype=np.float32),
        }
        for prefix, net in (("encoder.", self.encoder), ("classifier.", self.classifier), ("rgb.", self.rgb_model)):
            if net is not None:
                out.update({prefix + k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
        return out

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> ZeroShotScorer:
        for key in ("memory_bank", "block_scale", "fpfh_mean", "dist_scale"):
            if key not in tensors:
                raise ValueError(f"zeroshot state has no {key!r} tensor")
        scorer = cls(**params)

        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith(prefix)}

        enc, clf, rgb = sub("encoder."), sub("classifier."), sub("rgb.")
        if enc:
            scorer.encoder = PointNet2(FEATURE_DIM, width=scorer.width)
            scorer.encoder.load_state_dict(enc)
            scorer.encoder.eval()
        if clf:
            scorer.classifier = PointNet2(2, width=scorer.width)
            scorer.classifier.load_state_dict(clf)
            scorer.classifier.eval()
        if rgb:
            scorer.rgb_model = ResNet50(width_per_group=int(rgb["layer1.0.conv1.weight"].shape[0]))
            scorer.rgb_model.layer4 = torch.nn.Sequential()  # as fitted: the features stop at layer3
            scorer.rgb_model.fc = torch.nn.Identity()
            scorer.rgb_model.load_state_dict(rgb)
            scorer.rgb_model.eval()
        scorer._block_scale = np.asarray(tensors["block_scale"], dtype=np.float32)
        scorer._fpfh_mean = np.asarray(tensors["fpfh_mean"], dtype=np.float32)
        scorer._dist_scale = float(np.asarray(tensors["dist_scale"]).reshape(-1)[0])
        if "patch_scale" in tensors:
            scorer._patch_scale = float(np.asarray(tensors["patch_scale"]).reshape(-1)[0])
        n_blocks = 1 + int(scorer.encoder is not None) + int(scorer.rgb_model is not None)
        if len(scorer._block_scale) != n_blocks:
            raise ValueError(f"zeroshot state: {len(scorer._block_scale)} block scales for {n_blocks} feature blocks")
        scorer._set_bank(np.asarray(tensors["memory_bank"]))
        return scorer

    def _set_bank(self, bank: np.ndarray) -> None:
        self._bank = MemoryBank(bank, "cuda" if self.backend == "torch-cuda" else "cpu")

    # -- backends ------------------------------------------------------------------------------

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        """Run the networks (and, on CUDA, the memory bank) on ``backend`` (see the module
        docstring). Before ``fit`` this only records the choice."""
        super().use_backend(backend, cache_dir)
        self.backend = backend
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = torch.device("cuda" if backend == "torch-cuda" else "cpu")
        self._dev_encoder = self._dev_classifier = None
        self._runners = {}
        if self._bank is not None:
            self._bank = self._bank.to("cuda" if backend == "torch-cuda" else "cpu")
        if backend == "torch-cuda":
            if self.encoder is not None:
                self._dev_encoder = copy.deepcopy(self.encoder).to(self.device).eval()
            if self.classifier is not None:
                self._dev_classifier = copy.deepcopy(self.classifier).to(self.device).eval()
        elif backend == "onnxruntime":
            from workers.backends import make_runner

            example = [torch.zeros(2, self.patch_points, 3).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))]
            for name, net in (("encoder", self.encoder), ("classifier", self.classifier)):
                if net is not None:
                    self._runners[name] = make_runner("onnxruntime", net, example, threads=max(1, self.torch_threads))
        log.info("3DzAL networks on %s", backend)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """f_θ's L2-normalized features of normalized patches (CPU tensor), on the chosen backend."""
        assert self.encoder is not None
        if "encoder" in self._runners:
            run = self._runners["encoder"].run
            out = [F.normalize(torch.from_numpy(run(x[i : i + 1024])[0]), dim=1) for i in range(0, len(x), 1024)]
            return torch.cat(out) if out else torch.zeros(0, 0)
        if self._dev_encoder is not None:
            return encode(self._dev_encoder, x.to(self.device)).cpu()
        return encode(self.encoder, x)

    def _abnormal(self, x: torch.Tensor) -> np.ndarray:
        """S_abnormal (Eq. 9–10) of normalized patches, on the chosen backend."""
        assert self.classifier is not None
        eps, pert, direction = self.perturbation_epsilon, self.use_perturbation, self.perturbation_direction
        if "classifier" in self._runners:
            out = []
            for i in range(0, len(x), 1024):
                xb = x[i : i + 1024]
                if pert and eps > 0:
                    xb = perturb(self.classifier, xb, eps, direction)  # needs input gradients: torch
                logits = torch.from_numpy(self._runners["classifier"].run(xb)[0])
                out.append(torch.softmax(logits, dim=1)[:, 1])
            return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)
        if self._dev_classifier is not None:
            return abnormal_probability(self._dev_classifier, x.to(self.device), eps, pert, direction)
        return abnormal_probability(self.classifier, x, eps, pert, direction)

    def _encode_t(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_encode` for the device path: ``x`` and the result on ``x``'s device."""
        assert self.encoder is not None
        if "encoder" in self._runners:  # ONNX Runtime runs on the host
            return self._encode(x.cpu()).to(x.device)
        net = self._dev_encoder if self._dev_encoder is not None else self.encoder
        return encode(net, x.to(_module_device(net))).to(x.device)

    def _abnormal_t(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_abnormal` for the device path: Eq. 8's perturbation and g_φ on ``x``'s device
        (ONNX Runtime: on the host, as :meth:`_abnormal`)."""
        assert self.classifier is not None
        if "classifier" in self._runners:
            return torch.from_numpy(self._abnormal(x.cpu())).to(x.device)
        net = self._dev_classifier if self._dev_classifier is not None else self.classifier
        p = abnormal_probability_tensor(net, x.to(_module_device(net)), self.perturbation_epsilon,
                                        self.use_perturbation, self.perturbation_direction)
        return p.to(x.device)

    @property
    def geometry_path(self) -> str:
        """The patch pipeline in use for ``score``: ``geometry_impl`` with ``auto`` resolved by the
        device (``torch`` on a GPU, ``numpy`` — the reference CPU path — otherwise)."""
        if self.geometry_impl != "auto":
            return self.geometry_impl
        return "numpy" if self.device.type == "cpu" else "torch"

    @property
    def fitted(self) -> bool:
        return self._bank is not None

    @property
    def memory_bank_size(self) -> int:
        return 0 if self._bank is None else len(self._bank)

    # -- features ------------------------------------------------------------------------------

    def _normalize(self, xyz: np.ndarray) -> torch.Tensor:
        """Network input: per-patch unit ball, or (``patch_scale="fixed"``) the median radius of
        the normal training patches as one length for all patches."""
        return normalize_patches(xyz, self._patch_scale if self.patch_scale == "fixed" else None)

    def _prepare(self, cloud: PreparedCloud, timings: dict[str, float] | None = None) -> _Prepared:
        t0 = time.perf_counter()
        fpfh = fpfh_features(cloud.points, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor)
        t1 = time.perf_counter()
        tree = cKDTree(cloud.points)
        patches = extract_patches(
            cloud, self.patch_points, self.patch_mode, self.unorganized_patches, self.min_cell_pixels, tree,
            self.crop_to_part,
        )
        prep = _Prepared(
            cloud, tree, fpfh, patches, patches.pooled(fpfh, self.fpfh_pool), cloud.points[patches.neighbors]
        )
        if timings is not None:
            timings.update({"fpfh": t1 - t0, "patches": time.perf_counter() - t1})
        return prep

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

    def _prepare_t(
        self, cloud: PreparedCloud, timings: dict[str, float] | None = None, device: torch.device | None = None
    ) -> _DevicePrepared:
        """:meth:`_prepare` in torch on ``device`` (default: the scorer's): FPFH by
        ``workers.geometry`` (``workers.components.fpfh.fpfh_features_torch``), patches by ``extract_patches_t``."""
        dev = self.device if device is None else device
        t0 = time.perf_counter()
        pts = self._geometry_points(cloud, dev)
        fpfh = fpfh_features_torch(pts, self.voxel_size, self.normal_radius_factor, self.feature_radius_factor).float()
        _sync(dev)
        t1 = time.perf_counter()
        sf = vs = None
        if cloud.frame is not None and cloud.frame.organized and self.patch_mode != "unorganized":
            sf = torch.from_numpy(np.asarray(cloud.source_flat)).to(dev).long()
            vs = torch.from_numpy(np.asarray(cloud.voxel_of_source)).to(dev).long()
        patches = extract_patches_t(
            cloud, pts, self.patch_points, self.patch_mode, self.unorganized_patches, self.min_cell_pixels,
            self.crop_to_part, sf, vs,
        )
        xyz = pts.float()[patches.neighbors]
        prep = _DevicePrepared(cloud, pts, fpfh, patches, patches.pooled(fpfh, self.fpfh_pool), xyz, sf, vs)
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
        img = torch.from_numpy(np.ascontiguousarray(frame.rgb)).permute(2, 0, 1)[None].float() / 255.0
        img = F.interpolate(img, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        img = (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        feats = self.rgb_model.forward_features(img, ("layer2", "layer3"))
        l2 = F.avg_pool2d(feats["layer2"], 3, 1, 1)
        l3 = F.avg_pool2d(feats["layer3"], 3, 1, 1)
        l3 = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.cat([l2, l3], dim=1)[0]
        return out.reshape(out.shape[0], -1).T.numpy()

    def _blocks(self, prep: Sequence[_Prepared], timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """The raw feature blocks (FPFH, learned, RGB as present) of the patches of ``prep``."""
        t0 = time.perf_counter()
        blocks = [np.concatenate([p.patch_fpfh for p in prep]).astype(np.float32)]
        if self.encoder is not None:
            x = self._normalize(np.concatenate([p.xyz for p in prep]))
            blocks.append(self._encode(x).numpy())
        if timings is not None:
            timings["encoder"] = time.perf_counter() - t0
        if self.rgb_model is not None:
            rgb = []
            for p in prep:
                if p.patches.cells is None:
                    raise ValueError("the zeroshot model has an RGB branch: it needs organized patches")
                rgb.append(self._rgb_cells(p.cloud)[p.patches.cells])
            blocks.append(np.concatenate(rgb).astype(np.float32))
        return blocks

    def _blocks_t(self, prep: _DevicePrepared, timings: dict[str, float] | None = None) -> list[torch.Tensor]:
        """:meth:`_blocks` of one device-prepared cloud, as tensors on its device (the RGB
        branch, when present, runs on the CPU and its cell features are uploaded)."""
        dev = prep.xyz.device
        t0 = time.perf_counter()
        blocks = [prep.patch_fpfh.float()]
        if self.encoder is not None:
            blocks.append(self._encode_t(self._normalize(prep.xyz)))
        _sync(dev)
        if timings is not None:
            timings["encoder"] = time.perf_counter() - t0
        if self.rgb_model is not None:
            if prep.patches.cells is None:
                raise ValueError("the zeroshot model has an RGB branch: it needs organized patches")
            rgb = self._rgb_cells(prep.cloud)[prep.patches.cells.cpu().numpy()]
            blocks.append(torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).to(dev))
        return blocks

    def _combine_t(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`_combine` on the blocks' device."""
        assert self._block_scale is not None
        weights = [1.0] + ([self.learned_weight] if self.encoder is not None else []) + (
            [1.0] if self.rgb_model is not None else []
        )
        return torch.cat(
            [b / float(s) * w for b, s, w in zip(blocks, self._block_scale, weights, strict=True)], dim=1
        ).float()

    def _combine(self, blocks: list[np.ndarray]) -> np.ndarray:
        assert self._block_scale is not None
        weights = [1.0] + ([self.learned_weight] if self.encoder is not None else []) + (
            [1.0] if self.rgb_model is not None else []
        )
        return np.concatenate(
            [b / s * w for b, s, w in zip(blocks, self._block_scale, weights, strict=True)], axis=1
        ).astype(np.float32)

    # -- fit -----------------------------------------------------------------------------------

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        """Fit on good parts of other products (see the module docstring: bank = ``clouds``'
        patches; POIs from ``clouds`` too, only attached across products)."""
        with torch_threads(self.torch_threads):
            self._fit(clouds, None, progress)
        self._restore_backend()

    def fit_zero_shot(
        self, train: Sequence[PreparedCloud], auxiliary: Sequence[PreparedCloud], progress: bool = False
    ) -> None:
        """The paper's protocol: normal patches and memory bank from ``train`` (one training
        class), points of interest from the task-irrelevant ``auxiliary`` clouds only."""
        if len(auxiliary) == 0:
            raise ValueError("fit_zero_shot needs task-irrelevant auxiliary clouds")
        with torch_threads(self.torch_threads):
            self._fit(train, auxiliary, progress)
        self._restore_backend()

    def _restore_backend(self) -> None:
        """After ``fit`` (on torch-cpu, fresh networks and bank): set the chosen backend up again."""
        if self.backend != "torch-cpu":
            self.use_backend(self.backend, self._cache_dir)

    def _prepare_fit(self, cloud: PreparedCloud) -> _Prepared:
        """A training cloud's patches. ``fit`` runs on the CPU, so ``geometry_impl="auto"`` takes
        the numpy path there; an explicit ``"torch"`` runs the device path's geometry on CPU
        tensors, so the bank and the block scales come from the features ``score`` will see."""
        if self.geometry_impl == "torch":
            return self._prepare_t(cloud, device=torch.device("cpu")).to_host()
        return self._prepare(cloud)

    def _fit(
        self, clouds: Sequence[PreparedCloud], auxiliary: Sequence[PreparedCloud] | None, progress: bool
    ) -> None:
        from tqdm import tqdm

        if len(clouds) == 0:
            raise ValueError("zeroshot needs at least one good training cloud")
        self._dev_encoder = self._dev_classifier = None  # fit runs on the CPU modules
        self._runners = {}
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        prep = [self._prepare_fit(c)
                for c in tqdm(clouds, desc="3dzal fpfh+patches", disable=not progress, leave=False)]
        t1 = time.perf_counter()
        info: dict[str, Any] = {"n_clouds": len(clouds), "n_patches": int(sum(len(p.patches) for p in prep))}
        all_fpfh = np.concatenate([p.patch_fpfh for p in prep])
        self._fpfh_mean = all_fpfh.mean(axis=0).astype(np.float32)

        self.encoder = self.classifier = None
        if self.use_learned or self.use_classifier:
            self._train(prep, clouds, auxiliary, rng, progress, info)
        t2 = time.perf_counter()

        self.rgb_model = self._load_rgb(clouds, prep)
        blocks = self._blocks(prep)
        rms = [max(float(np.sqrt(((b - b.mean(axis=0)) ** 2).sum(axis=1).mean())), 1e-6) for b in blocks]
        if self.encoder is not None:
            rms[1] = 1.0  # the learned block stays on its unit sphere (see the module docstring)
        self._block_scale = np.asarray(rms, dtype=np.float32)
        bank = self._combine(blocks)
        n_keep = self._coreset_size(len(bank))
        idx = np.arange(len(bank))
        if n_keep < len(bank):
            idx = greedy_coreset(bank, n_keep, self.coreset_projection_dim, self.seed, progress)
        self._set_bank(bank[idx])
        self._dist_scale = self._distance_scale(bank, idx)
        t3 = time.perf_counter()
        info.update(
            {
                "memory_bank": [int(self.memory_bank_size), int(bank.shape[1])],
                "dist_scale": self._dist_scale,
                "block_scale": self._block_scale.tolist(),
                "rgb_branch": self.rgb_model is not None,
                "seconds": {"features": t1 - t0, "train": t2 - t1, "bank": t3 - t2},
            }
        )
        self.fit_info = info
        log.info("3DzAL fitted: %s", {k: v for k, v in info.items() if k != "history"})

    def _coreset_size(self, n: int) -> int:
        if self.coreset_ratio >= 1.0:
            return min(n, self.coreset_max)
        return min(n, self.coreset_max, max(1, int(self.coreset_ratio * n)))

    def _distance_scale(self, bank: np.ndarray, kept: np.ndarray) -> float:
        """Mean distance of the left-out training patches to the coreset (see the module docstring)."""
        assert self._bank is not None
        rest = np.setdiff1d(np.arange(len(bank)), kept)
        if len(rest):
            d = self._bank.nearest_distances(self._bank.centre(torch.from_numpy(bank[rest]))).cpu()
        else:
            if len(bank) < 2:
                return 1.0
            t = torch.from_numpy(bank)
            d = torch.cat(
                [torch.cdist(t[i : i + 1024], t).scatter_(1, torch.arange(i, min(i + 1024, len(t)))[:, None], float("inf"))
                 .amin(dim=1) for i in range(0, len(t), 1024)]
            )
        scale = float(d.mean())
        return scale if scale > 1e-9 else 1.0

    def _train(
        self,
        prep: Sequence[_Prepared],
        clouds: Sequence[PreparedCloud],
        auxiliary: Sequence[PreparedCloud] | None,
        rng: np.random.Generator,
        progress: bool,
        info: dict[str, Any],
    ) -> None:
        # positives: the normal patches (a random subset of at most max_train_patches)
        xyz = np.concatenate([p.xyz for p in prep])
        fp = np.concatenate([p.patch_fpfh for p in prep])
        if self.disentangle_centered:
            fp = fp - self._fpfh_mean
        sel = rng.permutation(len(xyz))[: self.max_train_patches] if self.max_train_patches > 0 else np.arange(len(xyz))
        if self.patch_scale == "fixed":
            self._patch_scale = float(patch_radius(xyz[sel]).median())
        positives = self._normalize(xyz[sel])
        positive_fpfh = torch.from_numpy(np.ascontiguousarray(fp[sel], dtype=np.float32))

        # negatives: pseudo anomalies; POIs from task-irrelevant data
        products = [_product(c) for c in clouds]
        if auxiliary is None:
            sources = list(clouds)
            if len(set(products)) < 2:
                log.warning("3DzAL: all training clouds are one product (%r): points of interest are taken from it, "
                            "there is no task-irrelevant data", products[0])
        else:
            sources = list(auxiliary)
        sources = _stratified(sources, self.poi_max_sources, rng)
        mix = parse_mix(self.pseudo_mix)
        t0 = time.perf_counter()
        pool = collect_pois(sources, self.poi_percent / 100.0, seed=self.seed, crop=self.crop_to_part) if mix > 0 else None
        t1 = time.perf_counter()
        normals = [NormalCloud(p.cloud.points, p.tree, products[i]) for i, p in enumerate(prep)]
        n_neg = max(1, int(round(self.negative_ratio * len(sel))))
        if pool is None:  # removing-only: no POIs needed
            from workers.zeroshot.pseudo_anomalies import PoiPool

            pool = PoiPool([], [], [], [])
        neg, kind = generate_pseudo_anomalies(
            normals, pool, n_neg, self.patch_points, mix, self.part_points,
            (self.remove_ratio_min, self.remove_ratio_max), self.rotate_parts, rng,
        )
        negatives = self._normalize(neg)
        t2 = time.perf_counter()
        cfg = TrainConfig(
            epochs=self.epochs, batch_positives=self.batch_positives, lr=self.lr, temperature=self.temperature,
            contrastive_weight=self.contrastive_weight, disentangle_weight=self.disentangle_weight,
            disentangle_warmup=self.disentangle_warmup,
            feature_dim=FEATURE_DIM, width=self.width, seed=self.seed,
        )
        self.encoder, self.classifier, history = train_networks(
            positives, positive_fpfh, negatives, cfg, self.use_learned, self.use_classifier, progress,
            self.checkpoint_dir,
        )
        t3 = time.perf_counter()
        info.update(
            {
                "n_positives": len(sel),
                "n_negatives": int(n_neg),
                "n_adding": int(kind.sum()),
                "poi_sources": len(sources),
                "n_pois": int(sum(len(p) for p in pool.poi)),
                "history": history,
                "train_seconds": {"pois": t1 - t0, "pseudo": t2 - t1, "networks": t3 - t2},
            }
        )

    def _load_rgb(self, clouds: Sequence[PreparedCloud], prep: Sequence[_Prepared]) -> ResNet50 | None:
        if not self.rgb_checkpoint:
            log.info("3DzAL: RGB branch left out (no rgb_checkpoint: no local ImageNet checkpoint given; "
                     "nothing is downloaded)")
            return None
        ok = all(c.frame is not None and c.frame.organized and c.frame.rgb is not None for c in clouds) and all(
            p.patches.organized for p in prep
        )
        if not ok:
            log.warning("3DzAL: RGB branch left out: not every training frame is organized with an RGB image")
            return None
        try:
            model = load_checkpoint(self.rgb_checkpoint)
        except (OSError, ValueError) as exc:  # the operator asked for the RGB branch: do not drop it silently
            raise ValueError(f"3DzAL: rgb_checkpoint {self.rgb_checkpoint} cannot be used ({exc}); give a local "
                             "ImageNet ResNet-50 checkpoint or leave rgb_checkpoint empty") from exc
        log.info("3DzAL: RGB branch on (%s)", self.rgb_checkpoint)
        # keep only what the features use (no layer4 / fc in the artifact)
        model.layer4 = torch.nn.Sequential()
        model.fc = torch.nn.Identity()  # type: ignore[assignment]
        return model

    # -- score ---------------------------------------------------------------------------------

    def patch_scores(
        self, prep: _Prepared, timings: dict[str, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(distance score per patch / dist_scale, S_abnormal per patch (zeros without a
        classifier), PatchCore's weight w of the maximal patch)."""
        assert self._bank is not None
        inner: dict[str, float] = {}
        blocks = self._blocks([prep], inner)
        t0 = time.perf_counter()
        feats = self._combine(blocks)
        q = self._bank.centre(torch.from_numpy(feats))
        dist = self._bank.nearest_distances(q).cpu().numpy() / self._dist_scale
        star = int(np.argmax(dist))
        w = self._bank.reweight(q[star], self.reweight_neighbors)
        t1 = time.perf_counter()
        if self.use_classifier and self.classifier is not None:
            cls = self._abnormal(self._normalize(prep.xyz))
        else:
            cls = np.zeros(len(dist), dtype=np.float32)
        if timings is not None:
            timings.update({"encoder": inner.get("encoder", 0.0), "search": t1 - t0,
                            "classifier": time.perf_counter() - t1})
        return dist.astype(np.float32), cls, w

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        if self._bank is None:
            raise RuntimeError("zeroshot is not fitted: call fit() or load an artifact first")
        with torch_threads(self.torch_threads):
            return self._score(cloud)

    def _patch_scores_t(
        self, prep: _DevicePrepared, timings: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """:meth:`patch_scores` on the device: (distance / dist_scale, S_abnormal) as float32
        tensors on the scorer's device, and PatchCore's weight w."""
        assert self._bank is not None
        dev = prep.xyz.device
        inner: dict[str, float] = {}
        blocks = self._blocks_t(prep, inner)
        t0 = time.perf_counter()
        feats = self._combine_t(blocks)
        q = self._bank.centre(feats)
        dist = (self._bank.nearest_distances(q) / self._dist_scale).to(dev)
        star = int(torch.argmax(dist))
        w = self._bank.reweight(q[star], self.reweight_neighbors)
        t1 = time.perf_counter()
        if self.use_classifier and self.classifier is not None:
            cls = self._abnormal_t(self._normalize(prep.xyz))
        else:
            cls = torch.zeros(dist.shape[0], dtype=torch.float32, device=dev)
        _sync(dev)
        if timings is not None:
            timings.update({"encoder": inner.get("encoder", 0.0), "search": t1 - t0,
                            "classifier": time.perf_counter() - t1})
        return dist.float(), cls, w

    def _score_t(self, cloud: PreparedCloud) -> ScoreResult:
        """The device path of :meth:`score` (see the module docstring): one upload of the points
        (none when the frame was prepared on the device), the per-point scores and two scalars back."""
        timings: dict[str, float] = {}
        prep = self._prepare_t(cloud, timings)
        dist, cls, w = self._patch_scores_t(prep, timings)
        t2 = time.perf_counter()
        use_c = self.use_classifier and self.classifier is not None
        lam_c = self.classifier_weight if use_c else 0.0
        values = self.distance_weight * dist + lam_c * cls
        if prep.patches.organized:
            points = organized_point_scores_t(values, prep.patches, cloud, self.blur_sigma, prep.source_flat,
                                              prep.voxel_of_source)
        else:
            points = cloud_point_scores_t(values, prep.patches, prep.points, self.cloud_blur_k,
                                          self.cloud_blur_sigma_factor * self.voxel_size)
        maxima = torch.stack([dist.max(), cls.max() if cls.numel() else dist.new_zeros(())]).tolist()
        s_dist = w * float(maxima[0])  # Eq. 4–6
        s_cls = float(maxima[1]) if use_c else 0.0  # Eq. 9
        obj = self.distance_weight * s_dist + lam_c * s_cls  # Eq. 12
        point_scores = points.cpu().numpy().astype(np.float32)
        t3 = time.perf_counter()
        return ScoreResult(object_score=float(obj), point_scores=point_scores, timings={**timings, "upsample": t3 - t2})

    def _score(self, cloud: PreparedCloud) -> ScoreResult:
        if self.geometry_path == "torch":
            return self._score_t(cloud)
        timings: dict[str, float] = {}
        prep = self._prepare(cloud, timings)
        dist, cls, w = self.patch_scores(prep, timings)
        t2 = time.perf_counter()
        use_c = self.use_classifier and self.classifier is not None
        lam_c = self.classifier_weight if use_c else 0.0
        values = self.distance_weight * dist + lam_c * cls
        if prep.patches.organized:
            points = organized_point_scores(values, prep.patches, cloud, self.blur_sigma)
        else:
            points = cloud_point_scores(
                values, prep.patches, cloud.points, prep.tree, self.cloud_blur_k,
                self.cloud_blur_sigma_factor * self.voxel_size,
            )
        s_dist = w * float(dist.max())  # Eq. 4–6
        s_cls = float(cls.max()) if use_c else 0.0  # Eq. 9
        obj = self.distance_weight * s_dist + lam_c * s_cls  # Eq. 12
        t3 = time.perf_counter()
        return ScoreResult(
            object_score=float(obj),
            point_scores=points.astype(np.float32),
            timings={**timings, "upsample": t3 - t2},
        )


def _module_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so stage timings are not just launch times (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _product(cloud: PreparedCloud) -> str:
    return cloud.frame.meta.product if cloud.frame is not None else ""


def _stratified(clouds: Sequence[PreparedCloud], n: int, rng: np.random.Generator) -> list[PreparedCloud]:
    """At most ``n`` clouds, drawn round-robin over products (each product's order shuffled)."""
    if n <= 0 or len(clouds) <= n:
        return list(clouds)
    by: dict[str, list[int]] = {}
    for i, c in enumerate(clouds):
        by.setdefault(_product(c), []).append(i)
    queues = [list(rng.permutation(v)) for _, v in sorted(by.items())]
    out: list[int] = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop()))
    return [clouds[i] for i in sorted(out)]
