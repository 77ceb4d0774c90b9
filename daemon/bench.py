"""``inspectd bench``: how fast is inspection, in-process and through the real daemon path.

For each frame size (a 30K-point stitched cloud, a 400×400 camera frame, a 1920×1200 camera
frame) and each scorer × backend asked for, it

1. enrolls and calibrates a product on simulated good parts of that size;
2. measures in-process scoring per stage (wire decode, preprocess, features, network,
   search, map back, decision, emit = verdict encoding), and the peak memory of the process;
3. starts the daemon (``inspectd run``, embedded Ray, every core) and measures, through
   ZeroMQ + Ray + decision: throughput at saturation (frames pushed unpaced) and p50 / p99
   latency (send → verdict received) at a fixed offered rate (half the saturation
   throughput), plus the peak memory of the daemon and its Ray workers;
4. reports the daemon path's overhead over in-process scoring as the ratio of p50 latencies.

Results: ``<out>/<name>.json`` and ``<out>/<name>.md``, with the machine described. Timings are
measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
import zmq

from daemon.decision import Thresholds, decide
from daemon.enrollment import calibrate, enroll
from daemon.process import DaemonProcess, free_port
from sensors.frame import Frame, FrameMeta
from sensors.publisher import FramePusher
from sensors.simcam import CameraParams
from sensors.simulated import simulated_parts
from sensors.wire import decode_frame, decode_verdict, encode_frame, encode_verdict
from workers.frame_scoring import score_frame
from workers.model_store import load_product_model
from workers.preprocess import PreprocessParams

SIZES = ("cloud-30k", "organized-400", "organized-1920x1200")
PRODUCT = "flange"


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def make_frames(size: str, n: int, seed: int, good_only: bool) -> tuple[list[Frame], PreprocessParams]:
    """``n`` simulated parts at ``size``; half defective unless ``good_only``."""
    if size == "cloud-30k":
        from sensors.defects import carve_defect, sample_cloud
        from sensors.parts import make_part, subdivide_uniform

        frames = []
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            mesh = subdivide_uniform(make_part(PRODUCT, rng), 1.0)
            bad = not good_only and i % 2 == 1
            defective, info = carve_defect(mesh, "bulge", rng) if bad else (mesh, None)
            pts, labels = sample_cloud(defective, mesh, 30_000, rng, noise_sigma=0.05, info=info)
            meta = FrameMeta("bench", PRODUCT, f"{size}-{seed}-{i}", i, time.time(), truth={"defective": bad})
            frames.append(Frame(points=pts, meta=meta, gt_mask=labels))
        return frames, PreprocessParams(remove_plane=False, voxel_size=1.0)
    camera = CameraParams() if size == "organized-400" else CameraParams(width=1920, height=1200, fov_mm=160.0)
    frames = list(simulated_parts([PRODUCT], n, 0.0 if good_only else 0.5, seed, camera=camera, good_only=good_only))
    return frames, PreprocessParams(remove_plane=True, voxel_size=1.0)


class PeakRSS:
    """Samples the resident memory of a process (and optionally its children) in a thread."""

    def __init__(self, pid: int, children: bool = False, period: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.children = children
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        procs = [self.proc, *(self.proc.children(recursive=True) if self.children else [])]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.period)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_in_process(models: Path, frames: list[Frame]) -> dict[str, Any]:
    """Per-stage times of the daemon's own code path, called directly (no sockets, no Ray).

    Runs in a freshly spawned process with one OpenMP and one torch thread, as a default
    actor has (Ray sets ``OMP_NUM_THREADS=1`` in its workers), so the comparison with the
    daemon path is like for like and the peak memory is this measurement's own."""
    import multiprocessing

    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_in_process_worker, (models, frames))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _in_process_worker(models: Path, frames: list[Frame]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    model = load_product_model(models, PRODUCT)
    t = Thresholds((model.calibration or {}).get("threshold", 1.0), 0.1)
    score_frame(model.scorer, frames[0], model.preprocess)  # warm-up
    stages: dict[str, list[float]] = {}
    totals = []
    with PeakRSS(os.getpid()) as mem:
        for f in frames:
            t0 = time.perf_counter()
            parts = [bytes(p) for p in encode_frame(f)]
            frame = decode_frame(parts)
            t1 = time.perf_counter()
            r = score_frame(model.scorer, frame, model.preprocess)
            t2 = time.perf_counter()
            verdict = decide(r.object_score, t)
            t3 = time.perf_counter()
            encode_verdict({"product": PRODUCT, "verdict": verdict, "score": r.object_score}, r.anomaly_map)
            t4 = time.perf_counter()
            for k, v in {"decode": t1 - t0, **r.timings, "decision": t3 - t2, "emit": t4 - t3}.items():
                stages.setdefault(k, []).append(v)
            totals.append(t4 - t0)
    return {
        "frames": len(frames),
        "latency_ms_p50": 1000 * pct(totals, 50),
        "latency_ms_p99": 1000 * pct(totals, 99),
        "throughput_per_s_one_core": len(totals) / sum(totals),
        "stages_ms_mean": {k: 1000 * statistics.fmean(v) for k, v in stages.items()},
        "peak_rss_mib": mem.peak / 2**20,
    }


def _run_stream(d_ingest: str, sub: zmq.Socket, frames: list[Frame], rate: float) -> tuple[list[float], float]:
    """Push ``frames`` (at ``rate``/s, 0 = unpaced); latencies (s) and wall time until the last verdict."""
    sent_at: dict[str, float] = {}
    lat: list[float] = []
    done = threading.Event()

    def receive() -> None:
        while len(lat) < len(frames):
            if sub.poll(200):
                h = decode_verdict(sub.recv_multipart()).header
                if h.get("part_id") in sent_at:
                    lat.append(time.time() - sent_at[h["part_id"]])
            elif done.is_set() and time.time() - last[0] > 120:
                return

    last = [time.time()]
    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    t0 = time.time()
    with FramePusher(d_ingest) as push:
        for i, f in enumerate(frames):
            if rate > 0:
                time.sleep(max(0.0, t0 + i / rate - time.time()))
            f = replace(f, meta=replace(f.meta, part_id=f"{f.meta.part_id}-r{rate:g}-{i}", capture_time=time.time()))
            sent_at[f.meta.part_id] = time.time()
            push.send(f)
            last[0] = time.time()
        done.set()
        rx.join()
    return lat, time.time() - t0


def bench_daemon(models: Path, frames: list[Frame], root: Path) -> dict[str, Any]:
    """Throughput at saturation and latency at half of it, through ZeroMQ + Ray + decision."""
    http = free_port()
    cfg = {
        "ingest": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "queue_size": 32, "max_wait_ms": 60000},
        "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
        "http": {"host": "127.0.0.1", "port": http},
        "storage": {"results": str(root / "results.sqlite"), "maps_dir": str(root / "maps"), "maps": "none",
                    "models_dir": str(models)},
        "ray": {"object_store_mb": 1024},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    daemon = DaemonProcess(path, root / "daemon.log", f"http://127.0.0.1:{http}").start()
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"verdict/")
        sub.connect(cfg["publish"]["endpoint"])
        time.sleep(0.5)
        _run_stream(cfg["ingest"]["endpoint"], sub, frames[:2], 0)  # warm-up
        assert daemon.proc is not None
        with PeakRSS(daemon.proc.pid, children=True) as mem:
            lat_sat, wall = _run_stream(cfg["ingest"]["endpoint"], sub, frames, 0)
            throughput = len(lat_sat) / wall
            rate = max(0.05, 0.5 * throughput)
            lat, _ = _run_stream(cfg["ingest"]["endpoint"], sub, frames, rate)
        return {
            "frames": len(frames),
            "verdicts": len(lat_sat) + len(lat),
            "lost": 2 * len(frames) - len(lat_sat) - len(lat),
            "throughput_per_s_saturated": throughput,
            "offered_rate_per_s": rate,
            "latency_ms_p50": 1000 * pct(lat, 50),
            "latency_ms_p99": 1000 * pct(lat, 99),
            "latency_ms_p50_saturated": 1000 * pct(lat_sat, 50),
            "peak_rss_mib_daemon_and_workers": mem.peak / 2**20,
        }
    finally:
        daemon.stop()
        ctx.destroy(linger=0)


