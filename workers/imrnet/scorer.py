"""The ``imrnet`` scorer: IMRNet (Li et al., CVPR 2024) behind the :class:`workers.base.Scorer`
interface. Design, paper sections, choices and measurements: docs/design/imrnet.md.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.backends import NetworkRunner, TorchRunner
from workers.base import Scorer, ScoreResult
from workers.components.knn import knn
from workers.components.registration import Registrar
from workers.imrnet.align import align_registrar, apply, icp_align, register_global, rotation_deg
from workers.imrnet.fitting import CONFIG_KEYS, fit_model
from workers.imrnet.network import IMRNet, IMRNetConfig, chamfer_l2, mask_count
from workers.imrnet.params import IMRNetParams
from workers.imrnet.sampling import geometry_rates, group_patches, local_geometry, sample_centers
from workers.imrnet.torch_model import IMRNetModel
from workers.imrnet.training import (
    GEOMETRY_K,
    reduce_points,
)
from workers.preprocess import PreparedCloud

log = logging.getLogger("inspectd.imrnet")

MIN_POINTS = 10


def idw_interpolate(src: torch.Tensor, values: torch.Tensor, dst: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Values at ``dst`` (M×3) by inverse-distance weighting of the ``k`` nearest ``src`` points
    (float64 arithmetic on their device), float32 out."""
    k = min(k, len(src))
    d, i = knn(src.double(), dst.double(), k)
    w = 1.0 / d.clamp(min=1e-8)
    return ((values.double()[i] * w).sum(dim=1) / w.sum(dim=1)).float()


def patches_to_points(values: torch.Tensor, members: torch.Tensor, points: torch.Tensor, centers: torch.Tensor
                      ) -> torch.Tensor:
    """Per-patch values (n,) → per point (N,): the mean over the patches holding the point.

    ``members`` (n×k) are the patches' point indices into ``points`` (N×3); a point in no patch gets
    the inverse-distance-weighted value of its 3 nearest patch centres. Sums in float64; the
    centre interpolation is evaluated for every point and kept where no patch holds it, so the
    host never has to count them. A float32 tensor on the values' device.
    """
    n_pts = points.shape[0]
    flat = members.reshape(-1)
    counts = torch.bincount(flat, minlength=n_pts).double()
    sums = torch.zeros(n_pts, dtype=torch.float64, device=values.device).index_add_(
        0, flat, values.double().repeat_interleave(members.shape[1]))
    mean = (sums / counts.clamp(min=1.0)).float()
    fill = idw_interpolate(centers, values.float(), points)
    return torch.where(counts > 0, mean, fill)


