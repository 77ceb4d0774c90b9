"""Fit 3DzAL (docs/design/zeroshot.md, paper Sec. 3.2–3.3): pseudo anomalies, the two networks,
the feature blocks' scales and the memory bank, into a :class:`ZeroShotModel`.

Runs on the CPU. The scorer (``workers.zeroshot.scorer``) hands in its patch pipeline (its
``_prepare`` / ``_blocks``), so the bank holds exactly the features ``score`` computes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from workers.components.memory_bank import greedy_coreset
from workers.preprocess import PreparedCloud
from workers.zeroshot.params import parse_mix
from workers.zeroshot.patches import patch_radius
from workers.zeroshot.pseudo_anomalies import NormalCloud, PoiPool, collect_pois, generate_pseudo_anomalies
from workers.zeroshot.resnet import ResNet50, load_checkpoint
from workers.zeroshot.torch_model import FEATURE_DIM, ZeroShotModel
from workers.zeroshot.training import TrainConfig, train_networks

if TYPE_CHECKING:
    from workers.zeroshot.scorer import Prepared, ZeroShotScorer

log = logging.getLogger("inspectd.zeroshot")


def fit_model(scorer: ZeroShotScorer, clouds: Sequence[PreparedCloud], auxiliary: Sequence[PreparedCloud] | None,
              progress: bool) -> dict[str, Any]:
    """Fit ``scorer.model`` on ``clouds`` (bank and positives; POIs from ``auxiliary``, else from
    ``clouds`` across products). Returns what was done and how long it took (``fit_info``)."""
    from tqdm import tqdm

    if len(clouds) == 0:
        raise ValueError("zeroshot needs at least one good training cloud")
    p = scorer.hparams
    t0 = time.perf_counter()
    rng = np.random.default_rng(p.seed)
    cpu = torch.device("cpu")
    prep = [scorer._prepare(c, device=cpu)
            for c in tqdm(clouds, desc="3dzal fpfh+patches", disable=not progress, leave=False)]
    t1 = time.perf_counter()
    info: dict[str, Any] = {"n_clouds": len(clouds), "n_patches": int(sum(len(q.patches) for q in prep))}
    model = scorer.model = ZeroShotModel()
    model.fpfh_mean = torch.from_numpy(torch.cat([q.patch_fpfh for q in prep]).numpy().mean(axis=0).astype(np.float32))
    if p.use_learned or p.use_classifier:
        model.encoder, model.classifier = _train(scorer, prep, clouds, auxiliary, rng, progress, info)
    t2 = time.perf_counter()

    model.rgb = _load_rgb(scorer, clouds, prep)
    blocks = [torch.cat(b).numpy() for b in zip(*(scorer._blocks(q) for q in prep), strict=True)]
    rms = [max(float(np.sqrt(((b - b.mean(axis=0)) ** 2).sum(axis=1).mean())), 1e-6) for b in blocks]
    if model.encoder is not None:
        rms[1] = 1.0  # the learned block stays on its unit sphere (docs/design/zeroshot.md)
    model.block_scale = torch.tensor(rms, dtype=torch.float32)
    bank = model.combine([torch.from_numpy(b) for b in blocks], p.learned_weight).numpy()
    n_keep = _coreset_size(p.coreset_ratio, p.coreset_max, len(bank))
    idx = np.arange(len(bank))
    if n_keep < len(bank):
        idx = greedy_coreset(bank, n_keep, p.coreset_projection_dim, p.seed, progress)
    model.memory_bank = torch.from_numpy(np.ascontiguousarray(bank[idx]))
    model.dist_scale = torch.tensor([_distance_scale(model, bank, idx)], dtype=torch.float32)
    info.update({
        "memory_bank": [int(len(idx)), int(bank.shape[1])],
        "dist_scale": float(model.dist_scale),
        "block_scale": model.block_scale.tolist(),
        "rgb_branch": model.rgb is not None,
        "seconds": {"features": t1 - t0, "train": t2 - t1, "bank": time.perf_counter() - t2},
    })
    log.info("3DzAL fitted: %s", {k: v for k, v in info.items() if k != "history"})
    return info


def _coreset_size(ratio: float, most: int, n: int) -> int:
    if ratio >= 1.0:
        return min(n, most)
    return min(n, most, max(1, int(ratio * n)))


def _distance_scale(model: ZeroShotModel, bank: np.ndarray, kept: np.ndarray) -> float:
    """Mean distance of the left-out training patches to the coreset; without a reduction, the
    mean leave-one-out nearest-neighbour distance inside the bank (docs/design/zeroshot.md)."""
    rest = np.setdiff1d(np.arange(len(bank)), kept)
    if len(rest):
        d = model.bank.nearest_distances(model.bank.centre(torch.from_numpy(bank[rest]))).cpu()
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
    scorer: ZeroShotScorer,
    prep: Sequence[Prepared],
    clouds: Sequence[PreparedCloud],
    auxiliary: Sequence[PreparedCloud] | None,
    rng: np.random.Generator,
    progress: bool,
    info: dict[str, Any],
) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """f_θ and g_φ (Sec. 3.3) from the normal patches (positives) and pseudo anomalies (Sec. 3.2)."""
    p, model = scorer.hparams, scorer.model
    assert model is not None
    xyz = torch.cat([q.xyz for q in prep]).numpy()
    fp = torch.cat([q.patch_fpfh for q in prep]).numpy()
    if p.disentangle_centered:
        fp = fp - model.fpfh_mean.numpy()
    sel = rng.permutation(len(xyz))[: p.max_train_patches] if p.max_train_patches > 0 else np.arange(len(xyz))
    if p.patch_scale == "fixed":
        model.patch_scale = patch_radius(xyz[sel]).median().reshape(1)
    positives = scorer._normalize(xyz[sel])
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
    sources = _stratified(sources, p.poi_max_sources, rng)
    mix = parse_mix(p.pseudo_mix)
    t0 = time.perf_counter()
    pool = collect_pois(sources, p.poi_percent / 100.0, seed=p.seed, crop=p.crop_to_part) if mix > 0 else None
    t1 = time.perf_counter()
    normals = [NormalCloud(q.cloud.points, cKDTree(q.cloud.points), products[i]) for i, q in enumerate(prep)]
    n_neg = max(1, int(round(p.negative_ratio * len(sel))))
    if pool is None:  # removing-only: no POIs needed
        pool = PoiPool([], [], [], [])
    neg, kind = generate_pseudo_anomalies(
        normals, pool, n_neg, p.patch_points, mix, p.part_points,
        (p.remove_ratio_min, p.remove_ratio_max), p.rotate_parts, rng,
    )
    negatives = scorer._normalize(neg)
    t2 = time.perf_counter()
    cfg = TrainConfig(
        epochs=p.epochs, batch_positives=p.batch_positives, lr=p.lr, temperature=p.temperature,
        contrastive_weight=p.contrastive_weight, disentangle_weight=p.disentangle_weight,
        disentangle_warmup=p.disentangle_warmup, feature_dim=FEATURE_DIM, width=p.width, seed=p.seed,
    )
    encoder, classifier, history = train_networks(
        positives, positive_fpfh, negatives, cfg, p.use_learned, p.use_classifier, progress, p.checkpoint_dir,
    )
    info.update({
        "n_positives": len(sel),
        "n_negatives": int(n_neg),
        "n_adding": int(kind.sum()),
        "poi_sources": len(sources),
        "n_pois": int(sum(len(x) for x in pool.poi)),
        "history": history,
        "train_seconds": {"pois": t1 - t0, "pseudo": t2 - t1, "networks": time.perf_counter() - t2},
    })
    return encoder, classifier


def _load_rgb(scorer: ZeroShotScorer, clouds: Sequence[PreparedCloud], prep: Sequence[Prepared]) -> ResNet50 | None:
    checkpoint = scorer.hparams.rgb_checkpoint
    if not checkpoint:
        log.info("3DzAL: RGB branch left out (no rgb_checkpoint: no local ImageNet checkpoint given; "
                 "nothing is downloaded)")
        return None
    ok = all(c.frame is not None and c.frame.organized and c.frame.rgb is not None for c in clouds) and all(
        q.patches.organized for q in prep
    )
    if not ok:
        log.warning("3DzAL: RGB branch left out: not every training frame is organized with an RGB image")
        return None
    try:
        model = load_checkpoint(checkpoint)
    except (OSError, ValueError) as exc:  # the operator asked for the RGB branch: do not drop it silently
        raise ValueError(f"3DzAL: rgb_checkpoint {checkpoint} cannot be used ({exc}); give a local "
                         "ImageNet ResNet-50 checkpoint or leave rgb_checkpoint empty") from exc
    log.info("3DzAL: RGB branch on (%s)", checkpoint)
    # keep only what the features use (no layer4 / fc in the artifact)
    model.layer4 = torch.nn.Sequential()
    model.fc = torch.nn.Identity()  # type: ignore[assignment]
    return model


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
