"""``inspectd bench --curve``: what CurveZMQ costs on the daemon path, at the 400×400 bench size.

Two daemons from one config, except ``security.curve`` (and its keys), run side by side (one
actor each). The bench sends the same frames to them in turn, one frame at a time (frame i to
the plain daemon, wait for its verdict, then frame i to the CURVE daemon, wait, ...), so both
see the same machine load, and measures send → verdict received. Beside the end-to-end
figures it times the two encrypted legs alone (a frame PUSH → PULL and a verdict, anomaly map
included, PUB → SUB over loopback, plain vs CURVE) because their difference is far smaller than
the end-to-end noise on a shared machine. Results: ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq

from daemon.security import create_curve_keys
from sensors.curve import ClientKeys, apply_client_keys, load_client_keys
from sensors.frame import Frame
from sensors.publisher import FramePusher
from sensors.wire import decode_verdict, encode_frame, encode_verdict
from tools.bench.measure import load_average, machine_description, pct
from tools.bench.run import enroll_for_bench, make_frames
from tools.process import DaemonProcess, free_port

SIZE = "organized-400"


def _daemon_config(root: Path, models: Path, security: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    cfg: dict[str, Any] = {
        "ingest": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "queue_size": 8, "max_wait_ms": 60000},
        "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"results": str(root / "results.sqlite"), "maps_dir": str(root / "maps"), "maps": "none",
                    "models_dir": str(models)},
        "ray": {"num_cpus": 1, "object_store_mb": 256},
        "workers": {"actors": 1, "backend": "torch-cpu"},
    }
    if security:
        cfg["security"] = security
    path = root / "inspectd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def _one(push: FramePusher, sub: zmq.Socket, frame: Frame, tag: str) -> float:
    """Send one frame, wait for its verdict; seconds from send to verdict received."""
    f = replace(frame, meta=replace(frame.meta, part_id=f"{frame.meta.part_id}-{tag}", capture_time=time.time()))
    t0 = time.perf_counter()
    push.send(f)
    deadline = time.time() + 120
    while time.time() < deadline:
        if sub.poll(200) and decode_verdict(sub.recv_multipart()).header.get("part_id") == f.meta.part_id:
            return time.perf_counter() - t0
    raise TimeoutError(f"no verdict for {f.meta.part_id}")


def transport_ms(
    parts: list[bytes], keys: tuple[ClientKeys, bytes] | None, pattern: str, n: int = 30
) -> tuple[float, float]:
    """Median wall ms to move one message (``parts``) over loopback TCP, plain or CURVE (client keys,
    server secret), and the CPU ms this process (both ends and ZeroMQ's I/O threads) spent per message:
    CPU time hardly depends on how loaded the machine is, wall time does."""
    ctx = zmq.Context()
    try:
        kinds = (zmq.PUSH, zmq.PULL) if pattern == "push" else (zmq.PUB, zmq.SUB)
        server, client = ctx.socket(kinds[1] if pattern == "push" else kinds[0]), None
        if keys is not None:
            server.curve_server = True
            server.curve_secretkey = keys[1]
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(kinds[0] if pattern == "push" else kinds[1])
        apply_client_keys(client, keys[0] if keys else None)
        if pattern != "push":
            client.setsockopt(zmq.SUBSCRIBE, b"")
        client.connect(f"tcp://127.0.0.1:{port}")
        sender, receiver = (client, server) if pattern == "push" else (server, client)
        time.sleep(0.5)
        times = []
        for i in range(n + 3):
            if i == 3:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            sender.send_multipart(parts, copy=False)
            receiver.recv_multipart(copy=False)
            times.append(time.perf_counter() - t0)
        return 1000.0 * float(np.median(times[3:])), 1000.0 * (time.process_time() - cpu0) / n
    finally:
        ctx.destroy(linger=0)


def run_curve_bench(out: Path, name: str, n_frames: int, log: Any = print) -> dict[str, Any]:
    frames, params = make_frames(SIZE, n_frames, seed=12, good_only=False)
    good, _ = make_frames(SIZE, 8, seed=11, good_only=True)
    result: dict[str, Any] = {"machine": machine_description(), "command": " ".join(["inspectd", *sys.argv[1:]]),
                              "size": SIZE, "frames": n_frames, "load_average_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys, allow = root / "keys", root / "allowed"
        create_curve_keys(keys, "server")
        create_curve_keys(keys, "bench")
        allow.mkdir()
        (allow / "bench.key").write_bytes((keys / "bench.key").read_bytes())
        client = load_client_keys(keys / "bench.key_secret", keys / "server.key")
        server_secret = zmq.auth.load_certificate(str(keys / "server.key_secret"))[1]
        assert server_secret is not None

        frame_parts = encode_frame(frames[0])
        verdict_parts = encode_verdict({"part_id": "x", "product": "flange", "verdict": "pass"},
                                       np.zeros((400, 400), np.float32))
        legs = {}
        for label, parts, pattern in (("frame_push", frame_parts, "push"), ("verdict_pub", verdict_parts, "pub")):
            plain, plain_cpu = transport_ms(parts, None, pattern)
            curve, curve_cpu = transport_ms(parts, (client, server_secret), pattern)
            legs[label] = {"bytes": sum(len(memoryview(p)) for p in parts), "plain_ms": plain, "curve_ms": curve,
                           "curve_cost_ms": curve - plain, "plain_cpu_ms": plain_cpu, "curve_cpu_ms": curve_cpu,
                           "curve_cost_cpu_ms": curve_cpu - plain_cpu}
            log(f"{label}: plain {plain:.2f} ms ({plain_cpu:.2f} ms CPU), CURVE {curve:.2f} ms ({curve_cpu:.2f} ms CPU)")
        result["transport"] = legs

        log("enrolling the bench product")
        models = root / "models"
        enroll_for_bench(models, "patchcore-fpfh", SIZE, good, params, 0)
        security = {"curve": True, "server_key": str(keys / "server.key_secret"), "allow_dir": str(allow)}
        daemons, sockets = {}, {}
        ctx = zmq.Context()
        try:
            for mode in ("plain", "curve"):
                d_root = root / mode
                d_root.mkdir()
                path, cfg = _daemon_config(d_root, models, security if mode == "curve" else None)
                daemons[mode] = DaemonProcess(path, d_root / "daemon.log", f"http://127.0.0.1:{cfg['http']['port']}",
                                              ready_timeout=600)
                try:
                    daemons[mode].start()
                except (RuntimeError, TimeoutError):
                    log(daemons[mode].log_tail())
                    raise
                ck = client if mode == "curve" else None
                sub = ctx.socket(zmq.SUB)
                apply_client_keys(sub, ck)
                sub.setsockopt(zmq.SUBSCRIBE, b"verdict/")
                sub.connect(cfg["publish"]["endpoint"])
                sockets[mode] = (FramePusher(cfg["ingest"]["endpoint"], keys=ck), sub)
            time.sleep(0.5)
            lat: dict[str, list[float]] = {"plain": [], "curve": []}
            for i, frame in enumerate([frames[0], frames[1], *frames]):  # two warm-up frames each
                for mode in ("plain", "curve") if i % 2 == 0 else ("curve", "plain"):
                    push, sub = sockets[mode]
                    seconds = _one(push, sub, frame, f"{mode}-{i}")
                    if i >= 2:
                        lat[mode].append(seconds)
            log(f"end to end p50: plain {1000 * pct(lat['plain'], 50):.1f} ms, CURVE {1000 * pct(lat['curve'], 50):.1f} ms")
        finally:
            for push, sub in sockets.values():
                push.sock.setsockopt(zmq.LINGER, 0)
                push.close()
                sub.close(linger=0)
            ctx.term()
            for d in daemons.values():
                d.stop()
    p50 = {m: 1000 * pct(v, 50) for m, v in lat.items()}
    cost = legs["frame_push"]["curve_cost_ms"] + legs["verdict_pub"]["curve_cost_ms"]
    result["curve_cost_cpu_ms_transport"] = legs["frame_push"]["curve_cost_cpu_ms"] + legs["verdict_pub"]["curve_cost_cpu_ms"]
    result["end_to_end"] = {
        m: {"latency_ms_p50": p50[m], "latency_ms_p99": 1000 * pct(v, 99), "latency_ms_all": [1000 * x for x in v]}
        for m, v in lat.items()
    }
    result["curve_cost_ms_transport"] = cost
    result["curve_cost_pct_of_e2e_p50_transport"] = 100.0 * cost / p50["plain"]
    result["curve_cost_pct_of_e2e_p50_measured"] = 100.0 * (p50["curve"] - p50["plain"]) / p50["plain"]
    result["load_average_end"] = load_average()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(render(result))
    return result


def render(r: dict[str, Any]) -> str:
    e, t = r["end_to_end"], r["transport"]
    lines = [
        f"# CurveZMQ cost on the daemon path ({r['size']}, patchcore-fpfh, torch-cpu)", "",
        f"Command: `{r['command']}`; {r['frames']} frames per daemon, sent alternately, one at a time. "
        f"Machine: {r['machine'].get('cpu', '')} ({r['machine'].get('cores', '')} cores); load average "
        f"{r['load_average_start'][0]} at the start, {r['load_average_end'][0]} at the end.", "",
        "| path | p50 ms | p99 ms |", "|---|---:|---:|",
        f"| daemon, plain ZeroMQ | {e['plain']['latency_ms_p50']:.1f} | {e['plain']['latency_ms_p99']:.1f} |",
        f"| daemon, CURVE on ingest and verdicts | {e['curve']['latency_ms_p50']:.1f} | "
        f"{e['curve']['latency_ms_p99']:.1f} |", "",
        "| leg (loopback, median of 30) | bytes | plain ms | CURVE ms | cost ms | cost, CPU ms per message |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, leg in t.items():
        lines.append(f"| {label} | {leg['bytes']} | {leg['plain_ms']:.2f} | {leg['curve_ms']:.2f} | "
                     f"{leg['curve_cost_ms']:.2f} | {leg.get('curve_cost_cpu_ms', float('nan')):.2f} |")
    lines += [
        "",
        f"CURVE cost, both legs timed alone: **{r['curve_cost_ms_transport']:.2f} ms = "
        f"{r['curve_cost_pct_of_e2e_p50_transport']:.2f} % of the plain end-to-end p50**; "
        f"end-to-end p50 difference: {r['curve_cost_pct_of_e2e_p50_measured']:+.2f} % "
        "(within the run-to-run noise of a shared machine).", "",
    ]
    return "\n".join(lines)
