"""Training IMRNet: self-supervised pretraining on synthetic parts, fine-tuning on good parts.

Paper (Li et al., CVPR 2024, Sec. 5.3): the Point-MAE backbone is pretrained on ShapeNet-55
(8192 points per cloud), then fine-tuned per category on the 4 good training samples with
256 × 64 point patches and mask ratio 0.4, training loss the L2 Chamfer distance of the masked
patches (Eq. 12). ShapeNet cannot be downloaded here, so pretraining uses our procedural part
library (``sensors.parts``: 12 classes of industrial parts) instead:

* **Pretraining data** (:func:`synthetic_pool`): ``instances`` parts per class with dimensions
  jittered by ``±variation`` (relative; default 10 %, far wider than the ISO 2768-m part-to-part
  tolerance of the benchmark, so the network sees a family of shapes, not 12 templates), the surface sampled
  area-uniformly (``dense`` points, like a scan before voxelization), then reduced to
  ``n_points`` by farthest point sampling, the same reduction the scorer applies to a voxelized
  scan. Only defect-free shapes are used (the method never sees a defect). Note: the benchmark's
  classes are among the 12, as ShapeNet's categories are among Anomaly-ShapeNet's sources in the
  paper; the instances differ (other seeds, larger variation).
* **Normalization** (Point-MAE): a cloud is centred on its centroid and divided by its largest
  radius (unit sphere). The scorer uses one scale per product instead (see ``scorer.py``).
* **Augmentation** (:class:`TrainSettings`): a random rotation about the z axis (parts rest on
  z = 0; pretraining: any angle; fine-tuning: ``±aug_rotate_deg``), a random anisotropic scale
  ``1 ± aug_scale`` per axis, Gaussian jitter ``aug_jitter`` (unit-sphere units), and a fresh
  random choice of patch centres (GPS/FPS/random) and of the masked patches at every step. The
  rates of change used by GPS are computed once per pool cloud (they do not depend on rotation,
  translation or a uniform scale; the small anisotropic scale and jitter are ignored for them).
* **Optimizer**: AdamW (Point-MAE: lr 1e-3, weight decay 0.05), linear warm-up then cosine decay
  to 1 % of the peak, batch 8 (CPU).
* **Determinism and resume**: every step draws its randomness from generators seeded with
  ``(seed, step)``, so a run resumed from a checkpoint continues exactly as the uninterrupted run
  would (same batches, same masks). A checkpoint (:func:`save_checkpoint`) is a safetensors file
  of the model weights and the AdamW moments plus a JSON sidecar (step, settings, losses).
  Nothing is pickled; ``torch.load`` is never used.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workers.imrnet.network import IMRNet, IMRNetConfig, chamfer_l2, random_mask
from workers.imrnet.sampling import fps, geometry_rates, group_patches, sample_centers

log = logging.getLogger("inspectd.imrnet")

GEOMETRY_K = 16
"""Neighbours for the normals / curvature / rates of change of GPS (Sec. 4.1)."""


@dataclass
class TrainSettings:
    """One training run (pretraining or fine-tuning)."""

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    mask_ratio: float = 0.4
    sampler: str = "gps"
    tau: float = 0.3
    density_ratio: float = 2.0
    aug_rotate_deg: float = 180.0
    aug_scale: float = 0.1
    aug_jitter: float = 0.002
    seed: int = 0
    checkpoint_every: int = 100

    @classmethod
    def pretrain(cls, **kw: Any) -> TrainSettings:
        return cls(**kw)

    @classmethod
    def finetune(cls, **kw: Any) -> TrainSettings:
        base = {"steps": 100, "lr": 5e-4, "warmup_steps": 10, "aug_rotate_deg": 3.0, "aug_scale": 0.03,
                "aug_jitter": 0.002, "checkpoint_every": 0}
        base.update(kw)
        return cls(**base)


@dataclass
class CloudPool:
    """Training clouds, already normalized: points (P×N×3 float32) and GPS rates (P×N float32)."""

    points: torch.Tensor
    rates: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.points.shape[0])


# ------------------------------------------------------------------------------------------------
# data


def normalize_unit_sphere(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(normalized points, centroid, scale): centred on the centroid, largest radius 1 (Point-MAE)."""
    c = points.mean(axis=0)
    r = float(np.linalg.norm(points - c, axis=1).max())
    r = r if r > 0 else 1.0
    return ((points - c) / r).astype(np.float32), c, r


