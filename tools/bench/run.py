"""``inspectd bench``: how fast is inspection, in-process and through the real daemon path,
for every scorer × backend asked for.

``--scorer`` and ``--backend`` take comma-separated values or ``all``: every registered scorer;
every backend of that scorer that ``workers.backends.resolve_backend`` says is available here
(a backend named explicitly but not supported by a scorer, or not available here, is skipped
with the reason, recorded in the output). For each scorer × backend × frame size (a 30K-point
stitched cloud, a 400×400 camera frame, a 1920×1200 camera frame) it

1. enrolls and calibrates a product on simulated good parts of that size (once per scorer and
   size; every backend of the scorer then scores the same fitted model). ``imrnet`` is fitted
   with ``--imrnet-finetune-steps`` (default 10, the product default is 100) fine-tuning steps:
   the scoring cost is what is measured, and it does not depend on the step count; the output
   says so. ``zeroshot`` is fitted on good parts of *other* products (``ZEROSHOT_TRAIN``), as a
   zero-shot scorer is, and served as the product's model; its threshold is calibrated on the
   product's good parts (the threshold only sets the verdict, not the timing);
2. measures in-process scoring per stage (wire decode, the scorer's stages, map back, decision,
   verdict encoding) and the peak memory of the process, in a spawned 1-thread process like
   an actor, on the backend; with the daemon path, in two rounds, before and after the daemon's
   run (``bracket``), so both figures span the same stretch of a shared machine's load;
3. starts the daemon (``inspectd run``, embedded Ray, every core, ``workers.backend`` set) and
   measures, through ZeroMQ + Ray + decision: throughput at saturation (frames pushed unpaced)
   and p50 / p99 latency (send → verdict received) at a fixed offered rate (half the saturation
   throughput), the peak memory of the daemon and its Ray workers, and the daemon's own stage
   times over the paced run (deltas of its ``inspectd_stage_seconds`` histogram, scraped from
   ``/metrics`` before and after: the daemon measures decode, queue, put, actor wait,
   deserialize, every worker stage, return, decision, map files, log and publish itself), and
   from them and the verdicts every hop of the path (``tools.bench.daemon_path``);
4. reports the daemon path's overhead over in-process scoring as the ratio of p50 latencies.

Stages, under the issue's names. Each measured key maps onto one stage (``STAGE_OF``); a stage a
scorer does not have is left empty (``null`` / "–"), not zero:

* ``decode``: wire decode of the frame (in-process: the bench's ``decode_frame``; daemon: its
  ``decode``).
* ``preprocess``: ``workers.preprocess.prepare`` (valid points, plane, voxels) and the scorer's
  own input preparation: imrnet ``reduce`` (normalization, FPS, ICP) and ``sample`` (GPS
  centres, kNN patches); zeroshot ``patches`` (kNN tree, patch extraction, FPFH pooling).
* ``features``: hand-made descriptors: patchcore ``features`` and zeroshot ``fpfh`` (FPFH).
* ``network``: neural-network passes on the backend: imrnet ``reconstruct`` (Algorithm 1's
  rounds) and ``dfc`` (DFC features); zeroshot ``encoder`` (f_θ) and ``classifier`` (g_φ with
  Eq. 8's perturbation).
* ``search``: comparison with what was learned and the arithmetic that turns it into point and
  object scores: patchcore ``search`` and ``smooth``; imrnet ``template_search``, ``compare``,
  ``combine``; zeroshot ``search`` and ``upsample``; template ``registration`` (aligning the
  part to its golden reference), ``deviation``, ``missing`` and ``smooth``; fused-defects
  ``defect_head``. ``fused`` reports its components' keys prefixed (``template_registration``,
  ``patchcore_features``, ...), mapped as the components' own; its per-component totals
  (``template``, ``patchcore``) are not mapped, their parts are.
* ``decision``: pass / review / fail (in-process: ``decide``; daemon: its ``decision`` stage).
* ``emit``: per-point scores mapped back to the frame (``map_back``) and the verdict put out:
  in-process, verdict encoding (``encode_verdict``); daemon, ``maps`` (map files; ``none`` in
  the bench), ``log`` (SQLite commit) and ``publish`` (ZeroMQ PUB).

Not an issue stage, reported beside them for the daemon path: ``transport`` = ``queue`` +
``put`` + ``actor_wait`` + ``deserialize`` + ``return`` (the hand-over of frames to the actors
and of results back). The raw per-key means are kept in the JSON (``stages_ms_raw``); ``score``
(the scorer's total) is not mapped, its parts are. The daemon path also gets a table of its
hops, which add up to the subscriber's mean latency (``hops_ms_mean``, see
``tools.bench.daemon_path``).

Results: ``<out>/<name>.json`` and ``<out>/<name>.md`` per scorer × backend (``--name`` may use
``{scorer}``, ``{backend}``, ``{host}``), with the machine described and the load average at
the start and end of every size. Timings are measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from daemon.decision import Thresholds, decide
from daemon.enrollment import calibrate, enroll
from sensors.frame import Frame, FrameMeta
from sensors.simcam import CameraParams
from sensors.simulated import simulated_parts
from sensors.wire import decode_frame, encode_frame, encode_verdict
from tools.bench.daemon_path import HANDOVERS, TRANSPORTS, bench_daemon
from tools.bench.measure import PeakRSS, load_average, machine_description, pct
from tools.bench.report import render_markdown, summary_table
from tools.bench.stages import SIZES, STAGE_OF, map_stages
from workers.actor import hold_freed_heap
from workers.model_store import load_product_model
from workers.preprocess import PreprocessParams
from workers.score_frame import score_frame

PRODUCT = "flange"
ZEROSHOT_TRAIN = ("gear", "bracket")
"""Products the zero-shot scorer is fitted on (never the benched product)."""
DEFAULT_IMRNET_FINETUNE_STEPS = 10


def make_frames(
    size: str, n: int, seed: int, good_only: bool, product: str = PRODUCT
) -> tuple[list[Frame], PreprocessParams]:
    """``n`` simulated parts of ``product`` at ``size``; half defective unless ``good_only``."""
    if size == "cloud-30k":
        from sensors.defects import carve_defect, sample_cloud
        from sensors.mesh import subdivide_uniform
        from sensors.parts import make_part

        frames = []
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            mesh = subdivide_uniform(make_part(product, rng), 1.0)
            bad = not good_only and i % 2 == 1
            defective, info = carve_defect(mesh, "bulge", rng) if bad else (mesh, None)
            pts, labels = sample_cloud(defective, mesh, 30_000, rng, noise_sigma=0.05, info=info)
            meta = FrameMeta("bench", product, f"{size}-{seed}-{i}", i, time.time(), truth={"defective": bad})
            frames.append(Frame(points=pts, meta=meta, gt_mask=labels))
        return frames, PreprocessParams(remove_plane=False, voxel_size=1.0)
    camera = CameraParams() if size == "organized-400" else CameraParams(width=1920, height=1200, fov_mm=160.0)
    frames = list(simulated_parts([product], n, 0.0 if good_only else 0.5, seed, camera=camera, good_only=good_only))
    return frames, PreprocessParams(remove_plane=True, voxel_size=1.0)


def bench_in_process(models: Path, frames: list[Frame], backend: str = "torch-cpu") -> dict[str, Any]:
    """Per-stage times of the daemon's own code path, called directly (no sockets, no Ray).

    Runs in a freshly spawned process with one OpenMP and one torch thread, as a default
    actor has (Ray sets ``OMP_NUM_THREADS=1`` in its workers), so the comparison with the
    daemon path is like for like and the peak memory is this measurement's own. open3d's FPFH
    ignores both and runs on every core (its own TBB pool), here as in an actor. Like an actor
    in the daemon's paced run (half the saturated rate over two actors: each busy about half
    the time), it idles after each frame as long as the frame took, so both score at the same
    duty cycle: on a machine shared with other work the kernel's scheduler treats a process
    that sleeps between frames differently from one that runs without pause."""
    import multiprocessing

    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_in_process_worker, (models, frames, backend))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _in_process_worker(models: Path, frames: list[Frame], backend: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    hold_freed_heap()  # as every scoring actor does
    model = load_product_model(models, PRODUCT)
    model.scorer.use_backend(backend, Path(models) / ".engine-cache")  # the actors' cache dir
    t = Thresholds((model.calibration or {}).get("threshold", 1.0), 0.1)
    score_frame(model.scorer, frames[0], model.preprocess)  # warm-up
    stages: dict[str, list[float]] = {}
    totals = []
    with PeakRSS(os.getpid()) as mem:
        for f in frames:
            t0 = time.perf_counter()
            parts = [bytes(p) for p in encode_frame(f)]
            frame = decode_frame(parts, max_points=f.n_points)
            t1 = time.perf_counter()
            r = score_frame(model.scorer, frame, model.preprocess)
            t2 = time.perf_counter()
            verdict = decide(r.object_score, t)
            t3 = time.perf_counter()
            encode_verdict({"product": PRODUCT, "verdict": verdict, "score": r.object_score}, r.anomaly_map)
            t4 = time.perf_counter()
            for k, v in {"decode": t1 - t0, **r.timings, "decision": t3 - t2, "encode_verdict": t4 - t3}.items():
                stages.setdefault(k, []).append(v)
            totals.append(t4 - t0)
            time.sleep(t4 - t0)  # idle as long as it worked, as each actor does in the paced run (see above)
    return {
        "frames": len(frames),
        "latency_ms_p50": 1000 * pct(totals, 50),
        "latency_ms_p99": 1000 * pct(totals, 99),
        "throughput_per_s_one_core": len(totals) / sum(totals),
        "stages_ms_raw": (raw := {k: 1000 * statistics.fmean(v) for k, v in stages.items()}),
        "stages_ms_mean": map_stages(raw),
        "peak_rss_mib": mem.peak / 2**20,
        "latencies_ms": [1000 * x for x in totals],
        "stage_samples": len(totals),
    }


def bracket(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two in-process rounds, one before and one after the daemon's run, as one measurement:
    percentiles over both rounds' frames, stage means over both, the larger peak memory. On a
    shared machine whose load drifts, the in-process figure then covers the daemon's time span
    instead of the minutes before it; each round's p50 is kept (``rounds_p50_ms``)."""
    lat = first["latencies_ms"] + second["latencies_ms"]
    n1, n2 = first["stage_samples"], second["stage_samples"]
    keys = first["stages_ms_raw"].keys() & second["stages_ms_raw"].keys()
    raw = {k: (first["stages_ms_raw"][k] * n1 + second["stages_ms_raw"][k] * n2) / (n1 + n2) for k in keys}
    return {
        "frames": first["frames"] + second["frames"],
        "latency_ms_p50": pct(lat, 50),
        "latency_ms_p99": pct(lat, 99),
        "rounds_p50_ms": [first["latency_ms_p50"], second["latency_ms_p50"]],
        "throughput_per_s_one_core": 1000 * len(lat) / sum(lat),
        "stages_ms_raw": raw,
        "stages_ms_mean": map_stages(raw),
        "peak_rss_mib": max(first["peak_rss_mib"], second["peak_rss_mib"]),
        "latencies_ms": lat,
        "stage_samples": n1 + n2,
    }


