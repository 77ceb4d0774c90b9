"""Scoring time of two checkouts of the code, measured back to back on the same models and frames.

Why: on a shared 2-core machine the load moves by a factor of several within minutes, so two
``inspectd bench`` runs minutes apart do not compare. Here each round scores the same frames
with the *before* code, then the *after* code, in fresh 1-thread processes (as the bench's
in-process worker and a Ray actor: ``OMP_NUM_THREADS=1``, one torch thread), and reports per
scorer × frame size the process CPU time per frame (all threads; less sensitive to other load
than wall time, though not immune: shared caches) and the wall time, with the load average.

    python scripts/ab_score_time.py enroll --models M --size cloud-30k --scorer fused
    python scripts/ab_score_time.py ab --models M --before /tmp/main-copy --after . \\
        --sizes cloud-30k,organized-1920x1200 --scorers fused,patchcore-fpfh --rounds 3

``enroll`` fits and calibrates a model the way ``inspectd bench`` does (its frames and seeds);
``ab`` prints a Markdown table; models are enrolled once, with either checkout (the artifact
format is the same). Frames: ``tools.bench.run.make_frames`` (seed 12, half defective).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _model_dir(models: Path, size: str, scorer: str) -> Path:
    return models / f"{size}-{scorer}"


def enroll(models: Path, size: str, scorer: str) -> None:
    from tools.bench.run import enroll_for_bench, make_frames

    good, params = make_frames(size, 8, seed=11, good_only=True)
    enroll_for_bench(_model_dir(models, size, scorer), scorer, size, good, params, 10)


def time_scoring(models: Path, size: str, scorer: str, frames: int) -> dict:
    """Per-frame CPU and wall seconds, mean stage seconds and object scores, in this process."""
    import torch

    from tools.bench.run import PRODUCT, make_frames
    from workers.model_store import load_product_model
    from workers.score_frame import score_frame

    torch.set_num_threads(1)
    test, _ = make_frames(size, frames, seed=12, good_only=False)
    model = load_product_model(_model_dir(models, size, scorer), PRODUCT)
    score_frame(model.scorer, test[0], model.preprocess)  # warm-up
    out: dict = {"cpu": [], "wall": [], "object": [], "stages": {}, "load": os.getloadavg()[0]}
    for frame in test:
        c0, w0 = time.process_time(), time.perf_counter()
        r = score_frame(model.scorer, frame, model.preprocess)
        out["cpu"].append(time.process_time() - c0)
        out["wall"].append(time.perf_counter() - w0)
        out["object"].append(r.object_score)
        for k, v in r.timings.items():
            out["stages"].setdefault(k, []).append(v)
    out["stages"] = {k: float(np.mean(v)) for k, v in out["stages"].items()}
    return out


def ab(args: argparse.Namespace) -> None:
    runs: dict[tuple[str, str, str], list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(args.rounds):
        for size in args.sizes.split(","):
            for scorer in args.scorers.split(","):
                for side, root in (("before", args.before), ("after", args.after)):
                    cmd = [sys.executable, str(Path(__file__).resolve()), "time", "--models", str(args.models),
                           "--size", size, "--scorer", scorer, "--frames", str(args.frames)]
                    done = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": str(Path(root).resolve())},
                                          check=True, capture_output=True, text=True)
                    runs.setdefault((size, scorer, side), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| frame | scorer | CPU ms p50 before → after (ratio) | CPU ms mean before → after | wall ms p50 before → after "
          "| registration ms mean before → after | object score max rel. diff | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for scorer in args.scorers.split(","):
            b, a = runs[(size, scorer, "before")], runs[(size, scorer, "after")]

            def cat(rs: list[dict], key: str) -> np.ndarray:
                return 1000 * np.concatenate([r[key] for r in rs])

            cb, ca = cat(b, "cpu"), cat(a, "cpu")
            ob, oa = np.array(b[0]["object"]), np.array(a[0]["object"])
            diff = float(np.max(np.abs(ob - oa) / np.maximum(np.abs(ob), 1e-12)))
            loads = [r["load"] for r in b + a]
            # the template's registration stage (template, fused), mean over the rounds
            rb = [r["stages"]["template_registration"] for r in b if "template_registration" in r["stages"]]
            ra = [r["stages"]["template_registration"] for r in a if "template_registration" in r["stages"]]
            reg = f"{1000 * np.mean(rb):.1f} → {1000 * np.mean(ra):.1f}" if rb and ra else "–"
            print(f"| {size} | {scorer} | {np.median(cb):.0f} → {np.median(ca):.0f} ({np.median(ca) / np.median(cb):.2f}) "
                  f"| {cb.mean():.0f} → {ca.mean():.0f} | {np.median(cat(b, 'wall')):.0f} → "
                  f"{np.median(cat(a, 'wall')):.0f} | {reg} | {diff:.1e} | {min(loads):.1f}–{max(loads):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("enroll", "time", "ab"):
        s = sub.add_parser(name)
        s.add_argument("--models", type=Path, required=True)
        if name == "ab":
            s.add_argument("--before", required=True)
            s.add_argument("--after", required=True)
            s.add_argument("--sizes", default="cloud-30k")
            s.add_argument("--scorers", default="fused,patchcore-fpfh")
            s.add_argument("--rounds", type=int, default=3)
        else:
            s.add_argument("--size", default="cloud-30k")
            s.add_argument("--scorer", default="fused")
        if name != "enroll":
            s.add_argument("--frames", type=int, default=6)
    args = p.parse_args()
    if args.cmd == "enroll":
        enroll(args.models, args.size, args.scorer)
    elif args.cmd == "time":
        print(json.dumps(time_scoring(args.models, args.size, args.scorer, args.frames)))
    else:
        ab(args)


if __name__ == "__main__":
    main()
