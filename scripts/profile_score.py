"""Where one scorer's in-process time goes: cProfile over ``score_frame`` of the bench's frames.

Enrolls the bench product as ``inspectd bench`` does (``tools.bench.run``), scores one frame to
warm up, then profiles the rest with one torch and OpenMP thread, as an actor runs (open3d's
FPFH still uses every core). Prints the mean time per frame and the top functions by own time.

    OMP_NUM_THREADS=1 python scripts/profile_score.py --scorer fused --size cloud-30k --frames 10
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from tools.bench.run import PRODUCT, enroll_for_bench, make_frames
from tools.bench.stages import SIZES
from workers.model_store import load_product_model
from workers.score_frame import score_frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", default="fused")
    ap.add_argument("--size", default="cloud-30k", choices=SIZES)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    good, params = make_frames(args.size, 8, seed=11, good_only=True)
    test, _ = make_frames(args.size, args.frames + 1, seed=12, good_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        enroll_for_bench(models, args.scorer, args.size, good, params, imrnet_steps=10)
        model = load_product_model(models, PRODUCT)
        score_frame(model.scorer, test[0], model.preprocess)  # warm-up
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        for frame in test[1:]:
            score_frame(model.scorer, frame, model.preprocess)
        profile.disable()
        print(f"{args.scorer} {args.size}: {1000 * (time.perf_counter() - t0) / args.frames:.1f} ms per frame "
              f"(profiled, {args.frames} frames)")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