def bench_plan(scorers: list[str], backends: list[str]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(scorer, backend) pairs to run, and those skipped with the reason. ``["all"]`` means every
    registered scorer / every backend of a scorer that is available here."""
    from workers.backends import resolve_backend
    from workers.registry import available_scorers, scorer_class

    known = available_scorers()
    names = known if scorers == ["all"] else scorers
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown scorers {unknown}; known: {known}")
    plan, skipped = [], []
    for name in names:
        supported = scorer_class(name).backends
        for backend in supported if backends == ["all"] else backends:
            try:
                plan.append((name, resolve_backend(backend, supported)))
            except ValueError as e:
                if backends != ["all"]:
                    skipped.append({"scorer": name, "backend": backend, "reason": str(e)})
    return plan, skipped


def enroll_for_bench(
    models: Path, scorer: str, size: str, good: list[Frame], params: PreprocessParams, imrnet_steps: int
) -> dict[str, Any]:
    """Fit and calibrate ``scorer`` for the bench product (see the module docstring); what was done."""
    t0 = time.time()
    note: dict[str, Any] = {}
    scorer_params: dict[str, Any] = {}
    train = good[:5]
    if scorer == "imrnet":
        scorer_params["finetune_steps"] = imrnet_steps
        note["imrnet_finetune_steps"] = imrnet_steps
        note["note"] = (f"imrnet fine-tuned for {imrnet_steps} steps (product default 100): "
                        "the scoring cost measured here does not depend on it")
    if scorer == "zeroshot":
        train = []
        for i, product in enumerate(ZEROSHOT_TRAIN):
            train += make_frames(size, 3, seed=21 + i, good_only=True, product=product)[0]
        note["fitted_on_products"] = list(ZEROSHOT_TRAIN)
        note["note"] = (f"zeroshot fitted on good parts of {', '.join(ZEROSHOT_TRAIN)} only (never {PRODUCT}); "
                        f"threshold calibrated on good {PRODUCT} parts")
    enroll(models, PRODUCT, train, scorer, params, scorer_params, progress=False)
    calibrate(models, PRODUCT, good[5:], 0.1, progress=False)  # 3 parts allow 10 %: the bench times, it does not judge
    return {"enroll_seconds": time.time() - t0, **note}


def result_name(template: str, scorer: str, backend: str) -> str:
    return template.format(scorer=scorer, backend=backend, host=platform.node() or "host")


def run_bench(
    out: Path, name: str, sizes: list[str], scorers: list[str] | str, n_frames: int, daemon_path: bool,
    log: Callable[[str], None] = print, backends: list[str] | None = None,
    imrnet_steps: int = DEFAULT_IMRNET_FINETUNE_STEPS, transport: str = "ipc", handover: str = "shared_memory",
) -> dict[str, dict[str, Any]]:
    """Run every planned scorer × backend × size; write one JSON + Markdown per scorer × backend
    (after every size, so a cut-off run keeps what it measured). Returns them by file name."""
    scorers = [scorers] if isinstance(scorers, str) else scorers
    plan, skipped = bench_plan(scorers, backends or ["torch-cpu"])
    for s in skipped:
        log(f"skipped {s['scorer']} on {s['backend']}: {s['reason']}")
    if not plan:
        raise ValueError("nothing to bench: " + "; ".join(s["reason"] for s in skipped))
    machine = machine_description()
    command = " ".join(["inspectd", *sys.argv[1:]])
    results: dict[str, dict[str, Any]] = {}
    frames: dict[str, tuple[list[Frame], PreprocessParams, list[Frame]]] = {}  # per size, shared by the scorers
    for scorer in dict.fromkeys(s for s, _ in plan):
        mine = [b for s, b in plan if s == scorer]
        for b in mine:
            results[result_name(name, scorer, b)] = {
                "machine": machine, "scorer": scorer, "backend": b, "command": command, "sizes": {},
                "stage_map": STAGE_OF, "skipped": [s for s in skipped if s["scorer"] == scorer],
            }
        for size in sizes:
            log(f"[{scorer} {size}] simulating frames, enrolling")
            if size not in frames:
                frames[size] = (*make_frames(size, 8, seed=11, good_only=True),
                                make_frames(size, n_frames, seed=12, good_only=False)[0])
            good, params, test = frames[size]
            with tempfile.TemporaryDirectory() as tmp:
                models = Path(tmp) / "models"
                enrolled = enroll_for_bench(models, scorer, size, good, params, imrnet_steps)
                for backend in mine:
                    key = result_name(name, scorer, backend)
                    entry: dict[str, Any] = {
                        "points_per_frame": int(test[0].n_points),
                        "valid_points_per_frame": int(test[0].valid_mask().sum()),
                        **enrolled,
                        "load_average_start": load_average(),
                    }
                    log(f"[{scorer} {backend} {size}] in-process scoring of {len(test)} frames")
                    entry["in_process"] = bench_in_process(models, test, backend)
                    if daemon_path:
                        log(f"[{scorer} {backend} {size}] daemon path (ZeroMQ + Ray + decision)")
                        root = Path(tmp) / f"daemon-{backend}"
                        root.mkdir()
                        entry["daemon"] = bench_daemon(models, test, root, backend, transport, handover)
                        log(f"[{scorer} {backend} {size}] in-process again, after the daemon's run")
                        entry["in_process"] = bracket(entry["in_process"], bench_in_process(models, test, backend))
                        entry["overhead_ratio_p50"] = (entry["daemon"]["latency_ms_p50"]
                                                       / entry["in_process"]["latency_ms_p50"])
                    entry["load_average_end"] = load_average()
                    results[key]["sizes"][size] = entry
                    log(f"[{scorer} {backend} {size}] done: in-process p50 "
                        f"{entry['in_process']['latency_ms_p50']:.0f} ms"
                        + (f", daemon p50 {entry['daemon']['latency_ms_p50']:.0f} ms" if daemon_path else "")
                        + f", load {entry['load_average_end'][0]}")
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"{key}.json").write_text(json.dumps(results[key], indent=2))
                    (out / f"{key}.md").write_text(render_markdown(results[key]))
    return results


def add_commands(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="measure scoring speed in-process and through the daemon path")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--name", default="{scorer}-{backend}-{host}",
                   help="result file name; {scorer}, {backend}, {host} are filled in")
    b.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {SIZES}")
    b.add_argument("--scorer", default="patchcore-fpfh", help="comma-separated scorer names, or 'all'")
    b.add_argument("--backend", default="torch-cpu",
                   help="comma-separated backends, or 'all' (every backend of each scorer available here)")
    b.add_argument("--frames", type=int, default=10, help="test frames per size")
    b.add_argument("--imrnet-finetune-steps", type=int, default=DEFAULT_IMRNET_FINETUNE_STEPS,
                   help="fine-tuning steps of the imrnet model the bench enrolls (scoring cost does not depend on it)")
    b.add_argument("--no-daemon", action="store_true", help="in-process only")
    b.add_argument("--transport", choices=TRANSPORTS, default="ipc",
                   help="how the bench's sensor and subscriber reach the daemon: ipc (Unix sockets, a sensor "
                        "adapter on the daemon's machine) or tcp (loopback TCP, a sensor on another machine "
                        "less the network)")
    b.add_argument("--handover", choices=HANDOVERS, default="shared_memory",
                   help="how the daemon hands frames to its actors (the config's workers.handover)")
    b.add_argument("--curve", action="store_true",
                   help="measure only what CurveZMQ costs on the daemon path at 400x400 (tools/bench/curve.py)")
    b.add_argument("--batch", default=None, metavar="1,4,8",
                   help="measure only batching: per-frame time at these batch sizes against batch 1, in-process "
                        "(tools/bench/batch.py); --name defaults to batching-{host}")
    b.add_argument("--nodes", default=None, metavar="1,2",
                   help="measure only the daemon's throughput on a local Ray cluster of this many scoring nodes "
                        "(tools/bench/cluster.py; first --scorer and --sizes); --name defaults to cluster-nodes-{host}")
    b.add_argument("--summary", action="store_true",
                   help="measure nothing: print one table over every result JSON in --out")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.summary:
        print(summary_table(Path(args.out)), end="")
        return 0
    if args.curve:
        from tools.bench.curve import render, run_curve_bench

        name = "curve-cost-{host}" if args.name == "{scorer}-{backend}-{host}" else args.name
        print(render(run_curve_bench(Path(args.out), result_name(name, "", ""), args.frames)))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; known: {SIZES}")
    scorers = [s for s in args.scorer.split(",") if s]
    if args.nodes:
        from tools.bench.cluster import render as render_nodes
        from tools.bench.cluster import run_cluster_bench

        name = "cluster-nodes-{host}" if args.name == "{scorer}-{backend}-{host}" else args.name
        counts = sorted({int(n) for n in args.nodes.split(",") if n})
        print(render_nodes(run_cluster_bench(Path(args.out), result_name(name, "", ""), counts, scorers[0], sizes[0],
                                             args.frames)))
        return 0
    if args.batch:
        from tools.bench.batch import render as render_batch
        from tools.bench.batch import run_batch_bench

        name = "batching-{host}" if args.name == "{scorer}-{backend}-{host}" else args.name
        batches = sorted({int(b) for b in args.batch.split(",") if b})
        report = run_batch_bench(Path(args.out), result_name(name, "", ""), scorers, sizes, args.frames, batches,
                                 args.backend)
        print(render_batch(report))
        return 0
    backends = [b for b in args.backend.split(",") if b]
    if ("all" in scorers and len(scorers) > 1) or ("all" in backends and len(backends) > 1):
        raise ValueError("'all' stands alone")
    name = args.name if "{" in args.name else args.name + "-{scorer}-{backend}"
    results = run_bench(Path(args.out), name, sizes, scorers, args.frames, not args.no_daemon,
                        backends=backends, imrnet_steps=args.imrnet_finetune_steps, transport=args.transport,
                        handover=args.handover)
    for r in results.values():
        print(render_markdown(r))
    return 0
