"""The bench's daemon-path measurement: frames pushed through a real ``inspectd run`` (ZeroMQ +
Ray + decision + log + publish), latency from send to verdict received, and every hop of the
way (``inspectd bench``, ``tools.bench.run``).

Where each hop's time comes from (all means over the paced run, ms):

* the daemon's own measurement: each verdict's ``stage_ms`` (``header_stage_means``), and for
  the log and publish, which come after it, its ``inspectd_stage_seconds`` histogram (scraped
  before and after the paced run, deltas):
  ``decode`` (wire decode + validation at ingest), ``queue`` (bounded queue to dispatch),
  ``put`` (the one copy of the call's frames into the actor's shared-memory slot, or the
  ``ray.put`` into the object store), ``actor_wait`` (dispatch to the actor's call starting: the
  hand-over), ``deserialize`` (the actor mapping the frames: shared-memory numpy views),
  ``preprocess``, ``score``, ``map_back`` (the actor's work), ``return`` (the actor's reply with
  the anomaly map, to the dispatch thread),
  ``decision``, ``maps`` (map files), ``log`` (SQLite commit), ``publish`` (PUB send);
* the verdicts themselves: each carries ``latency_ms``, the daemon's time from receipt to its
  map files; ``other`` is its mean less the hops above up to ``maps`` (ingest bookkeeping, the
  emitter's lane), and ``wire`` is the subscriber's latency less ``latency_ms``, ``log`` and
  ``publish``: ZeroMQ both ways (the frame to the daemon, the verdict and its map back).

The hops add up to ``total``, the mean latency the subscriber measured. ``PATH_HOPS`` are the
ones in-process scoring does not have (the hand-over to the actor and back, the log, ZeroMQ);
``overhead_ratio_hops`` = ``total / (total - path)`` is the daemon path's overhead measured
within the one run, which the load of a shared machine cannot shift between two measurements
as it can the ratio of the in-process and daemon p50s (taken minutes apart). It slightly
overstates the overhead: in-process scoring also encodes its verdict and copies the frame
once, which are not subtracted.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
import zmq

from sensors.frame import Frame
from sensors.publisher import FramePusher
from sensors.wire import MAX_HEADER_BYTES, decode_verdict
from tools.bench.measure import PeakRSS, pct
from tools.bench.stages import map_stages
from tools.process import DaemonProcess, free_port

HOPS = ("decode", "queue", "put", "actor_wait", "deserialize", "preprocess", "score", "map_back", "return",
        "decision", "maps", "other", "log", "publish", "wire")
"""The daemon path's hops, in the order a frame takes them (see the module docstring)."""
PATH_HOPS = ("queue", "put", "actor_wait", "deserialize", "return", "other", "log", "publish", "wire")
"""The hops in-process scoring does not have."""
_TIMED_TO_MAPS = ("decode", "queue", "put", "actor_wait", "deserialize", "preprocess", "score", "map_back", "shadow",
                  "return", "decision", "maps")


def run_stream(
    d_ingest: str, sub: zmq.Socket, frames: list[Frame], rate: float, seen: set[str] | None = None,
    verdicts: list[tuple[float, dict[str, Any]]] | None = None, sent: list[str] | None = None,
) -> tuple[list[float], float]:
    """Push ``frames`` (at ``rate``/s, 0 = unpaced); latencies (s) and wall time until the last
    verdict. ``seen`` collects the verdicts' ``backend`` (and ``error`` reasons), ``verdicts``
    each (latency, header), ``sent`` the part ids sent. Verdicts are received without a copy, as
    a subscriber should."""
    sent_at: dict[str, float] = {}
    lat: list[float] = []
    done = threading.Event()

    def receive() -> None:
        while len(lat) < len(frames):
            if sub.poll(200):
                h = decode_verdict(sub.recv_multipart(copy=False)).header
                if h.get("part_id") in sent_at:
                    lat.append(time.time() - sent_at[h["part_id"]])
                    if verdicts is not None:
                        verdicts.append((lat[-1], h))
                    if seen is not None:
                        seen.add(str(h.get("backend")) if not h.get("error") else f"error: {h['error'].get('reason')}")
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
            if sent is not None:
                sent.append(f.meta.part_id)
            last[0] = time.time()
        done.set()
        rx.join()
    return lat, time.time() - t0


def stage_histogram(http_url: str) -> dict[str, tuple[float, float]]:
    """The daemon's ``inspectd_stage_seconds`` histogram: stage → (sum of seconds, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "inspectd_stage_seconds":
            continue
        for sample in fam.samples:
            stage = sample.labels.get("stage")
            if stage is None:
                continue
            slot = out.setdefault(stage, [0.0, 0.0])
            if sample.name.endswith("_sum"):
                slot[0] = sample.value
            elif sample.name.endswith("_count"):
                slot[1] = sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def handover_calls(http_url: str) -> dict[str, float]:
    """The daemon's ``inspectd_handover_calls_total``: way → calls so far."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.labels["way"]: s.value for fam in text_string_to_metric_families(text)
            if fam.name == "inspectd_handover_calls" for s in fam.samples if s.name.endswith("_total")}


