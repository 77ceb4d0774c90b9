"""Fit IMRNet on good parts of one product (docs/design/imrnet.md, fit steps 1–7): normalization,
reductions and pose, fine-tuning from the pretrained weights, the feature template, τ, the
training phase's per-template scores and the score statistics. Runs on the CPU.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.imrnet.align import apply
from workers.imrnet.network import IMRNet
from workers.imrnet.training import TrainSettings, load_pretrained, pool_from_clouds, reduce_points, train
from workers.preprocess import PreparedCloud

if TYPE_CHECKING:
    from workers.imrnet.scorer import IMRNetScorer

log = logging.getLogger("inspectd.imrnet")

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_PRETRAINED = PRETRAINED_DIR / "imrnet-small.safetensors"
CONFIG_KEYS = ("n_points", "n_centers", "group_size", "dim", "heads", "enc_depth", "dec_depth", "mlp_ratio",
               "embed_hidden")
TOKEN_KEYS = ("n_points", "n_centers")
"""Sizes that set how many points / tokens the network sees, not the shape of any weight."""


def fit_model(scorer: IMRNetScorer, clouds: Sequence[PreparedCloud], progress: bool) -> None:
    """Fit ``scorer`` in place (network, template, τ, reference scores, statistics, ``fit_info``)."""
    from tqdm import tqdm

    if len(clouds) == 0:
        raise ValueError("imrnet needs at least one good training cloud")
    model, source = initial_model(scorer)  # first: missing pretrained weights refuse before any work
    scorer._runners = None  # fit trains and measures on the torch module itself
    t0 = time.perf_counter()
    raw = [scorer._check(c).astype(np.float64) for c in clouds]
    radii = [float(np.linalg.norm(p - p.mean(axis=0), axis=1).max()) for p in raw]
    scorer.norm_scale = float(np.mean(radii)) if np.mean(radii) > 0 else 1.0
    n_red = max(scorer.finetune_samplings, scorer.template_samplings) + 1  # the last one: score stats
    scorer.align_reference = None
    normed: list[Any] = []
    reduced: list[list[Any]] = []
    for i, p in enumerate(tqdm(raw, desc="imrnet reduce", disable=not progress, leave=False)):
        nm = scorer._normalize(torch.from_numpy(p))
        rs = [nm[reduce_points(nm, scorer.config.n_points, scorer._gen(1, i, j))] for j in range(n_red)]
        if scorer.align != "none":
            if scorer.align_reference is None:
                scorer.align_reference = rs[0].numpy()  # the first good part's pose is the product's reference
            else:
                t, _ = scorer._register(rs[0])
                nm, rs = apply(t, nm), [apply(t, r) for r in rs]
        normed.append(nm)
        reduced.append(rs)
    pool = pool_from_clouds([r.numpy() for rs in reduced for r in rs[: scorer.finetune_samplings]])
    t1 = time.perf_counter()

    settings = TrainSettings.finetune(
        steps=scorer.finetune_steps, lr=scorer.finetune_lr, batch_size=scorer.batch_size, mask_ratio=scorer.mask_ratio,
        sampler=scorer.sampler, tau=scorer.tau, density_ratio=scorer.density_ratio,
        aug_rotate_deg=scorer.aug_rotate_deg, aug_scale=scorer.aug_scale, aug_jitter=scorer.aug_jitter, seed=scorer.seed,
    )
    summary = {"final_loss": float("nan"), "seconds": 0.0}
    if scorer.finetune_steps > 0:
        if scorer.train_checkpoint is not None:
            settings.checkpoint_every = 50
        summary = train(model, pool, settings, progress=progress, checkpoint=scorer.train_checkpoint,
                        resume=scorer.train_resume, desc="imrnet fine-tune")
    model.eval()
    scorer.model = model
    t2 = time.perf_counter()

    # template (Sec. 4.3): features of every patch of template_samplings reductions per cloud
    feats, patches = [], []
    with torch.inference_mode():
        for i, rs in enumerate(reduced):
            for j in range(scorer.template_samplings):
                gen = scorer._gen(2, i, j)
                neigh, centers, members = scorer._patches(rs[j], gen)
                patches.append((rs[j], neigh, centers, members, gen))
                feats.append(model.features(neigh[None], centers[None])[0])
    template = torch.cat(feats)
    scorer.template = template.contiguous()
    # τ of Eq. 19: the template_quantile quantile of the drift of good reconstructions
    scorer.template_tau = float("inf")
    scorer.template_ref = None
    drifts = []
    for i, rs in enumerate(reduced):
        gen = scorer._gen(3, i)
        neigh, centers, members = scorer._patches(rs[-1], gen)
        drifts.append(scorer._compare(rs[-1], neigh, centers, members, gen)[3].numpy())
    if scorer.template_quantile < 1.0:
        scorer.template_tau = float(np.quantile(np.concatenate(drifts), scorer.template_quantile))
    # the training phase's own comparison scores per template patch (reference="patch")
    if scorer.reference == "patch":
        refs = []
        for red, neigh, centers, members, gen in patches:
            ap, af, _, _ = scorer._compare(red, neigh, centers, members, gen)
            refs.append(torch.stack([ap[members].mean(dim=1), af], dim=1))
        scorer.template_ref = torch.cat(refs).float().contiguous()
    # score statistics on the good clouds (another reduction than the template's)
    scorer.stats = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float64)
    aps, afs = [], []
    for i, rs in enumerate(reduced):
        ap, af, _ = scorer._raw_scores(normed[i], rs[-1], scorer._gen(3, i))
        aps.append(ap.numpy())
        afs.append(af.numpy())
    ap_all, af_all = np.concatenate(aps), np.concatenate(afs)
    scorer.stats = np.array([float(ap_all.mean()), max(float(ap_all.std()), 1e-12), float(af_all.mean()),
                           max(float(af_all.std()), 1e-12)], dtype=np.float64)
    scorer.fit_info = {"pretrained": source, "finetune_loss": summary["final_loss"],
                     "seconds": {"reduce": t1 - t0, "finetune": t2 - t1, "template": time.perf_counter() - t2},
                     "template_size": int(template.shape[0]), "template_tau": scorer.template_tau}
    log.info("imrnet fit: %s", scorer.fit_info)
    if scorer.backend != "torch-cpu":
        scorer._runners = scorer._make_runners(scorer.backend)


def _random_init_allowed(scorer: IMRNetScorer, why: str) -> None:
    """Fine-tuning from random weights gives a much weaker model: refuse unless allowed."""
    if not scorer.allow_random_init:
        raise ValueError(f"imrnet: {why}; refusing to fine-tune from a random initialization. Train the "
                         "weights (`inspectd train --scorer imrnet --pretrain`), point `pretrained` at them, "
                         "or pass --allow-random-init (or pretrained='none') to accept a random start")
    warnings.warn(f"imrnet: {why}; fine-tuning from a random initialization (allowed)", stacklevel=4)

def initial_model(scorer: IMRNetScorer) -> tuple[IMRNet, str]:
    """The network fine-tuning starts from, and where it came from: the pretrained weights, resized
    to other point / centre counts when only those differ; a random start only where allowed."""
    path = None
    if scorer.pretrained == "auto":
        path = DEFAULT_PRETRAINED
    elif scorer.pretrained not in ("", "none"):
        path = Path(scorer.pretrained)
    if path is None:
        return IMRNet(scorer.config), "none (random init, pretrained='none')"
    if not path.is_file():
        _random_init_allowed(scorer, f"no pretrained weights at {path}")
        return IMRNet(scorer.config), "none (missing file)"
    model, meta = load_pretrained(path)
    if any(getattr(model.config, k) != getattr(scorer.config, k) for k in CONFIG_KEYS if k not in TOKEN_KEYS):
        _random_init_allowed(scorer, f"pretrained weights {path} have other sizes ({model.config})")
        return IMRNet(scorer.config), "none (size mismatch)"
    if model.config != scorer.config:  # same weights, other point / centre counts: start from them
        resized = IMRNet(scorer.config)
        resized.load_state_dict(model.state_dict())
        return resized, f"{path} (pretrained at {model.config.n_points} points × {model.config.n_centers} centres)"
    return model, str(path)
