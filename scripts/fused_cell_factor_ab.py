"""In-process scoring time of ``fused`` at several ``patchcore_voxel_factor`` values, in one process.

Why: the factor trades the patchcore component's resolution for time; two ``inspectd bench``
runs minutes apart on a shared machine do not compare, so each factor is enrolled on the same
bench frames (``tools.bench.run.make_frames``: the flange, 5 good training parts) and scores the
same 10 frames (half with a bulge) by ``score_frame``, the actor's code path without transport,
in alternating rounds. Prints the p50 per factor and round and the mean of each stage.

    OMP_NUM_THREADS=1 python scripts/fused_cell_factor_ab.py --size cloud-30k --factors 1,1.5 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from daemon.enrollment import enroll
    from tools.bench.run import PRODUCT, make_frames
    from workers.model_store import load_product_model
    from workers.score_frame import score_frame

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="cloud-30k", choices=["cloud-30k", "organized-400", "organized-1920x1200"])
    ap.add_argument("--factors", default="1,1.5")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as an actor
    good, params = make_frames(args.size, 8, 1, True)
    test, _ = make_frames(args.size, 10, 2, False)
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for f in [float(x) for x in args.factors.split(",")]:
            root = Path(tmp) / str(f)
            enroll(root, PRODUCT, good[:5], "fused", params, {"patchcore_voxel_factor": f}, progress=False)
            models[f] = load_product_model(root, PRODUCT)
            score_frame(models[f].scorer, test[0], models[f].preprocess)  # warm-up
        print("| round | factor | p50 ms | stage means, ms |\n|---|---|---:|---|")
        for rnd in range(args.rounds):
            for f, m in models.items():
                totals, stages = [], {}
                for frame in test:
                    t0 = time.perf_counter()
                    r = score_frame(m.scorer, frame, m.preprocess)
                    totals.append(time.perf_counter() - t0)
                    for k, v in r.timings.items():
                        stages.setdefault(k, []).append(v)
                means = ", ".join(f"{k} {1000 * statistics.fmean(v):.1f}" for k, v in stages.items()
                                  if k in ("preprocess", "template", "patchcore", "patchcore_features", "patchcore_search"))
                print(f"| {rnd + 1} | {f:g} | {1000 * statistics.median(totals):.1f} | {means} |")


if __name__ == "__main__":
    main()