def stage_means_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean ms per stage over the frames observed between two scrapes."""
    out = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            out[stage] = 1000.0 * (total - t0) / (count - c0)
    return out


def header_stage_means(verdicts: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
    """Mean ms per stage over the scored verdicts' own ``stage_ms`` (every stage up to the map
    files; the log and publish come after the header is written). Exactly the paced run's
    frames: a scrape of the histogram can still miss, or catch, the last verdict of the run
    before, whose stages are observed just after it is sent."""
    scored = [h["stage_ms"] for _, h in verdicts if not h.get("error") and isinstance(h.get("stage_ms"), dict)]
    keys = {k for st in scored for k in st}
    return {k: statistics.fmean(st.get(k, 0.0) for st in scored) for k in keys}


def hops_ms(raw: dict[str, float], verdicts: list[tuple[float, dict[str, Any]]]) -> dict[str, float | None]:
    """Mean ms per hop of the daemon path (``HOPS``, then ``total`` and ``path``, the sum of
    ``PATH_HOPS``) from the daemon's per-stage
    means ``raw`` and the scored verdicts with their subscriber latency (see the module
    docstring); None for a hop nothing measured."""
    scored = [(s, h) for s, h in verdicts if not h.get("error") and h.get("latency_ms") is not None]
    out: dict[str, float | None] = {h: raw.get(h) for h in HOPS}
    if not scored:
        return {**out, "total": None, "path": None}
    daemon_ms = statistics.fmean(h["latency_ms"] for _, h in scored)
    total = 1000.0 * statistics.fmean(s for s, _ in scored)
    out["other"] = daemon_ms - sum(raw.get(k, 0.0) for k in _TIMED_TO_MAPS)
    out["wire"] = total - daemon_ms - raw.get("log", 0.0) - raw.get("publish", 0.0)
    if raw.get("shadow"):
        out["score"] = (out["score"] or 0.0) + raw["shadow"]
    return {**out, "total": total, "path": sum(out[h] or 0.0 for h in PATH_HOPS)}


def logged_part_ids(results: Path) -> set[str]:
    """Part ids with a verdict in the daemon's result log (read after the daemon stopped)."""
    import sqlite3

    with sqlite3.connect(f"file:{results}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT part_id FROM verdicts")}


def account_for_frames(sent: list[str], received: set[str], logged: set[str]) -> dict[str, int]:
    """Where each frame sent ended: ``received`` (its verdict reached the subscriber),
    ``not_published`` (logged by the daemon, its verdict not received: PUB drops for a slow
    subscriber beyond ``publish.buffer_mb``, by design, the log keeps it) and ``unanswered``
    (not even logged: a frame the daemon lost, which must never happen)."""
    return {
        "sent": len(sent),
        "received": sum(1 for p in sent if p in received),
        "not_published": sum(1 for p in sent if p not in received and p in logged),
        "unanswered": sum(1 for p in sent if p not in received and p not in logged),
    }


def burst_buffer_mb(frames: list[Frame], warmup: int = 2) -> float:
    """Bytes (MiB) of the verdicts, maps inline, of the longer burst, one stream or the
    ``warmup`` frames, so the bench's subscriber can fall behind by a whole burst without a drop."""
    largest = max(f.n_points for f in frames) * 4 + 2 * MAX_HEADER_BYTES  # as daemon.config.max_verdict_bytes
    return float(math.ceil(max(len(frames), warmup) * largest / 2**20))


OBJECT_STORE_MB = 1024
"""The bench daemon's Ray object store: every GPU actor's calls in flight with 1920×1200 frames."""


def warmup_count(cores: int | None = None) -> int:
    """Frames the bench sends before it measures: four per actor (one per core), at least 20.

    An actor's first frames pay lazy initialization (the first two took 490–660 ms against
    75–130 ms after) and settle its heap; the daemon warms Ray's object store itself at start
    (``ActorPool.warm_store``). A daemon on a line is past all this within its first minute."""
    return max(20, 4 * (cores or os.cpu_count() or 1))


GPU_ACTORS = {b: {"gpus_per_actor": 0.25} for b in ("torch-cuda", "tensorrt")}
"""Actors of a GPU backend reserve a quarter of a GPU each: ``workers.actors: auto`` then starts
four per GPU, not one per CPU core each with a CUDA context of its own, and Ray accounts for the
device (an actor that reserves none sees it only while Ray leaves ``CUDA_VISIBLE_DEVICES`` alone)."""


TRANSPORTS = ("ipc", "tcp")
"""How the bench's sensor and subscriber reach the daemon: ``ipc`` (Unix sockets, as a sensor
adapter on the daemon's machine connects) or ``tcp`` (loopback TCP, as a sensor on another
machine does, less the network)."""
HANDOVERS = ("shared_memory", "object_store")
"""How the daemon hands frames to its actors: the values of the config's ``workers.handover``."""


