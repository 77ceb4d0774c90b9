"""The daemon on a real multi-node Ray cluster: a head and two worker nodes, each its own set of
Ray processes (GCS, raylet, object store) on loopback, built with ``ray.cluster_utils.Cluster``
as Ray's own tests do. The head has no CPUs, so every scoring actor runs on a worker node.

Checked: the actors run on the worker nodes (``GET /v1/actors``, by Ray node id); their models
reach them through Ray's object store (the daemon gives its actors the model registry, never the
models folder's path); a live ``inspectd enroll --notify`` reaches the actors on both nodes (a
product that did not exist when they were placed is scored on both); killing a worker node's processes
(its raylet included) mid-stream moves its actor to the other node, and every frame sent gets
exactly one verdict, none an error. Everything started here is stopped at the end.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback (read when ray is imported)

from ray.cluster_utils import Cluster  # noqa: E402

from sensors.publisher import FramePusher  # noqa: E402
from sensors.simulated import simulated_parts  # noqa: E402

from conftest import PRODUCT, launch_daemon, receive_verdicts  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
NEW = "gear"
LOOPBACK = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A head without CPUs and two worker nodes of 2 CPUs each (room for a moved actor)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **LOOPBACK})
    try:
        for _ in range(2):
            c.add_node(num_cpus=2, **LOOPBACK)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def inspectd(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_actors_on_worker_nodes_live_enroll_and_a_killed_node(
        cluster: Cluster, enrolled_models: Path, tmp_path: Path) -> None:
    import shutil

    models = tmp_path / "models"
    shutil.copytree(enrolled_models, models)
    good = tmp_path / "good"
    inspectd("simulate", str(good), "--product", NEW, "--count", "8", "--seed", "3")
    workers = {n.node_id: n for n in cluster.worker_nodes}
    head = cluster.head_node.node_id
    sections = {
        "ray": {"address": cluster.address, "num_cpus": None},
        "workers": {"actors": 2, "max_batch": 1, "retries": 3, "takt_ms": 120_000, "large_actors": 0},
        "ingest": {"queue_size": 64},
    }
    with launch_daemon(models, tmp_path, **sections) as d:
        actors = get_json(d.http + "/v1/actors")["actors"]
        placed = {a["node_id"] for a in actors}
        assert placed == set(workers), f"actors on {placed}, worker nodes {set(workers)}, head {head}"
        assert head not in placed
        assert {a["handover"] for a in actors} == {"object_store"}  # not the daemon's node: Ray calls

        # a live enroll reaches both nodes (the product did not exist when the actors were placed)
        out = inspectd("enroll", "--product", NEW, "--good", str(good), "--holdout", "4", "--target-frr", "0.05",
                       "--scorer", "patchcore-fpfh", "--models", str(models), "--notify", d.http)
        assert "daemon now serves" in out and "on 2 actors" in out, out
        revision = (models / NEW / "current").read_text().strip()

        ctx = zmq.Context()
        sub = d.subscriber(ctx)
        first = simulated_parts([NEW], 8, 0.0, seed=91, sensor_id="cam-a", good_only=True)
        parts = iter(simulated_parts([NEW, PRODUCT], 16, 0.0, seed=92, sensor_id="cam-b", good_only=True))
        sent: list[str] = []
        verdicts: list = []
        with FramePusher(d.ingest) as push:
            for frame in first:
                push.send(frame)
                sent.append(frame.meta.part_id)
            verdicts += receive_verdicts(sub, 8, timeout=90)
            pid_node = {a["pid"]: a["node_id"] for a in get_json(d.http + "/v1/actors")["actors"]}
            new_on = {pid_node.get(v.header["worker_pid"]) for v in verdicts if v.header["product"] == NEW}

            # kill one worker node (raylet, object store, its actor) while frames are in flight
            victim = sorted(workers)[0]
            for _ in range(6):
                frame = next(parts)
                push.send(frame)
                sent.append(frame.meta.part_id)
            cluster.remove_node(workers[victim], allow_graceful=False)
            for _ in range(10):
                frame = next(parts)
                push.send(frame)
                sent.append(frame.meta.part_id)
            verdicts += receive_verdicts(sub, len(sent) - len(verdicts), timeout=120)
        deadline = time.time() + 60
        while time.time() < deadline:  # the moved actor reports in once Ray restarted it
            after = get_json(d.http + "/v1/actors")["actors"]
            if all(a["alive"] for a in after):
                break
            time.sleep(1)
        ctx.destroy(linger=0)

    headers = [v.header for v in verdicts]
    assert sorted(h["part_id"] for h in headers) == sorted(sent), "a frame has no verdict, or two"
    assert all(h["verdict"] != "error" for h in headers), [h["error"] for h in headers if h["error"]]
    assert new_on == set(workers), f"the live-enrolled product was scored on {new_on}, not on both worker nodes"
    assert {h["model_revision"] for h in headers if h["product"] == NEW} == {revision}
    assert not any(h["zero_shot"] for h in headers)
    assert {a["node_id"] for a in after} == set(workers) - {victim}, after  # the victim's actor moved
    assert all(a["alive"] for a in after), after
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # one committed verdict per frame
        rows = db.execute("SELECT part_id, COUNT(*) FROM verdicts GROUP BY part_id").fetchall()
    assert sorted(p for p, _ in rows) == sorted(sent) and {n for _, n in rows} == {1}
    log = (tmp_path / "daemon.log").read_text()
    assert f"on node {victim}" in log and "restarted" in log
