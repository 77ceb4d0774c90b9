"""Is scoring slower inside a Ray actor than in a plain process? The same model and frames,
scored alternately by a Ray actor (``workers.actor.ScoringWorker``, as the daemon runs it: one
CPU, worker niceness 0) and by a spawned process, each idling as long as it worked after every
frame (the bench's duty cycle). Prints both p50s of the scorer's own ``score`` time and their
ratio.

Why: ``inspectd bench`` compares a daemon run with in-process rounds taken minutes apart, on a
machine whose speed drifts; this puts the two side by side in one run, with nothing but the
actor's environment differing.

    python scripts/actor_vs_process.py --size cloud-30k --scorer fused --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _process_worker(models: str, frames: list, jobs: multiprocessing.Queue, out: multiprocessing.Queue) -> None:
    """Score the frames ``jobs`` names, one at a time, in this spawned process."""
    import torch

    from workers.actor import ScoringWorker

    torch.set_num_threads(1)
    worker = ScoringWorker(models, threads=1, backend="torch-cpu")
    worker.score(frames[0])
    out.put("ready")
    while (i := jobs.get()) is not None:
        t0 = time.perf_counter()
        timings = worker.score(frames[i])["timings"]
        out.put((time.perf_counter() - t0, timings["score"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="cloud-30k")
    ap.add_argument("--scorer", default="fused")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import ray

    from tools.bench.run import enroll_for_bench, make_frames
    from workers.actor import ScoringWorker

    good, params = make_frames(args.size, 8, seed=11, good_only=True)
    test, _ = make_frames(args.size, args.frames, seed=12, good_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        models = str(Path(tmp) / "models")
        enroll_for_bench(Path(models), args.scorer, args.size, good, params, 10)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 _system_config={"worker_niceness": 0})
        try:
            actor = ray.remote(num_cpus=1, concurrency_groups={"handover": 1})(ScoringWorker).remote(models, 1, "torch-cpu")
            ray.get(actor.score.remote(test[0]))
            refs = [ray.put(f) for f in test]
            ctx = multiprocessing.get_context("spawn")
            jobs, out = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_process_worker, args=(models, test, jobs, out))
            proc.start()
            assert out.get(timeout=600) == "ready"
            in_process, in_actor = [], []
            for _ in range(args.rounds):
                for i in range(len(test)):
                    jobs.put(i)
                    wall, score = out.get(timeout=600)
                    in_process.append(score)
                    time.sleep(wall)
                    t0 = time.perf_counter()
                    in_actor.append(ray.get(actor.score.remote(refs[i]))["timings"]["score"])
                    time.sleep(time.perf_counter() - t0)
            jobs.put(None)
            proc.join()
        finally:
            ray.shutdown()
    p, a = statistics.median(in_process), statistics.median(in_actor)
    print(f"{args.scorer} {args.size}, {len(in_process)} frames each: process score p50 {1000 * p:.1f} ms, "
          f"actor score p50 {1000 * a:.1f} ms, actor / process {a / p:.3f}; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
