"""``inspectd bench --nodes 1,2``: daemon throughput with 1, 2, ... scoring nodes of a Ray cluster.

For each node count N a Ray cluster is started on this machine (``ray.cluster_utils.Cluster``, as
Ray's own tests: a head without CPUs and N worker nodes of one CPU each, every node its own Ray
processes on loopback), the daemon joins it (``ray.address``, one actor per node, models shipped
through Ray's object store) and the same frames are pushed unpaced; the throughput is verdicts
per second from the first send to the last verdict. The ratio to 1 node is taken within one run.

On one machine the nodes share its cores (and the daemon, the head and the raylets run there
too): the figure says how far the cluster path scales on this box, not what separate machines
would give. The report names the CPU and the load. Results: ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
import zmq

from sensors.frame import Frame
from tools.bench.batch import lscpu_model
from tools.bench.daemon_path import run_stream
from tools.bench.measure import load_average, machine_description
from tools.bench.report import write_report
from tools.bench.run import enroll_for_bench, make_frames
from tools.process import DaemonProcess, free_port

LOOPBACK = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}


def _one(models: Path, frames: list[Frame], nodes: int, root: Path) -> dict[str, Any]:
    """Throughput of the daemon on a cluster of ``nodes`` one-CPU worker nodes."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback (read when ray is imported)
    from ray.cluster_utils import Cluster

    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **LOOPBACK})
    daemon = None
    ctx = zmq.Context()
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, **LOOPBACK)
        cluster.wait_for_nodes()
        http = free_port()
        cfg = {
            "ingest": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "queue_size": 32, "max_wait_ms": 60000,
                       "max_points": max(f.n_points for f in frames), "max_age_ms": 600_000},
            "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
            "http": {"host": "127.0.0.1", "port": http},
            "storage": {"results": str(root / "results.sqlite"), "maps_dir": str(root / "maps"), "maps": "none",
                        "models_dir": str(models)},
            "ray": {"address": cluster.address},
            "workers": {"actors": nodes, "backend": "torch-cpu", "large_actors": 0, "takt_ms": 60_000},
            "memory": {"bound_mb": 1_000_000},
        }
        path = root / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        daemon = DaemonProcess(path, root / "daemon.log", f"http://127.0.0.1:{http}").start()
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/actors", timeout=10) as r:
            placed = sorted({a["node_id"] for a in json.loads(r.read())["actors"]})
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"verdict/")
        sub.connect(cfg["publish"]["endpoint"])
        time.sleep(0.5)
        run_stream(cfg["ingest"]["endpoint"], sub, frames[:2], 0)  # warm-up
        load_before = load_average()
        seen: set[str] = set()
        lat, wall = run_stream(cfg["ingest"]["endpoint"], sub, frames, 0, seen)
        return {
            "nodes": nodes,
            "actors": nodes,
            "actor_nodes": placed,
            "worker_node_ids": sorted(n.node_id for n in cluster.worker_nodes),
            "frames": len(frames),
            "verdicts": len(lat),
            "errors": sorted(s for s in seen if s.startswith("error")),
            "throughput_per_s": len(lat) / wall,
            "load_before": load_before,
            "load_after": load_average(),
        }
    finally:
        if daemon is not None:
            daemon.stop()
        ctx.destroy(linger=0)
        cluster.shutdown()


def run_cluster_bench(out: Path, name: str, node_counts: list[int], scorer: str, size: str,
                      n_frames: int) -> dict[str, Any]:
    """Enroll once, measure every node count, write ``<out>/<name>.json`` and ``.md``."""
    good, params = make_frames(size, 8, seed=11, good_only=True)
    frames, _ = make_frames(size, n_frames, seed=12, good_only=False)
    report: dict[str, Any] = {"machine": {**machine_description(), "lscpu_model": lscpu_model()},
                              "scorer": scorer, "size": size, "load_start": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        enroll_for_bench(models, scorer, size, good, params, imrnet_steps=10)
        report["runs"] = [_one(models, frames, n, Path(tmp) / f"nodes-{n}") for n in node_counts]
    report["load_end"] = load_average()
    base = report["runs"][0]["throughput_per_s"]
    for run in report["runs"]:
        run["ratio_to_first"] = run["throughput_per_s"] / base
    write_report(out, name, report, render)
    return report


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Daemon throughput with 1 and 2 scoring nodes (Ray cluster on one machine)",
        "",
        f"Machine: {m['lscpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB; GPU: {m['gpu'] or 'none'}. "
        f"Load average (1/5/15 min) at start {r['load_start']}, end {r['load_end']}.",
        "",
        f"Scorer {r['scorer']}, frames {r['size']}, pushed unpaced through ZeroMQ to the daemon, which joins a "
        "Ray cluster (head without CPUs, N worker nodes of 1 CPU, one actor per node, models shipped through "
        "Ray). Every node runs on this machine and shares its cores with the daemon and the head.",
        "",
        "| scoring nodes | actors | frames | verdicts | errors | frames/s | ratio to 1 node | load before → after |",
        "|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for x in r["runs"]:
        lines.append(f"| {x['nodes']} | {x['actors']} | {x['frames']} | {x['verdicts']} | {', '.join(x['errors']) or '-'} "
                     f"| {x['throughput_per_s']:.2f} | {x['ratio_to_first']:.2f} | {x['load_before'][0]} → "
                     f"{x['load_after'][0]} |")
    return "\n".join(lines) + "\n"