def run_bench(
    out: Path, name: str, sizes: list[str], scorer: str, n_frames: int, daemon_path: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from workers.scorer import available_scorers

    if scorer not in available_scorers():
        raise ValueError(f"unknown scorer {scorer!r}; known: {available_scorers()}")
    results: dict[str, Any] = {"machine": machine_description(), "scorer": scorer, "backend": "torch-cpu",
                               "command": " ".join(["inspectd", *sys.argv[1:]]), "sizes": {}}
    for size in sizes:
        log(f"[{size}] simulating frames")
        good, params = make_frames(size, 8, seed=11, good_only=True)
        test, _ = make_frames(size, n_frames, seed=12, good_only=False)
        with tempfile.TemporaryDirectory() as tmp:
            models = Path(tmp) / "models"
            t0 = time.time()
            enroll(models, PRODUCT, good[:5], scorer, params, progress=False)
            calibrate(models, PRODUCT, good[5:], 0.01, progress=False)
            entry: dict[str, Any] = {
                "points_per_frame": int(test[0].n_points),
                "valid_points_per_frame": int(test[0].valid_mask().sum()),
                "enroll_seconds": time.time() - t0,
            }
            log(f"[{size}] in-process scoring of {len(test)} frames")
            entry["in_process"] = bench_in_process(models, test)
            if daemon_path:
                log(f"[{size}] daemon path (ZeroMQ + Ray + decision)")
                entry["daemon"] = bench_daemon(models, test, Path(tmp))
                entry["overhead_ratio_p50"] = entry["daemon"]["latency_ms_p50"] / entry["in_process"]["latency_ms_p50"]
        results["sizes"][size] = entry
        log(f"[{size}] done: in-process p50 {entry['in_process']['latency_ms_p50']:.0f} ms"
            + (f", daemon p50 {entry['daemon']['latency_ms_p50']:.0f} ms" if daemon_path else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{name}.md").write_text(render_markdown(results))
    return results


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# inspectd bench: {r['scorer']} on {r['backend']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}.",
        f"Command: `{r['command']}`",
        "",
        "| frame | points | in-process p50 / p99 ms | daemon p50 / p99 ms (offered rate) | saturated throughput /s "
        "| overhead (daemon / in-process p50) | peak RSS MiB in-process / daemon+workers |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, e in r["sizes"].items():
        ip, d = e["in_process"], e.get("daemon")
        dcol = f"{d['latency_ms_p50']:.0f} / {d['latency_ms_p99']:.0f} ({d['offered_rate_per_s']:.2f}/s)" if d else "-"
        lines.append(
            f"| {size} | {e['points_per_frame']:,} | {ip['latency_ms_p50']:.0f} / {ip['latency_ms_p99']:.0f} | {dcol} | "
            f"{d['throughput_per_s_saturated']:.2f} | {e.get('overhead_ratio_p50', float('nan')):.2f} | "
            f"{ip['peak_rss_mib']:.0f} / {d['peak_rss_mib_daemon_and_workers']:.0f} |" if d else
            f"| {size} | {e['points_per_frame']:,} | {ip['latency_ms_p50']:.0f} / {ip['latency_ms_p99']:.0f} | - | - | - | "
            f"{ip['peak_rss_mib']:.0f} / - |"
        )
    lines += ["", "In-process stages, mean ms:", "", "| frame | " + " | ".join(_stage_names(r)) + " |",
              "|---|" + "---|" * len(_stage_names(r))]
    for size, e in r["sizes"].items():
        st = e["in_process"]["stages_ms_mean"]
        lines.append(f"| {size} | " + " | ".join(f"{st.get(k, float('nan')):.1f}" for k in _stage_names(r)) + " |")
    return "\n".join(lines) + "\n"


def _stage_names(r: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for e in r["sizes"].values():
        for k in e["in_process"]["stages_ms_mean"]:
            if k not in names:
                names.append(k)
    return names


def add_commands(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="measure scoring speed in-process and through the daemon path")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--name", help="result file name (default: <scorer>-<backend>-<host>)")
    b.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {SIZES}")
    b.add_argument("--scorer", default="patchcore-fpfh")
    b.add_argument("--frames", type=int, default=10, help="test frames per size")
    b.add_argument("--no-daemon", action="store_true", help="in-process only")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; known: {SIZES}")
    name = args.name or f"{args.scorer}-torch-cpu-{platform.node() or 'host'}"
    r = run_bench(Path(args.out), name, sizes, args.scorer, args.frames, not args.no_daemon)
    print(render_markdown(r))
    return 0