def sample_surface(vertices: np.ndarray, triangles: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniformly distributed over a triangle mesh's area (vectorized)."""
    a, b, c = vertices[triangles[:, 0]], vertices[triangles[:, 1]], vertices[triangles[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    tri = rng.choice(len(triangles), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    return a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])


def reduce_points(
    points: np.ndarray | torch.Tensor, n: int, generator: torch.Generator | None = None
) -> np.ndarray | torch.Tensor:
    """Indices of ``n`` points by farthest point sampling; all points (repeated) if there are fewer.

    numpy in, numpy out; a tensor in, a tensor of indices out on its device (FPS by
    ``workers.geometry.farthest_point_sample``: the same picks as for the numpy input, whose
    float32 copy goes through the same function; the start comes from ``generator`` on the CPU).
    """
    m = len(points)
    if isinstance(points, torch.Tensor):
        if m <= n:
            return torch.arange(m, device=points.device).repeat(math.ceil(n / m))[:n]
        return fps(points.float().contiguous(), n, generator)
    if m <= n:
        return np.resize(np.arange(m), n)
    return fps(torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)), n, generator).numpy()


def pool_from_clouds(clouds: Sequence[np.ndarray], info: dict[str, Any] | None = None) -> CloudPool:
    """Stack normalized N×3 clouds (same N) and compute their GPS rates of change."""
    pts = np.stack([np.asarray(c, dtype=np.float32) for c in clouds])
    rates = np.stack([geometry_rates(c, GEOMETRY_K) for c in pts])
    return CloudPool(torch.from_numpy(pts), torch.from_numpy(rates), info or {})