def endpoint(transport: str, root: Path, name: str) -> str:
    """A ZeroMQ endpoint of ``transport`` for one of the daemon's listeners (``name``)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r}; known: {TRANSPORTS}")
    return f"ipc://{root / name}.sock" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"


def bench_daemon(
    models: Path, frames: list[Frame], root: Path, backend: str = "torch-cpu", transport: str = "ipc",
    handover: str = "shared_memory",
) -> dict[str, Any]:
    """Throughput at saturation and latency at half of it, through ZeroMQ (``transport``) + Ray
    (frames handed to the actors by ``handover``, the config's ``workers.handover``) + decision."""
    http = free_port()
    # each stream opens its own pusher; ingest may still count the previous one until it sees
    # its disconnect, so admit a few (with 1, a new pusher can be refused and the bench waits)
    cfg = {
        "ingest": {"endpoint": endpoint(transport, root, "ingest"), "queue_size": 32, "max_wait_ms": 60000,
                   "max_points": max(f.n_points for f in frames), "max_age_ms": 600_000, "max_connections": 4},
        # the unpaced run publishes a burst of verdicts, each with its map inline: a PUB buffer
        # for the whole burst, so that a drop for a slow subscriber (by design beyond the
        # buffer; the log keeps the verdict) does not count as a frame without a verdict
        "publish": {"endpoint": endpoint(transport, root, "verdicts"), "max_subscribers": 1,
                    "buffer_mb": burst_buffer_mb(frames, warmup_count())},
        "http": {"host": "127.0.0.1", "port": http},
        "storage": {"results": str(root / "results.sqlite"), "maps_dir": str(root / "maps"), "maps": "none",
                    "models_dir": str(models)},
        "ray": {"object_store_mb": OBJECT_STORE_MB},
        # every frame size on the same actors; on a GPU backend four actors share each GPU
        "workers": {"backend": backend, "large_actors": 0, "handover": handover, **GPU_ACTORS.get(backend, {})},
        "memory": {"bound_mb": 1_000_000},  # the bench measures the peak RSS itself
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
        warm = [frames[i % len(frames)] for i in range(warmup_count())]
        lat_warm, _ = run_stream(cfg["ingest"]["endpoint"], sub, warm, 0)
        assert daemon.proc is not None
        sent: list[str] = []
        every: list[tuple[float, dict[str, Any]]] = []
        with PeakRSS(daemon.proc.pid, children=True) as mem:
            seen: set[str] = set()
            calls_start = handover_calls(f"http://127.0.0.1:{http}")
            lat_sat, wall = run_stream(cfg["ingest"]["endpoint"], sub, frames, 0, seen, every, sent)
            throughput = len(lat_sat) / wall
            rate = max(0.05, 0.5 * throughput)
            before = stage_histogram(f"http://127.0.0.1:{http}")
            calls_before = handover_calls(f"http://127.0.0.1:{http}")
            calls_saturated = {way: n - calls_start.get(way, 0.0) for way, n in calls_before.items()}
            verdicts: list[tuple[float, dict[str, Any]]] = []
            lat, _ = run_stream(cfg["ingest"]["endpoint"], sub, frames, rate, seen, verdicts, sent)
            raw = stage_means_ms(before, stage_histogram(f"http://127.0.0.1:{http}"))
            calls = {way: n - calls_before.get(way, 0.0) for way, n in handover_calls(f"http://127.0.0.1:{http}").items()}
            raw.update(header_stage_means(verdicts))  # exact where the verdicts carry them
        daemon.stop()
        received = {str(h.get("part_id")) for _, h in every + verdicts}
        return {
            "zmq_transport": transport,
            "handover": handover,
            "handover_calls_paced": calls,
            "handover_calls_saturated": calls_saturated,
            "stages_ms_saturated": header_stage_means(every),
            "frames": len(frames),
            "warmup": {"frames": len(warm), "latency_ms_p50_first_two": 1000 * pct(lat_warm[:2], 50)},
            "verdicts": len(lat_sat) + len(lat),
            "lost": 2 * len(frames) - len(lat_sat) - len(lat),
            "accounting": account_for_frames(sent, received, logged_part_ids(root / "results.sqlite")),
            "rss_sampler_cpu_fraction": mem.cpu_fraction,
            "throughput_per_s_saturated": throughput,
            "offered_rate_per_s": rate,
            "latency_ms_p50": 1000 * pct(lat, 50),
            "latency_ms_p99": 1000 * pct(lat, 99),
            "latency_ms_p50_saturated": 1000 * pct(lat_sat, 50),
            "peak_rss_mib_daemon_and_workers": mem.peak / 2**20,
            "verdict_backends": sorted(seen),
            "stages_ms_raw": raw,
            "stages_ms_mean": map_stages(raw),
            "hops_ms_mean": (hops := hops_ms(raw, verdicts)),
            "overhead_ratio_hops": (hops["total"] / (hops["total"] - hops["path"])
                                    if hops["total"] and hops["total"] > hops["path"] else None),
            "stages_source": "the paced run's verdicts' stage_ms; log and publish from the daemon's "
                             "inspectd_stage_seconds histogram over the paced run",
        }
    finally:
        daemon.stop()
        ctx.destroy(linger=0)
