"""``inspectd train``: train a learned scorer (IMRNet) — pretraining or per-product fine-tuning.

Pretraining (IMRNet Sec. 5.3: the paper pretrains on ShapeNet-55; we use the procedural part
library ``sensors.parts``, see ``workers.imrnet.training``)::

    inspectd train --scorer imrnet --pretrain --out workers/imrnet/pretrained/imrnet-small.safetensors \\
        --steps 1500 --seed 0

writes the weights (float16 safetensors, ``--full-precision`` for float32) and a JSON sidecar
(``imrnet-small.json``: sizes, training settings, data, command, loss), and every
``--checkpoint-every`` steps a resumable state (weights + AdamW moments, safetensors + JSON) to
``--state`` (default ``out/imrnet-train/<name>.state.safetensors``); ``--resume`` continues from
it exactly (per-step seeded randomness).

Fine-tuning on a product's good parts (what ``inspectd enroll --scorer imrnet`` also does,
here with a resumable state and the training knobs)::

    inspectd train --scorer imrnet --product flange --good scans/flange/good --config inspectd.yaml

fits the scorer (fine-tune from the pretrained weights + feature template) and writes the
product's model folder under the config's ``models_dir`` (or ``--models``), as enroll does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tools.evaluation.cli import parse_params

log = logging.getLogger("inspectd.train")

DEFAULT_STATE_DIR = Path("out/imrnet-train")


def _command() -> str:
    return " ".join(["inspectd", *sys.argv[1:]])


def pretrain(args: argparse.Namespace) -> int:
    import torch

    from workers.imrnet.network import IMRNet, IMRNetConfig, count_parameters
    from workers.imrnet.training import TrainSettings, save_pretrained, synthetic_pool, train

    if not args.out:
        print("inspectd train: --pretrain needs --out", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    cfg_over = parse_params(args.param)
    cfg = IMRNetConfig.from_dict({**IMRNetConfig().to_dict(), **cfg_over})
    out = Path(args.out)
    state = Path(args.state) if args.state else DEFAULT_STATE_DIR / f"{out.stem}.state.safetensors"
    t0 = time.perf_counter()
    pool = synthetic_pool(cfg.n_points, instances=args.instances, variation=args.variation, seed=args.seed,
                          progress=not args.no_progress)
    data_seconds = time.perf_counter() - t0
    per_epoch = -(-len(pool) // args.batch_size)
    steps = args.steps if args.steps is not None else (args.epochs or 8) * per_epoch
    settings = TrainSettings.pretrain(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                      mask_ratio=args.mask_ratio, sampler=args.sampler,
                                      warmup_steps=min(100, max(1, steps // 10)),
                                      checkpoint_every=args.checkpoint_every)
    model = IMRNet(cfg)
    print(f"imrnet pretraining: {count_parameters(model)} parameters, {len(pool)} synthetic clouds of "
          f"{cfg.n_points} points, {steps} steps of {args.batch_size} (state: {state})", flush=True)
    summary = train(model, pool, settings, progress=not args.no_progress, checkpoint=state, resume=args.resume,
                    desc="imrnet pretrain")
    losses = summary.pop("losses")
    meta = {
        "command": _command(),
        "data": {"source": "sensors.parts procedural library", **pool.info, "clouds": len(pool),
                 "seconds": round(data_seconds, 1)},
        "settings": settings.__dict__,
        "parameters": count_parameters(model),
        "final_loss": summary["final_loss"],
        "loss_curve": [round(float(sum(losses[i:i + 50]) / len(losses[i:i + 50])), 6)
                       for i in range(0, len(losses), 50)],
        "train_seconds_this_run": round(summary["seconds"], 1),
        "torch": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = save_pretrained(out, model, meta, half=not args.full_precision)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {path.with_suffix('.json')}; "
          f"final loss {summary['final_loss']:.5f}")
    return 0


def finetune(args: argparse.Namespace) -> int:
    from daemon.config import load_config
    from daemon.enrollment import load_frames
    from workers.base import hash_training_data, part_hash
    from workers.model_store import save_product_model
    from workers.preprocess import prepare
    from workers.registry import scorer_class

    if not args.product or not args.good:
        print("inspectd train: fine-tuning needs --product and --good (or use --pretrain)", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    models = Path(args.models or cfg.storage.models_dir)
    pp = cfg.preprocess.params()
    frames = load_frames(args.good, args.product)
    clouds = [prepare(f, pp) for f in frames]
    params = {"voxel_size": pp.voxel_size, **parse_params(args.scorer_param)}
    if args.steps is not None:
        params["finetune_steps"] = args.steps
    if args.seed is not None:
        params["seed"] = args.seed
    scorer = scorer_class(args.scorer)(**params)
    state = Path(args.state) if args.state else DEFAULT_STATE_DIR / f"{args.product}.finetune.safetensors"
    if hasattr(scorer, "train_checkpoint"):
        scorer.train_checkpoint = state
        scorer.train_resume = bool(args.resume)
    scorer.fit(clouds, progress=not args.no_progress)
    path = save_product_model(models, args.product, scorer, pp, hash_training_data(clouds),
                              [part_hash(f.points) for f in frames])
    info = getattr(scorer, "fit_info", {})
    print(f"trained {args.product} ({args.scorer}, {len(frames)} good parts) → {path}"
          + (f"; {json.dumps(info, default=str)}" if info else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.scorer != "imrnet":
        print(f"inspectd train: only learned scorers train; {args.scorer!r} is fitted by `inspectd enroll`",
              file=sys.stderr)
        return 2
    return pretrain(args) if args.pretrain else finetune(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` on the ``inspectd`` parser (sets ``func``)."""
    t = sub.add_parser(
        "train",
        help="pretrain a learned scorer on synthetic parts, or fine-tune it on a product's good parts",
        description=__doc__.split("\n\n")[0],
    )
    t.add_argument("--scorer", default="imrnet")
    t.add_argument("--pretrain", action="store_true", help="self-supervised pretraining on the synthetic part library")
    t.add_argument("--out", help="pretraining: output weights (.safetensors; a .json sidecar is written beside)")
    t.add_argument("--product", help="fine-tuning: product name")
    t.add_argument("--good", help="fine-tuning: folder of good scans (PCD, PLY or XYZ TIFF)")
    t.add_argument("--config", help="fine-tuning: daemon config (preprocessing, models_dir)")
    t.add_argument("--models", help="fine-tuning: models folder (default: the config's)")
    t.add_argument("--steps", type=int, help="optimizer steps (pretraining default: 8 epochs; fine-tuning: the scorer's)")
    t.add_argument("--epochs", type=int, help="pretraining: passes over the synthetic pool (if --steps is not given)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3, help="pretraining peak learning rate")
    t.add_argument("--mask-ratio", type=float, default=0.4)
    t.add_argument("--sampler", default="gps", choices=("gps", "fps", "random"))
    t.add_argument("--instances", type=int, default=16, help="pretraining: parts per class")
    t.add_argument("--variation", type=float, default=0.1, help="pretraining: relative dimension jitter")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--param", action="append", metavar="KEY=VALUE", help="pretraining: network size (IMRNetConfig)")
    t.add_argument("--scorer-param", action="append", metavar="KEY=VALUE", help="fine-tuning: scorer parameter")
    t.add_argument("--state", help="resumable training state (.safetensors)")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    t.add_argument("--full-precision", action="store_true", help="pretraining: write float32 weights (default float16)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
