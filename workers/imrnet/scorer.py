"""The ``imrnet`` scorer: IMRNet (Li et al., CVPR 2024) behind the :class:`workers.base.Scorer`
interface. Design, paper sections, choices and measurements: docs/design/imrnet.md.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from workers import geometry
from workers.backends import NetworkRunner, TorchRunner
from workers.base import Scorer, ScoreResult
from workers.imrnet.align import apply, icp_align, icp_align_torch, rotation_deg
from workers.imrnet.network import IMRNet, IMRNetConfig, chamfer_l2, mask_count
from workers.imrnet.params import IMRNetParams
from workers.imrnet.sampling import geometry_rates, group_patches, local_geometry, sample_centers
from workers.imrnet.training import (
    GEOMETRY_K,
    TrainSettings,
    load_pretrained,
    load_weights,
    pool_from_clouds,
    reduce_points,
    train,
    weights_to_tensors,
)
from workers.preprocess import PreparedCloud

log = logging.getLogger("inspectd.imrnet")

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_PRETRAINED = PRETRAINED_DIR / "imrnet-small.safetensors"
MIN_POINTS = 10
_CONFIG_KEYS = ("n_points", "n_centers", "group_size", "dim", "heads", "enc_depth", "dec_depth", "mlp_ratio",
                "embed_hidden")
_TOKEN_KEYS = ("n_points", "n_centers")
"""Sizes that set how many points / tokens the network sees, not the shape of any weight."""


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A host numpy array of ``x`` (``x`` itself when it already is one)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def idw_interpolate(
    src: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor, dst: np.ndarray | torch.Tensor, k: int = 3
) -> np.ndarray | torch.Tensor:
    """Values at ``dst`` (M×3) by inverse-distance weighting of the ``k`` nearest ``src`` points.

    numpy in: scipy's KD-tree, numpy float32 out. Tensors in: ``workers.geometry.knn`` on their
    device (float64, as the KD-tree), a float32 tensor out there.
    """
    k = min(k, len(src))
    if isinstance(src, torch.Tensor):
        d, i = geometry.knn(src.double(), dst.double(), k)
        w = 1.0 / d.clamp(min=1e-8)
        return ((values.double()[i] * w).sum(dim=1) / w.sum(dim=1)).float()
    d, i = cKDTree(src).query(dst, k=k)
    if k == 1:
        d, i = d[:, None], i[:, None]
    w = 1.0 / np.maximum(d, 1e-8)
    return ((values[i] * w).sum(axis=1) / w.sum(axis=1)).astype(np.float32)


def patches_to_points(
    values: np.ndarray | torch.Tensor,
    members: np.ndarray | torch.Tensor,
    points: np.ndarray | torch.Tensor,
    centers: np.ndarray | torch.Tensor,
) -> np.ndarray | torch.Tensor:
    """Per-patch values (n,) → per point (N,): the mean over the patches holding the point.

    ``members`` (n×k) are the patches' point indices into ``points`` (N×3); a point in no patch gets
    the inverse-distance-weighted value of its 3 nearest patch centres. numpy in, numpy out;
    tensors in (``values`` a tensor): computed on their device (sums in float64 as numpy's
    ``bincount``; the centre interpolation is evaluated for every point and kept where no patch
    holds it, so the host never has to count them), a float32 tensor out.
    """
    if isinstance(values, torch.Tensor):
        n_pts = points.shape[0]
        flat = members.reshape(-1)
        counts = torch.bincount(flat, minlength=n_pts).double()
        sums = torch.zeros(n_pts, dtype=torch.float64, device=values.device).index_add_(
            0, flat, values.double().repeat_interleave(members.shape[1]))
        mean = (sums / counts.clamp(min=1.0)).float()
        fill = idw_interpolate(centers, values.float(), points)
        return torch.where(counts > 0, mean, fill)
    n_pts = len(points)
    flat = members.reshape(-1)
    counts = np.bincount(flat, minlength=n_pts).astype(np.float64)
    sums = np.bincount(flat, weights=np.repeat(np.asarray(values, dtype=np.float64), members.shape[1]),
                       minlength=n_pts)
    out = np.empty(n_pts, dtype=np.float32)
    covered = counts > 0
    out[covered] = sums[covered] / counts[covered]
    if not covered.all():
        out[~covered] = idw_interpolate(centers, np.asarray(values, dtype=np.float32), points[~covered])
    return out


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
        self.config = IMRNetConfig(**{k: getattr(self.hparams, k) for k in _CONFIG_KEYS})
        self.model: IMRNet | None = None
        self.template: torch.Tensor | None = None
        self.template_tau = float("inf")
        self.template_ref: torch.Tensor | None = None
        """Per template vector: the training phase's (A_p, A_f) of its patch (``reference="patch"``)."""
        self.align_reference: np.ndarray | None = None
        """The reduced first good cloud, the pose every cloud is registered to (``align="icp"``)."""
        self.norm_scale = 1.0
        self.stats = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float64)
        """mean and std of A_p, then of A_f, over the good training clouds."""
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

    # -- state ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        if self.model is None or self.template is None:
            raise RuntimeError("imrnet is not fitted: nothing to save")
        out = {k: v.numpy() for k, v in weights_to_tensors(self.model).items()}
        out["template"] = self.template.numpy()
        out["scalars"] = np.array([self.norm_scale, self.template_tau], dtype=np.float64)
        out["score_stats"] = self.stats.astype(np.float64)
        if self.template_ref is not None:
            out["template_ref"] = self.template_ref.numpy()
        if self.align_reference is not None:
            out["align_reference"] = np.asarray(self.align_reference, dtype=np.float32)
        return out

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> IMRNetScorer:
        for key in ("template", "scalars", "score_stats"):
            if key not in tensors:
                raise ValueError(f"imrnet state has no {key!r} tensor")
        scorer = cls(**params)
        model = IMRNet(scorer.config)
        load_weights(model, tensors)
        model.eval()
        scorer.model = model
        scorer.template = torch.from_numpy(np.ascontiguousarray(tensors["template"], dtype=np.float32))
        scorer.norm_scale = float(tensors["scalars"][0])
        scorer.template_tau = float(tensors["scalars"][1])
        scorer.stats = np.asarray(tensors["score_stats"], dtype=np.float64)
        if "template_ref" in tensors:
            scorer.template_ref = torch.from_numpy(np.ascontiguousarray(tensors["template_ref"], dtype=np.float32))
        if "align_reference" in tensors:
            scorer.align_reference = np.ascontiguousarray(tensors["align_reference"], dtype=np.float32)
        return scorer

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
        """Where the geometry of ``score`` runs on the torch path: the GPU for ``torch-cuda``, else the CPU."""
        return torch.device("cuda" if self.backend == "torch-cuda" else "cpu")

    @property
    def geometry_mode(self) -> str:
        """The geometry implementation ``score`` uses: ``geometry_impl``, ``auto`` resolved by the
        backend (``torch`` on ``torch-cuda``, ``numpy`` otherwise)."""
        if self.geometry_impl != "auto":
            return self.geometry_impl
        return "torch" if self.backend == "torch-cuda" else "numpy"

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

    def _normalize(self, points: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Centred on the centroid, divided by the product scale (float64), float32 out."""
        if isinstance(points, torch.Tensor):
            p = points.double()
            return ((p - p.mean(dim=0)) / self.norm_scale).float()
        pts = np.asarray(points, dtype=np.float64)
        return ((pts - pts.mean(axis=0)) / self.norm_scale).astype(np.float32)

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

    def _patches(
        self, reduced: np.ndarray | torch.Tensor, gen: torch.Generator, rates: np.ndarray | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patches (n×k×3), centres (n×3) and member indices (n×k) of one reduced, normalized cloud.

        numpy in: GPS rates by scipy's KD-tree; a tensor in: everything on its device (rates in float64).
        """
        if isinstance(reduced, torch.Tensor):
            r_t = None
            if self.sampler == "gps":
                r_t = rates if isinstance(rates, torch.Tensor) else geometry_rates(reduced.double(), GEOMETRY_K)
            cidx = sample_centers(self.sampler, reduced, self.config.n_centers, r_t, self.tau, self.density_ratio,
                                  gen)
            return group_patches(reduced, cidx, self.config.group_size)
        pts = torch.from_numpy(reduced)
        r = None
        if self.sampler == "gps":
            r = torch.from_numpy(rates if rates is not None else geometry_rates(reduced, GEOMETRY_K))
        cidx = sample_centers(self.sampler, pts, self.config.n_centers, r, self.tau, self.density_ratio, gen)
        return group_patches(pts, cidx, self.config.group_size)

    def _random_init_allowed(self, why: str) -> None:
        """Fine-tuning from random weights gives a much weaker model: refuse unless allowed."""
        if not self.allow_random_init:
            raise ValueError(f"imrnet: {why}; refusing to fine-tune from a random initialization. Train the "
                             "weights (`inspectd train --scorer imrnet --pretrain`), point `pretrained` at them, "
                             "or pass --allow-random-init (or pretrained='none') to accept a random start")
        warnings.warn(f"imrnet: {why}; fine-tuning from a random initialization (allowed)", stacklevel=4)

    def _initial_model(self) -> tuple[IMRNet, str]:
        path = None
        if self.pretrained == "auto":
            path = DEFAULT_PRETRAINED
        elif self.pretrained not in ("", "none"):
            path = Path(self.pretrained)
        if path is None:
            return IMRNet(self.config), "none (random init, pretrained='none')"
        if not path.is_file():
            self._random_init_allowed(f"no pretrained weights at {path}")
            return IMRNet(self.config), "none (missing file)"
        model, meta = load_pretrained(path)
        if any(getattr(model.config, k) != getattr(self.config, k) for k in _CONFIG_KEYS if k not in _TOKEN_KEYS):
            self._random_init_allowed(f"pretrained weights {path} have other sizes ({model.config})")
            return IMRNet(self.config), "none (size mismatch)"
        if model.config != self.config:  # same weights, other point / centre counts: start from them
            resized = IMRNet(self.config)
            resized.load_state_dict(model.state_dict())
            return resized, f"{path} (pretrained at {model.config.n_points} points × {model.config.n_centers} centres)"
        return model, str(path)

    # -- fit -----------------------------------------------------------------------------------

    def _prepare(
        self, points: np.ndarray | torch.Tensor, *salt: int
    ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, dict[str, float]]:
        """(normalized cloud, its ``n_points`` FPS reduction), both aligned when ``align="icp"``.

        numpy in: numpy + scipy ICP (``icp_align``); a tensor in: all on its device
        (``icp_align_torch``, point-to-plane as the numpy one).
        """
        normed = self._normalize(points)
        reduced = normed[reduce_points(normed, self.config.n_points, self._gen(*salt))]
        info: dict[str, float] = {}
        if self.align == "icp" and self.align_reference is not None:
            t, info = self._icp(reduced)
            normed, reduced = apply(t, normed), apply(t, reduced)
            info["rotation_deg"] = rotation_deg(t)
        return normed, reduced, info

    def _icp(self, reduced: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, dict[str, float]]:
        """The transform registering ``reduced`` to ``align_reference`` (numpy or on the tensor's device)."""
        if isinstance(reduced, torch.Tensor):
            ref = self._on("align_reference", reduced.device)
            assert ref is not None
            return icp_align_torch(reduced, ref, reference_normals=self._device_cache["align_normals"][2])
        assert self.align_reference is not None
        return icp_align(reduced, self.align_reference)

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        """Fine-tune and build the template on good parts (the module docstring's fit steps).

        Runs on the CPU. Geometry: the numpy path, or torch on CPU tensors when
        ``geometry_impl="torch"`` (``auto`` means numpy here: on a CPU scipy's KD-tree is faster).
        """
        from tqdm import tqdm

        if len(clouds) == 0:
            raise ValueError("imrnet needs at least one good training cloud")
        model, source = self._initial_model()  # first: missing pretrained weights refuse before any work
        self._runners = None  # fit trains and measures on the torch module itself
        t0 = time.perf_counter()
        raw = [self._check(c).astype(np.float64) for c in clouds]
        as_tensor = self.geometry_impl == "torch"
        radii = [float(np.linalg.norm(p - p.mean(axis=0), axis=1).max()) for p in raw]
        self.norm_scale = float(np.mean(radii)) if np.mean(radii) > 0 else 1.0
        n_red = max(self.finetune_samplings, self.template_samplings) + 1  # the last one: score stats
        self.align_reference = None
        normed: list[Any] = []
        reduced: list[list[Any]] = []
        for i, p in enumerate(tqdm(raw, desc="imrnet reduce", disable=not progress, leave=False)):
            nm = self._normalize(torch.from_numpy(p) if as_tensor else p)
            rs = [nm[reduce_points(nm, self.config.n_points, self._gen(1, i, j))] for j in range(n_red)]
            if self.align == "icp":
                if self.align_reference is None:
                    self.align_reference = _np(rs[0])  # the first good part's pose is the product's reference
                else:
                    t, _ = self._icp(rs[0])
                    nm, rs = apply(t, nm), [apply(t, r) for r in rs]
            normed.append(nm)
            reduced.append(rs)
        pool = pool_from_clouds([_np(r) for rs in reduced for r in rs[: self.finetune_samplings]])
        t1 = time.perf_counter()

        settings = TrainSettings.finetune(
            steps=self.finetune_steps, lr=self.finetune_lr, batch_size=self.batch_size, mask_ratio=self.mask_ratio,
            sampler=self.sampler, tau=self.tau, density_ratio=self.density_ratio,
            aug_rotate_deg=self.aug_rotate_deg, aug_scale=self.aug_scale, aug_jitter=self.aug_jitter, seed=self.seed,
        )
        summary = {"final_loss": float("nan"), "seconds": 0.0}
        if self.finetune_steps > 0:
            if self.train_checkpoint is not None:
                settings.checkpoint_every = 50
            summary = train(model, pool, settings, progress=progress, checkpoint=self.train_checkpoint,
                            resume=self.train_resume, desc="imrnet fine-tune")
        model.eval()
        self.model = model
        t2 = time.perf_counter()

        # template (Sec. 4.3): features of every patch of template_samplings reductions per cloud
        feats, patches = [], []
        with torch.inference_mode():
            for i, rs in enumerate(reduced):
                for j in range(self.template_samplings):
                    gen = self._gen(2, i, j)
                    neigh, centers, members = self._patches(rs[j], gen)
                    patches.append((rs[j], neigh, centers, members, gen))
                    feats.append(model.features(neigh[None], centers[None])[0])
        template = torch.cat(feats)
        self.template = template.contiguous()
        # τ of Eq. 19: the template_quantile quantile of the drift of good reconstructions
        self.template_tau = float("inf")
        self.template_ref = None
        drifts = []
        for i, rs in enumerate(reduced):
            gen = self._gen(3, i)
            neigh, centers, members = self._patches(rs[-1], gen)
            drifts.append(_np(self._compare(rs[-1], neigh, centers, members, gen)[3]))
        if self.template_quantile < 1.0:
            self.template_tau = float(np.quantile(np.concatenate(drifts), self.template_quantile))
        # the training phase's own comparison scores per template patch (reference="patch")
        if self.reference == "patch":
            refs = []
            for red, neigh, centers, members, gen in patches:
                ap, af, _, _ = (_np(x) for x in self._compare(red, neigh, centers, members, gen))
                refs.append(torch.from_numpy(np.stack([ap[members.numpy()].mean(axis=1), af], axis=1)))
            self.template_ref = torch.cat(refs).float().contiguous()
        # score statistics on the good clouds (another reduction than the template's)
        self.stats = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float64)
        aps, afs = [], []
        for i, rs in enumerate(reduced):
            ap, af, _ = self._raw_scores(normed[i], rs[-1], self._gen(3, i))
            aps.append(_np(ap))
            afs.append(_np(af))
        ap_all, af_all = np.concatenate(aps), np.concatenate(afs)
        self.stats = np.array([float(ap_all.mean()), max(float(ap_all.std()), 1e-12), float(af_all.mean()),
                               max(float(af_all.std()), 1e-12)], dtype=np.float64)
        self.fit_info = {"pretrained": source, "finetune_loss": summary["final_loss"],
                         "seconds": {"reduce": t1 - t0, "finetune": t2 - t1, "template": time.perf_counter() - t2},
                         "template_size": int(template.shape[0]), "template_tau": self.template_tau}
        log.info("imrnet fit: %s", self.fit_info)
        if self.backend != "torch-cpu":
            self._runners = self._make_runners(self.backend)

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

    def _point_scores(
        self, reduced: np.ndarray | torch.Tensor, recon: np.ndarray | torch.Tensor
    ) -> np.ndarray | torch.Tensor:
        """A_p (Eqs. 13–15) at every reduced input point: Chamfer of its input and reconstructed kNN sets.

        numpy in: neighbours by scipy's KD-tree; tensors in: by ``workers.geometry.knn`` (float64,
        as the KD-tree) on their device, a tensor out.
        """
        cfg = self.config
        k_in = min(self.point_k, len(reduced))
        k_out = min(len(recon), max(1, round(self.point_k * cfg.n_centers * cfg.group_size / cfg.n_points)))
        if isinstance(reduced, torch.Tensor):
            red64 = reduced.double()
            _, i_in_t = geometry.knn(red64, red64, k_in)
            _, i_out_t = geometry.knn(recon.double(), red64, k_out)
            return chamfer_l2(reduced[i_in_t], recon[i_out_t], reduce=False)
        _, i_in = cKDTree(reduced).query(reduced, k=k_in)
        _, i_out = cKDTree(recon).query(reduced, k=k_out)
        i_in = i_in.reshape(len(reduced), k_in)
        i_out = i_out.reshape(len(reduced), k_out)
        a = torch.from_numpy(reduced[i_in])
        b = torch.from_numpy(recon[i_out])
        return chamfer_l2(a, b, reduce=False).numpy()

    @torch.inference_mode()
    def _feature_scores(
        self, neigh: torch.Tensor, recon: torch.Tensor, centers: torch.Tensor, timings: dict[str, float] | None = None,
        as_tensors: bool = False,
    ) -> tuple[np.ndarray | torch.Tensor, torch.Tensor, np.ndarray | torch.Tensor]:
        """A_f (Eqs. 16–19) per patch, with template regularization of F_o.

        Returns (A_f, index of each patch's corresponding template vector, drift ``‖F_o − ẑ‖``):
        numpy A_f and drift, or with ``as_tensors`` tensors on the patches' device (the template is
        searched there).
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
        if as_tensors:
            return (f_in - f_out).norm(dim=1), idx, drift
        return (f_in - f_out).norm(dim=1).numpy(), idx, drift.numpy()

    def _compare(
        self, reduced: np.ndarray | torch.Tensor, neigh: torch.Tensor, centers: torch.Tensor, members: torch.Tensor,
        gen: torch.Generator, timings: dict[str, float] | None = None,
    ) -> tuple[Any, Any, torch.Tensor, Any]:
        """Algorithm 1 then DFC on one reduced cloud.

        Returns (A_p per reduced point, A_f per patch, corresponding template index per patch,
        drift per patch): numpy arrays for a numpy ``reduced``, tensors on its device for a tensor.
        """
        t1 = time.perf_counter()
        recon = self.iterative_reconstruction(neigh, centers, gen)
        _sync(recon)
        t2 = time.perf_counter()
        if isinstance(reduced, torch.Tensor):
            if self.point_score == "patch":
                ap_t = patches_to_points(chamfer_l2(neigh, recon, reduce=False), members, reduced, centers)
            else:
                ap_t = self._point_scores(reduced, (recon + centers.unsqueeze(1)).reshape(-1, 3))
            inner_t: dict[str, float] = {}
            af_t, idx_t, drift_t = self._feature_scores(neigh, recon, centers, inner_t, as_tensors=True)
            _sync(af_t)
            if timings is not None:
                rest = time.perf_counter() - t2 - inner_t["dfc"] - inner_t["template_search"]
                timings.update({"reconstruct": t2 - t1, **inner_t, "compare": rest})
            return ap_t, af_t, idx_t, drift_t
        if self.point_score == "patch":
            ap_c = chamfer_l2(neigh, recon, reduce=False).numpy()
            ap = patches_to_points(ap_c, members.numpy(), reduced, centers.numpy())
        else:
            recon_pts = (recon + centers.unsqueeze(1)).reshape(-1, 3).numpy()
            ap = self._point_scores(reduced, recon_pts)
        inner: dict[str, float] = {}
        af, idx, drift = self._feature_scores(neigh, recon, centers, inner)
        if timings is not None:
            rest = time.perf_counter() - t2 - inner["dfc"] - inner["template_search"]
            timings.update({"reconstruct": t2 - t1, **inner, "compare": rest})
        return ap, af, idx, drift

    def _raw_scores(
        self, normed: np.ndarray | torch.Tensor, reduced: np.ndarray | torch.Tensor, gen: torch.Generator,
        timings: dict[str, float] | None = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Un-standardized (A_p, A_f), both interpolated to every point of ``normed`` (numpy arrays,
        or tensors on the device of a tensor ``reduced``).

        With ``reference="patch"`` each patch's scores are first reduced by the training phase's
        scores of its corresponding template patch (the nearest template vector to its F_i).
        """
        t0 = time.perf_counter()
        neigh, centers, members = self._patches(reduced, gen)
        _sync(neigh)
        t1 = time.perf_counter()
        ap, af_c, idx, _ = self._compare(reduced, neigh, centers, members, gen, timings)
        t2 = time.perf_counter()
        if isinstance(reduced, torch.Tensor):
            ref_t = self._on("template_ref", reduced.device) if self.reference == "patch" else None
            if ref_t is not None:
                ref_i = ref_t[idx]
                ap = ap - patches_to_points(ref_i[:, 0], members, reduced, centers)
                af_c = af_c - ref_i[:, 1]
            af_t = patches_to_points(af_c, members, reduced, centers)
            ap_full_t = idw_interpolate(reduced, ap, normed)
            af_full_t = idw_interpolate(reduced, af_t, normed)
            _sync(af_full_t)
            if timings is not None:
                timings["sample"] = t1 - t0
                timings["compare"] = timings.get("compare", 0.0) + time.perf_counter() - t2
            return ap_full_t, af_full_t, {"centers": centers}
        c, mem = centers.numpy(), members.numpy()
        if self.reference == "patch" and self.template_ref is not None:
            ref = self.template_ref[idx].numpy()
            ap = ap - patches_to_points(ref[:, 0], mem, reduced, c)
            af_c = af_c - ref[:, 1]
        af = patches_to_points(af_c, mem, reduced, c)
        ap_full = idw_interpolate(reduced, ap, normed)
        af_full = idw_interpolate(reduced, af, normed)
        if timings is not None:
            timings["sample"] = t1 - t0
            timings["compare"] = timings.get("compare", 0.0) + time.perf_counter() - t2
        return ap_full, af_full, {"centers": c}

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        """Score one part (the module docstring's score steps) with the geometry of ``geometry_mode``."""
        if not self.fitted:
            raise RuntimeError("imrnet is not fitted: call fit() or load an artifact first")
        if self.geometry_mode == "torch":
            return self._score_torch(cloud)
        t0 = time.perf_counter()
        normed, reduced, _ = self._prepare(self._check(cloud), 4)
        timings: dict[str, float] = {"reduce": time.perf_counter() - t0}
        ap, af, _ = self._raw_scores(normed, reduced, self._gen(5), timings)
        t1 = time.perf_counter()
        mp, sp, mf, sf = self.stats
        scores = (self.point_weight * (ap - mp) / sp + self.feature_weight * (af - mf) / sf).astype(np.float32)
        k = max(1, int(math.ceil(self.object_top_fraction * len(scores))))
        object_score = float(np.mean(np.partition(scores, len(scores) - k)[-k:]))
        timings["combine"] = time.perf_counter() - t1
        return ScoreResult(object_score=object_score, point_scores=scores, timings=timings)

    def _score_torch(self, cloud: PreparedCloud) -> ScoreResult:
        """``score`` with every step in torch on ``device``; only the point scores come back."""
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