def nearest_sq_dist(query: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared Euclidean distance (and index) from every query row to its nearest bank row."""
    bank_sq = (bank * bank).sum(dim=1)
    ds, ids = [], []
    for s in range(0, query.shape[0], chunk):
        q = query[s : s + chunk]
        d = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, beta=1.0, alpha=-2.0) + (q * q).sum(dim=1, keepdim=True)
        v, i = d.min(dim=1)
        ds.append(v.clamp_(min=0.0))
        ids.append(i)
    return torch.cat(ds), torch.cat(ids)


class IMRNetScorer(Scorer):
    """IMRNet: GPS + masked point-patch reconstruction + iterative restoration + DFC."""

    name = "imrnet"
    version = "1.0.0"
    score_domain = "real"  # standardized by good-part statistics: good parts score around 0, some below
    backends = ("torch-cpu", "torch-cuda", "onnxruntime", "tensorrt")

    Params = IMRNetParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.config = IMRNetConfig(**{k: getattr(self.hparams, k) for k in CONFIG_KEYS})
        self.state: IMRNetModel | None = None
        """The network with its template, reference scores and pose, statistics (``torch_model``)."""
        self.fit_info: dict[str, Any] = {}
        self.train_checkpoint: Path | None = None
        """Where ``fit`` keeps a resumable fine-tuning state (``inspectd train``); None: none."""
        self.train_resume = False
        self.backend = "torch-cpu"
        self._cache_dir: Path | None = None
        self._runners: dict[str, NetworkRunner] | None = None
        """The two graphs on a non-reference backend (None: the torch module on the CPU)."""
        self._device_cache: dict[str, tuple[Any, torch.device, torch.Tensor]] = {}
        """Copies of fitted state on the geometry device: name → (source object, device, copy)."""
        self._registrar_of: tuple[Any, Registrar] | None = None
        """The shared registration onto ``align_reference`` and the reference it was built on."""

    # -- state ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        if not self.fitted:
            raise RuntimeError("imrnet is not fitted: nothing to save")
        assert self.state is not None
        return self.state.tensors()

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> IMRNetScorer:
        scorer = cls(**params)
        scorer.state = IMRNetModel.from_tensors(tensors, scorer.config)
        return scorer

    def _model(self) -> IMRNetModel:
        if self.state is None:
            self.state = IMRNetModel()
        return self.state

    # the fitted state, read and written through the torch model's buffers

    @property
    def model(self) -> IMRNet | None:
        return None if self.state is None else self.state.net

    @model.setter
    def model(self, net: IMRNet) -> None:
        self._model().net = net

    @property
    def template(self) -> torch.Tensor | None:
        return None if self.state is None or not self.state.template.numel() else self.state.template

    @template.setter
    def template(self, t: torch.Tensor) -> None:
        self._model().template = t

    @property
    def template_ref(self) -> torch.Tensor | None:
        return None if self.state is None or not self.state.template_ref.numel() else self.state.template_ref

    @template_ref.setter
    def template_ref(self, t: torch.Tensor | None) -> None:
        self._model().template_ref = torch.zeros(0) if t is None else t

    @property
    def align_reference(self) -> torch.Tensor | None:
        ref = None if self.state is None else self.state.align_reference
        return ref if ref is not None and ref.numel() else None

    @align_reference.setter
    def align_reference(self, ref: np.ndarray | torch.Tensor | None) -> None:
        self._model().align_reference = torch.zeros(0) if ref is None else torch.as_tensor(ref, dtype=torch.float32)

    @property
    def stats(self) -> np.ndarray:
        return self._model().score_stats.cpu().numpy()

    @stats.setter
    def stats(self, values: np.ndarray) -> None:
        self._model().score_stats = torch.as_tensor(np.asarray(values, dtype=np.float64))

    @property
    def norm_scale(self) -> float:
        return float(self._model().scalars[0])

    @norm_scale.setter
    def norm_scale(self, value: float) -> None:
        self._model().scalars[0] = float(value)

    @property
    def template_tau(self) -> float:
        return float(self._model().scalars[1])

    @template_tau.setter
    def template_tau(self, value: float) -> None:
        self._model().scalars[1] = float(value)

    @property
    def fitted(self) -> bool:
        return self.model is not None and self.template is not None

    # -- backends ------------------------------------------------------------------------------

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        """Run the network's two graphs on ``backend`` (see the module docstring); ONNX exports and
        TensorRT engines are cached under ``cache_dir``. Before ``fit`` this only records the choice."""
        super().use_backend(backend, cache_dir)
        self.backend = backend
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._runners = None
        if backend != "torch-cpu" and self.model is not None:
            self._runners = self._make_runners(backend)
        log.info("imrnet network on %s", backend)

    @property
    def device(self) -> torch.device:
        """Where the geometry of ``score`` runs: the GPU for ``torch-cuda``, else the CPU."""
        return torch.device("cuda" if self.backend == "torch-cuda" else "cpu")

    def _on(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The fitted tensor ``name`` (``template``, ``template_ref``, ``align_reference``) on
        ``device``, copied once and kept until the attribute is replaced (fit, load)."""
        obj = getattr(self, name)
        if obj is None:
            return None
        hit = self._device_cache.get(name)
        if hit is not None and hit[0] is obj and hit[1] == device:
            return hit[2]
        t = obj if isinstance(obj, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(obj))
        t = t.to(device)
        if name == "align_reference":  # with the reference normals ICP needs (16-NN PCA, float64)
            t = t.double()
            self._device_cache["align_normals"] = (obj, device, local_geometry(t, 16)[0])
        self._device_cache[name] = (obj, device, t)
        return t

    def _make_runners(self, backend: str) -> dict[str, NetworkRunner]:
        from workers.backends import TorchRunner, onnx_runner
        from workers.imrnet.onnx_export import FeatureGraph, ReconstructGraph, example_inputs, export_cached

        assert self.model is not None
        if backend == "torch-cuda":
            gpu = copy.deepcopy(self.model)  # self.model stays on the CPU (fit, save)
            return {"reconstruct": TorchRunner(ReconstructGraph(gpu), "cuda"),
                    "features": TorchRunner(FeatureGraph(gpu), "cuda")}
        graphs = export_cached(self.model, self._cache_dir)
        cfg = self.config
        n, k = cfg.n_centers, cfg.group_size
        m = mask_count(n, self.mask_ratio)
        x = example_inputs(self.model)
        rec_in = [x["neigh_vis"], x["center_vis"], x["center_mask"]]
        feat_in = [torch.cat([x["neigh"], x["neigh"]]), torch.cat([x["centers"], x["centers"]])]
        with torch.inference_mode():
            rec_ref = [self.model.reconstruct(*rec_in).numpy()]
            feat_ref = [self.model.features(*feat_in).numpy()]
        rec_ranges = {"neigh_vis": ((1, 1, k, 3), (1, n - m, k, 3), (1, n, k, 3)),
                      "center_vis": ((1, 1, 3), (1, n - m, 3), (1, n, 3)),
                      "center_mask": ((1, 1, 3), (1, m, 3), (1, n, 3))}
        feat_ranges = {"neigh": ((1, 1, k, 3), (2, n, k, 3), (2, n, k, 3)),
                       "centers": ((1, 1, 3), (2, n, 3), (2, n, 3))}
        cache = self._cache_dir
        return {
            "reconstruct": onnx_runner(backend, graphs["reconstruct"], rec_in, cache, fp16="auto",
                                       shape_ranges=rec_ranges, reference=rec_ref),
            "features": onnx_runner(backend, graphs["features"], feat_in, cache, fp16="auto",
                                    shape_ranges=feat_ranges, reference=feat_ref),
        }

    def _net_reconstruct(self, neigh_vis: torch.Tensor, center_vis: torch.Tensor,
                         center_mask: torch.Tensor) -> torch.Tensor:
        """``IMRNet.reconstruct`` on the chosen backend (CPU tensors in and out; on ``torch-cuda``,
        CUDA tensors in and out without a round trip through the host)."""
        if self._runners is None:
            assert self.model is not None
            return self.model.reconstruct(neigh_vis, center_vis, center_mask)
        runner = self._runners["reconstruct"]
        if neigh_vis.device.type != "cpu" and isinstance(runner, TorchRunner):
            return runner.fn(neigh_vis, center_vis, center_mask).float()
        return torch.from_numpy(self._runners["reconstruct"].run(neigh_vis, center_vis, center_mask)[0])

    def _net_features(self, neigh: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """``IMRNet.features`` on the chosen backend (CPU tensors in and out; on ``torch-cuda``,
        CUDA tensors in and out without a round trip through the host)."""
        if self._runners is None:
            assert self.model is not None
            return self.model.features(neigh, centers)
        runner = self._runners["features"]
        if neigh.device.type != "cpu" and isinstance(runner, TorchRunner):
            return runner.fn(neigh, centers).float()
        return torch.from_numpy(self._runners["features"].run(neigh, centers)[0])

    # -- helpers -------------------------------------------------------------------------------

    def _normalize(self, points: torch.Tensor) -> torch.Tensor:
        """Centred on the centroid, divided by the product scale (float64), float32 out."""
        p = points.double()
        return ((p - p.mean(dim=0)) / self.norm_scale).float()

    def _device_points(self, cloud: PreparedCloud) -> torch.Tensor:
        """``cloud``'s points on the geometry device (``device_points`` when already there), checked."""
        dev = self.device
        pts = cloud.device_points
        if pts is None or pts.device != dev:
            return torch.from_numpy(np.ascontiguousarray(self._check(cloud))).to(dev)
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < MIN_POINTS or not bool(torch.isfinite(pts).all()):
            self._check(PreparedCloud(points=pts.cpu().numpy(), source_flat=cloud.source_flat,
                                      voxel_of_source=cloud.voxel_of_source))
        return pts

    def _check(self, cloud: PreparedCloud) -> np.ndarray:
        pts = np.asarray(cloud.points)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"cloud points must be an M×3 array, got shape {pts.shape}")
        if len(pts) < MIN_POINTS:
            raise ValueError(f"cloud has {len(pts)} points, need at least {MIN_POINTS}")
        if not np.isfinite(pts).all():
            raise ValueError("cloud points must all be finite")
        return pts

    def _gen(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, *salt]).generate_state(1)[0]))

    def _patches(self, reduced: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patches (n×k×3), centres (n×3) and member indices (n×k) of one reduced, normalized cloud,
        on its device (GPS rates in float64)."""
        rates = geometry_rates(reduced.double(), GEOMETRY_K) if self.sampler == "gps" else None
        cidx = sample_centers(self.sampler, reduced, self.config.n_centers, rates, self.tau, self.density_ratio, gen)
        return group_patches(reduced, cidx, self.config.group_size)

    # -- fit -----------------------------------------------------------------------------------

    def _prepare(self, points: torch.Tensor, *salt: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(normalized cloud, its ``n_points`` FPS reduction), both aligned when ``align="icp"``, on
        the device of ``points``."""
        normed = self._normalize(points)
        reduced = normed[reduce_points(normed, self.config.n_points, self._gen(*salt))]
        info: dict[str, float] = {}
        if self.align != "none" and self.align_reference is not None:
            t, info = self._register(reduced)
            normed, reduced = apply(t, normed), apply(t, reduced)
            info["rotation_deg"] = rotation_deg(t)
        return normed, reduced, info

    def _register(self, reduced: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The transform (4×4 float64, on the tensor's device) registering ``reduced`` to
        ``align_reference``, and its fitness and RMSE (``align``: "global" or "icp", see
        ``workers.imrnet.align``); the shared registration is built once per fitted reference."""
        ref = self._on("align_reference", reduced.device)
        assert ref is not None
        if self.align == "icp":
            return icp_align(reduced, ref, reference_normals=self._device_cache["align_normals"][2])
        obj = self.align_reference
        if self._registrar_of is None or self._registrar_of[0] is not obj:
            self._registrar_of = (obj, align_registrar(ref, self.seed))
        return register_global(self._registrar_of[1], reduced)

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        """Fine-tune and build the template on good parts (docs/design/imrnet.md, fit steps), on the CPU."""
        fit_model(self, clouds, progress)

    # -- score ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def iterative_reconstruction(
        self, neigh: torch.Tensor, centers: torch.Tensor, gen: torch.Generator, iterations: int | None = None
    ) -> torch.Tensor:
        """Algorithm 1 (lines 5–10): the patches (n×k×3) after ``iterations`` mask-and-restore rounds.

        The masks are drawn on the CPU (``gen``) and the index vectors moved to the patches' device,
        so every device masks the same patches and the device never has to report back.
        """
        assert self.model is not None
        n = centers.shape[0]
        m = mask_count(n, self.mask_ratio)
        p = neigh.clone()
        dev = neigh.device
        order = torch.randperm(n, generator=gen)
        for it in range(self.iterations if iterations is None else iterations):
            if self.test_mask == "cover":
                masked = order[(it * m + torch.arange(m)) % n]
            else:
                masked = torch.randperm(n, generator=gen)[:m]
            vis_mask = torch.ones(n, dtype=torch.bool)
            vis_mask[masked] = False
            visible = torch.nonzero(vis_mask).squeeze(1)
            if dev.type != "cpu":
                masked, visible = masked.to(dev), visible.to(dev)
            pred = self._net_reconstruct(p[visible][None], centers[visible][None], centers[masked][None])[0]
            p[masked] = pred
        return p

    def _point_scores(self, reduced: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """A_p (Eqs. 13–15) at every reduced input point: Chamfer of its input and reconstructed kNN
        sets (neighbours in float64 on their device)."""
        cfg = self.config
        k_in = min(self.point_k, len(reduced))
        k_out = min(len(recon), max(1, round(self.point_k * cfg.n_centers * cfg.group_size / cfg.n_points)))
        red64 = reduced.double()
        _, i_in = knn(red64, red64, k_in)
        _, i_out = knn(recon.double(), red64, k_out)
        return chamfer_l2(reduced[i_in], recon[i_out], reduce=False)

    @torch.inference_mode()
    def _feature_scores(
        self, neigh: torch.Tensor, recon: torch.Tensor, centers: torch.Tensor, timings: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A_f (Eqs. 16–19) per patch, with template regularization of F_o.

        Returns (A_f, index of each patch's corresponding template vector, drift ``‖F_o − ẑ‖``), on
        the patches' device (the template is searched there).
        The corresponding template vector ẑ_i of patch i is the template vector nearest to the
        patch's *input* feature F_i; where the reconstruction's feature F_o,i drifted farther than τ
        from it, F_o,i is replaced by ẑ_i (Eq. 19), so ``A_f = ‖F_i − F_o‖``.
        """
        assert self.model is not None and self.template is not None
        t0 = time.perf_counter()
        both = self._net_features(torch.stack([neigh, recon]), torch.stack([centers, centers]))
        _sync(both)
        t1 = time.perf_counter()
        f_in, f_out = both[0], both[1]
        template = self.template if neigh.device.type == "cpu" else self._on("template", neigh.device)
        assert template is not None
        _, idx = nearest_sq_dist(f_in, template)
        _sync(idx)
        if timings is not None:
            timings.update({"dfc": t1 - t0, "template_search": time.perf_counter() - t1})
        z_hat = template[idx]
        drift = (f_out - z_hat).norm(dim=1)
        if self.template_regularization:
            f_out = torch.where((drift > self.template_tau).unsqueeze(1), z_hat, f_out)
        return (f_in - f_out).norm(dim=1), idx, drift

    def _compare(
        self, reduced: torch.Tensor, neigh: torch.Tensor, centers: torch.Tensor, members: torch.Tensor,
        gen: torch.Generator, timings: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1 then DFC on one reduced cloud: (A_p per reduced point, A_f per patch,
        corresponding template index per patch, drift per patch), on its device."""
        t1 = time.perf_counter()
        recon = self.iterative_reconstruction(neigh, centers, gen)
        _sync(recon)
        t2 = time.perf_counter()
        if self.point_score == "patch":
            ap = patches_to_points(chamfer_l2(neigh, recon, reduce=False), members, reduced, centers)
        else:
            ap = self._point_scores(reduced, (recon + centers.unsqueeze(1)).reshape(-1, 3))
        inner: dict[str, float] = {}
        af, idx, drift = self._feature_scores(neigh, recon, centers, inner)
        _sync(af)
        if timings is not None:
            rest = time.perf_counter() - t2 - inner["dfc"] - inner["template_search"]
            timings.update({"reconstruct": t2 - t1, **inner, "compare": rest})
        return ap, af, idx, drift

    def _raw_scores(
        self, normed: torch.Tensor, reduced: torch.Tensor, gen: torch.Generator,
        timings: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Un-standardized (A_p, A_f), both interpolated to every point of ``normed``, on its device.

        With ``reference="patch"`` each patch's scores are first reduced by the training phase's
        scores of its corresponding template patch (the nearest template vector to its F_i).
        """
        t0 = time.perf_counter()
        neigh, centers, members = self._patches(reduced, gen)
        _sync(neigh)
        t1 = time.perf_counter()
        ap, af_c, idx, _ = self._compare(reduced, neigh, centers, members, gen, timings)
        t2 = time.perf_counter()
        ref = self._on("template_ref", reduced.device) if self.reference == "patch" else None
        if ref is not None:
            ref_i = ref[idx]
            ap = ap - patches_to_points(ref_i[:, 0], members, reduced, centers)
            af_c = af_c - ref_i[:, 1]
        af = patches_to_points(af_c, members, reduced, centers)
        ap_full = idw_interpolate(reduced, ap, normed)
        af_full = idw_interpolate(reduced, af, normed)
        _sync(af_full)
        if timings is not None:
            timings["sample"] = t1 - t0
            timings["compare"] = timings.get("compare", 0.0) + time.perf_counter() - t2
        return ap_full, af_full, {"centers": centers}

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        """Score one part (docs/design/imrnet.md's score steps), every step in torch on ``device``;
        only the point scores come back."""
        if not self.fitted:
            raise RuntimeError("imrnet is not fitted: call fit() or load an artifact first")
        t0 = time.perf_counter()
        with torch.inference_mode():
            normed, reduced, _ = self._prepare(self._device_points(cloud), 4)
            _sync(reduced)
            timings: dict[str, float] = {"reduce": time.perf_counter() - t0}
            ap, af, _ = self._raw_scores(normed, reduced, self._gen(5), timings)
            t1 = time.perf_counter()
            mp, sp, mf, sf = (float(x) for x in self.stats)
            scores = (self.point_weight * (ap.double() - mp) / sp + self.feature_weight * (af.double() - mf) / sf).float()
            k = max(1, int(math.ceil(self.object_top_fraction * scores.shape[0])))
            object_score = float(torch.topk(scores, k, sorted=False).values.mean())
            point_scores = scores.cpu().numpy()
        timings["combine"] = time.perf_counter() - t1
        return ScoreResult(object_score=object_score, point_scores=point_scores, timings=timings)


def _sync(x: torch.Tensor) -> None:
    """Wait for ``x``'s CUDA stream, so that stage timings on a GPU are not just launch times."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
