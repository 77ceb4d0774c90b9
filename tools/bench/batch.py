"""``inspectd bench --batch 1,4,8``: does scoring a batch of frames together pay?

For each scorer and frame size, one product is enrolled on simulated good parts, then, in a
spawned process with one torch and one OpenMP thread (as a default actor has), the same test
frames are scored through ``workers.score_frame.score_frames`` (the actor's batched path:
preprocess per frame, ``Scorer.score_many`` over the batch, map back per frame) in chunks of
each batch size. The batch sizes take turns, round after round, so a change of the machine's
load during the run hits them alike; per-frame times are medians over rounds and the result is
the ratio to batch 1 in the same run, in wall time and in the process's CPU time (which other
processes on a shared machine disturb far less). The scorer's own ``search`` stage (the bank
search that batching shares) is reported beside the total.

Results: ``<out>/<name>.json`` and ``.md``, naming the CPU (``lscpu``), the cores and the load
average (``/proc/loadavg``) before and after. Timings are measured here, never asserted in tests.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sensors.frame import Frame
from tools.bench.measure import load_average, machine_description
from tools.bench.report import write_report
from tools.bench.run import PRODUCT, enroll_for_bench, make_frames

ROUNDS = 3


def lscpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it (the machine description otherwise)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return str(machine_description()["cpu"])


def _worker(models: str, frames: list[Frame], batches: list[int], rounds: int, backend: str) -> dict[str, Any]:
    """In the spawned process: per-frame times of ``score_frames`` at each batch size."""
    import torch

    from workers.model_store import load_product_model
    from workers.score_frame import score_frames

    torch.set_num_threads(1)
    model = load_product_model(models, PRODUCT)
    model.scorer.use_backend(backend, Path(models) / ".engine-cache")
    score_frames(model.scorer, frames[:2], model.preprocess)  # warm-up
    per_frame: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    search: dict[int, list[float]] = {b: [] for b in batches}
    scores: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            found = []
            for start in range(0, len(frames), b):
                found += score_frames(model.scorer, frames[start:start + b], model.preprocess)
            per_frame[b].append((time.perf_counter() - t0) / len(frames))
            cpu[b].append((time.process_time() - c0) / len(frames))
            bad = [r for r in found if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"batch {b}: {bad[0]!r}")
            search[b].append(statistics.mean(sum(v for k, v in r.timings.items() if k.endswith("search"))
                                             for r in found))
            scores[b] = [r.object_score for r in found]
    same = all(max(abs(x - y) for x, y in zip(scores[b], scores[batches[0]], strict=True)) < 1e-4 for b in batches)
    return {
        "per_frame_ms": {b: 1000 * statistics.median(v) for b, v in per_frame.items()},
        "cpu_per_frame_ms": {b: 1000 * statistics.median(v) for b, v in cpu.items()},
        "search_ms": {b: 1000 * statistics.median(v) for b, v in search.items()},
        "rounds_per_frame_ms": {b: [round(1000 * x, 1) for x in v] for b, v in per_frame.items()},
        "same_scores": same,
    }


def bench_batching(scorer: str, size: str, n_frames: int, batches: list[int], backend: str) -> dict[str, Any]:
    """Enroll ``scorer`` at ``size`` and time batch sizes ``batches`` on ``n_frames`` frames."""
    good, params = make_frames(size, 8, seed=11, good_only=True)
    frames, _ = make_frames(size, n_frames, seed=12, good_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        enroll_for_bench(Path(tmp), scorer, size, good, params, imrnet_steps=10)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                load_before = load_average()
                r = pool.apply(_worker, (tmp, frames, batches, ROUNDS, backend))
                r["load_before"], r["load_after"] = load_before, load_average()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    base, base_cpu = r["per_frame_ms"][batches[0]], r["cpu_per_frame_ms"][batches[0]]
    r["speedup_vs_batch1"] = {b: base / v for b, v in r["per_frame_ms"].items()}
    r["cpu_speedup_vs_batch1"] = {b: base_cpu / v for b, v in r["cpu_per_frame_ms"].items()}
    return {"scorer": scorer, "size": size, "backend": backend, "frames": n_frames, **r}


def run_batch_bench(out: Path, name: str, scorers: list[str], sizes: list[str], n_frames: int,
                    batches: list[int], backend: str) -> dict[str, Any]:
    """Every scorer × size; writes ``<out>/<name>.json`` and ``.md``; returns the report."""
    if batches[0] != 1:
        batches = [1, *[b for b in batches if b != 1]]
    n_frames = max(n_frames, max(batches))
    report: dict[str, Any] = {
        "machine": {**machine_description(), "lscpu_model": lscpu_model()},
        "load_start": load_average(),
        "batches": batches,
        "results": [bench_batching(s, z, n_frames, batches, backend) for s in scorers for z in sizes],
        "load_end": load_average(),
    }
    write_report(out, name, report, render)
    return report


def render(r: dict[str, Any]) -> str:
    """The report as a Markdown table: per-frame time and its ratio to batch 1, per batch size."""
    m = r["machine"]
    lines = [
        "# Batching: per-frame scoring time at batch 1 vs larger batches",
        "",
        f"Machine: {m['lscpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}; "
        f"GPU: {m['gpu'] or 'none'}. Load average (1/5/15 min) at start {r['load_start']}, end {r['load_end']} "
        "(a shared machine: compare ratios within one run, not absolute times).",
        "",
        "In-process, one torch thread (as an actor), `workers.score_frame.score_frames` on the same frames "
        f"in chunks of each batch size, {ROUNDS} interleaved rounds, medians. Wall time and the process's CPU "
        "time (less sensitive to other load on a shared machine). `search`: the scorer's bank search per "
        "frame (what one batch shares). Speed-up > 1: batching pays.",
        "",
        "| scorer | size | backend | batch | wall ms / frame | CPU ms / frame | search ms / frame "
        "| speed-up vs batch 1 (wall) | speed-up vs batch 1 (CPU) | same scores |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in r["results"]:
        for b in r["batches"]:
            key = b if b in x["per_frame_ms"] else str(b)
            lines.append(
                f"| {x['scorer']} | {x['size']} | {x['backend']} | {b} | {x['per_frame_ms'][key]:.1f} | "
                f"{x['cpu_per_frame_ms'][key]:.1f} | {x['search_ms'][key]:.2f} | {x['speedup_vs_batch1'][key]:.3f} | "
                f"{x['cpu_speedup_vs_batch1'][key]:.3f} | {x['same_scores']} |")
    return "\n".join(lines) + "\n"