def synthetic_pool(
    n_points: int,
    classes: Sequence[str] | None = None,
    instances: int = 16,
    variation: float = 0.1,
    dense: int = 16384,
    seed: int = 0,
    progress: bool = False,
) -> CloudPool:
    """Pretraining clouds from the procedural part library (see the module docstring)."""
    from tqdm import tqdm

    from sensors.parts import PART_CLASSES, make_part

    names = list(classes or PART_CLASSES)
    clouds = []
    jobs = [(c, i) for c in names for i in range(instances)]
    for cls, i in tqdm(jobs, desc="synthetic parts", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, names.index(cls), i, 7])
        mesh = make_part(cls, rng, tolerance=variation)
        v = np.asarray(mesh.vertices, dtype=np.float64)
        f = np.asarray(mesh.triangles, dtype=np.int64)
        dense_pts = sample_surface(v, f, dense, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        idx = reduce_points(dense_pts, n_points, gen)
        clouds.append(normalize_unit_sphere(dense_pts[idx])[0])
    return pool_from_clouds(clouds, {"classes": names, "instances": instances, "variation": variation,
                                     "dense": dense, "seed": seed, "n_points": n_points})


def augment(points: torch.Tensor, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """Random z rotation, anisotropic scale and jitter of normalized clouds (B×N×3)."""
    b = points.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(settings.aug_rotate_deg)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cos, -sin, sin, cos, 1.0
    scale = 1.0 + (torch.rand(b, 1, 3, generator=gen) * 2 - 1) * settings.aug_scale
    out = (points @ rot.transpose(1, 2)) * scale
    if settings.aug_jitter > 0:
        out = out + torch.randn(out.shape, generator=gen) * settings.aug_jitter
    return out


def make_batch(
    pool: CloudPool, cfg: IMRNetConfig, settings: TrainSettings, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented training batch as point patches: (neighbourhoods B×n×k×3, centres B×n×3)."""
    pick = torch.randint(len(pool), (settings.batch_size,), generator=gen)
    pts = augment(pool.points[pick], settings, gen)
    cidx = sample_centers(settings.sampler, pts, cfg.n_centers, pool.rates[pick], settings.tau,
                          settings.density_ratio, gen)
    neigh, centers, _ = group_patches(pts, cidx, cfg.group_size)
    return neigh, centers


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to ``lr`` then cosine decay to 1 % of it."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / max(1, settings.warmup_steps)
    span = max(1, settings.steps - settings.warmup_steps)
    t = min(1.0, (step - settings.warmup_steps) / span)
    return settings.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: IMRNet, settings: TrainSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )


# ------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, no pickle)


def weights_to_tensors(model: IMRNet, prefix: str = "net.", half: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        t = v.detach().clone().contiguous()
        if half and t.is_floating_point():
            t = t.half()
        out[prefix + k] = t
    return out


def load_weights(model: IMRNet, tensors: dict[str, Any], prefix: str = "net.") -> None:
    """Load ``prefix``-ed weights (torch or numpy, any float precision) into ``model`` (strict)."""
    own = model.state_dict()
    state = {}
    for k, ref in own.items():
        key = prefix + k
        if key not in tensors:
            raise KeyError(f"checkpoint lacks {key}")
        t = torch.as_tensor(np.asarray(tensors[key])) if not isinstance(tensors[key], torch.Tensor) else tensors[key]
        if t.ndim != ref.ndim and t.numel() == ref.numel():
            t = t.reshape(ref.shape)  # 0-d tensors come back 1-d from numpy round trips
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(ref.shape)}")
        state[k] = t.to(ref.dtype)
    model.load_state_dict(state, strict=True)


def save_checkpoint(
    path: str | Path, model: IMRNet, optimizer: torch.optim.Optimizer, step: int, settings: TrainSettings,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Resumable state: ``path`` (safetensors: weights + AdamW moments) and ``path.json``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = weights_to_tensors(model)
    sd = optimizer.state_dict()
    for idx, st in sd["state"].items():
        for name, val in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(val).detach().clone().contiguous()
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(p)
    meta = {"step": step, "settings": asdict(settings), "config": model.config.to_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                             for g in sd["param_groups"]],
            **(extra or {})}
    p.with_name(p.name + ".json").write_text(json.dumps(meta, indent=2))
    return p


def load_checkpoint(path: str | Path, model: IMRNet, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and AdamW state saved by :func:`save_checkpoint`; returns its JSON meta."""
    p = Path(path)
    meta = json.loads(p.with_name(p.name + ".json").read_text())
    tensors = load_file(str(p))
    load_weights(model, tensors)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ------------------------------------------------------------------------------------------------
# the loop


def train(
    model: IMRNet,
    pool: CloudPool,
    settings: TrainSettings,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Masked point-patch reconstruction training (Sec. 4.2, Eq. 12). Returns a summary dict.

    With ``checkpoint`` the resumable state is written every ``settings.checkpoint_every`` steps
    and at the end; with ``resume`` too, training continues from it when it exists.
    """
    from tqdm import tqdm

    if len(pool) == 0:
        raise ValueError("no training clouds")
    cfg = model.config
    opt = make_optimizer(model, settings)
    start, losses = 0, []
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        meta = load_checkpoint(checkpoint, model, opt)
        start, losses = int(meta["step"]), list(meta.get("losses", []))
        log.info("resumed %s at step %d from %s", desc, start, checkpoint)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, settings.steps), desc=desc, disable=not progress, initial=start, total=settings.steps,
               leave=False)
    ema = None
    for step in bar:
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        neigh, centers = make_batch(pool, cfg, settings, gen)
        vis, mask = random_mask(neigh.shape[0], cfg.n_centers, settings.mask_ratio, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings)
        pred, gt = model(neigh, centers, vis, mask)
        loss = chamfer_l2(pred, gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        val = float(loss.detach())
        losses.append(val)
        ema = val if ema is None else 0.95 * ema + 0.05 * val
        bar.set_postfix(loss=f"{ema:.5f}")
        if on_step is not None:
            on_step(step, val)
        done = step + 1
        if checkpoint is not None and settings.checkpoint_every > 0 and (
            done % settings.checkpoint_every == 0 or done == settings.steps
        ):
            save_checkpoint(checkpoint, model, opt, done, settings, {"losses": losses})
    model.eval()
    tail = losses[-50:] if losses else [float("nan")]
    return {"steps": settings.steps, "final_loss": float(np.mean(tail)), "seconds": time.perf_counter() - t0,
            "losses": losses}


def save_pretrained(path: str | Path, model: IMRNet, meta: dict[str, Any], half: bool = True) -> Path:
    """The shipped weights: ``path`` (safetensors, float16 by default: half the size) + ``path.json``.

    The JSON sidecar is ``path`` with the suffix ``.json`` (``imrnet-small.json``).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights_to_tensors(model, half=half), str(p))
    full = {"config": model.config.to_dict(), "dtype": "float16" if half else "float32", **meta}
    p.with_suffix(".json").write_text(json.dumps(full, indent=2))
    return p


def load_pretrained(path: str | Path) -> tuple[IMRNet, dict[str, Any]]:
    """An :class:`IMRNet` (float32, eval mode) from :func:`save_pretrained`'s files."""
    p = Path(path)
    meta = json.loads(p.with_suffix(".json").read_text())
    model = IMRNet(IMRNetConfig.from_dict(meta["config"]))
    load_weights(model, load_file(str(p)))
    model.eval()
    return model, meta
