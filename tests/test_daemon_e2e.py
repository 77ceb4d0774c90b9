"""The whole line over loopback: a real sensor process, the real daemon with a real local Ray,
and a real ZeroMQ subscriber. Marked slow: it starts processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import pytest
import zmq

from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts
from sensors.wire import REFUSAL_REASONS

from conftest import PRODUCT, RunningDaemon, receive_verdicts
from malformed import BAD_MESSAGES

pytestmark = pytest.mark.slow


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_sensor_process_to_subscriber(daemon: RunningDaemon) -> None:
    ctx = zmq.Context()
    sub = daemon.subscriber(ctx)
    n = 6
    sensor = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "sensor", "sim", "--endpoint", daemon.ingest, "--products", PRODUCT,
         "--parts", str(n), "--defect-rate", "0.5", "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert sensor.returncode == 0, sensor.stderr
    assert '"sent": 6' in sensor.stdout
    verdicts = receive_verdicts(sub, n, timeout=60)
    ctx.destroy(linger=0)
    assert len(verdicts) == n  # lost = 0
    assert {v.header["part_id"] for v in verdicts} == {f"{PRODUCT}-3-{i:05d}" for i in range(n)}
    for v in verdicts:
        h = v.header
        assert v.topic == f"verdict/{PRODUCT}/"
        assert h["verdict"] in ("pass", "review", "fail"), h
        assert h["scorer"] == "patchcore-fpfh" and h["threshold"] > 0 and h["backend"] == "torch-cpu"
        assert v.anomaly_map.shape == (400, 400) and h["map_path"].endswith(".npz")
    rows = sqlite3.connect(daemon.root / "results.sqlite").execute(
        "SELECT COUNT(*) FROM verdicts WHERE part_id LIKE ?", (f"{PRODUCT}-3-%",)
    ).fetchone()[0]
    assert rows == n
    m = daemon.metrics()
    assert metric_value(m, "inspectd_verdicts_total", product=PRODUCT) >= n
    assert metric_value(m, "inspectd_ready") == 1
    assert metric_value(m, "inspectd_actors", backend="torch-cpu") == 2
    assert metric_value(m, "inspectd_latency_seconds_count") >= n


def test_malformed_messages_get_error_verdicts_while_good_frames_flow(daemon: RunningDaemon) -> None:
    ctx = zmq.Context()
    sub = daemon.subscriber(ctx)
    good = list(simulated_parts([PRODUCT], 3, 0.0, seed=11, good_only=True))
    before = daemon.metrics()
    with FramePusher(daemon.ingest) as push:
        push.send(good[0])
        for reason in REFUSAL_REASONS:
            push.send_parts(BAD_MESSAGES[reason](f"bad-{reason}"))
        push.send(good[1])
        push.send(replace(good[2], meta=replace(good[2].meta, product="never-enrolled", part_id="bad-unknown_product")))
        push.send(good[2])
    expected = len(REFUSAL_REASONS) + 4
    verdicts = receive_verdicts(sub, expected, timeout=60)
    ctx.destroy(linger=0)
    assert len(verdicts) == expected
    errors = [v.header for v in verdicts if v.header["verdict"] == "error"]
    reasons = sorted(h["error"]["reason"] for h in errors)
    assert reasons == sorted([*REFUSAL_REASONS, "unknown_product"])
    for h in errors:
        if h.get("part_id", "").startswith("bad-"):
            assert h["part_id"] == f"bad-{h['error']['reason']}"
    scored = [v.header for v in verdicts if v.header["verdict"] != "error"]
    assert sorted(h["part_id"] for h in scored) == sorted(f.meta.part_id for f in good)
    after = daemon.metrics()
    for reason in [*REFUSAL_REASONS, "unknown_product"]:
        grown = metric_value(after, "inspectd_frames_refused_total", reason=reason) - metric_value(
            before, "inspectd_frames_refused_total", reason=reason)
        assert grown == 1, reason
    assert daemon.proc.poll() is None  # the daemon is still running


def test_killed_actor_is_restarted_and_no_frame_is_lost(daemon: RunningDaemon) -> None:
    ctx = zmq.Context()
    sub = daemon.subscriber(ctx)
    # enough frames that the kill, 0.3 s in, finds the actor busy
    frames = list(simulated_parts([PRODUCT], 24, 0.0, seed=21, good_only=True))
    with FramePusher(daemon.ingest) as push:
        push.send(frames[0])
        first = receive_verdicts(sub, 1, timeout=60)
        assert first and first[0].header["verdict"] != "error"
        for f in frames[1:]:
            push.send(f)
        time.sleep(0.3)
        os.kill(first[0].header["worker_pid"], signal.SIGKILL)
        rest = receive_verdicts(sub, len(frames) - 1, timeout=90)
    ctx.destroy(linger=0)
    assert len(rest) == len(frames) - 1
    assert {v.header["part_id"] for v in rest} == {f.meta.part_id for f in frames[1:]}
    errors = [v.header["error"] for v in rest if v.header["verdict"] == "error"]
    assert not errors, errors
    deadline = time.time() + 60  # Ray reports a death within seconds; the frames may be answered first
    while metric_value(daemon.metrics(), "inspectd_actor_restarts_total") < 1:
        assert time.time() < deadline, "the killed actor's death was never counted"
        time.sleep(0.5)
    # the restarted actor is handed frames through shared memory again, as every local actor is
    deadline = time.time() + 60
    while {a["handover"] for a in actors(daemon)} != {"shared_memory"}:
        assert time.time() < deadline, actors(daemon)
        time.sleep(0.5)


def actors(daemon: RunningDaemon) -> list[dict]:
    """``GET /v1/actors``."""
    with urllib.request.urlopen(daemon.http + "/v1/actors", timeout=10) as r:
        return json.loads(r.read())["actors"]


def test_replay_sensor_process(daemon: RunningDaemon, tmp_path) -> None:
    from sensors.pointfiles import write_pcd, write_xyz_tiff

    frames = list(simulated_parts([PRODUCT], 2, 0.0, seed=31, good_only=True))
    for f in frames:
        write_xyz_tiff(tmp_path / f"{f.meta.part_id}.tiff", f.points)
    cloud = frames[0].valid_points()[::4]
    write_pcd(tmp_path / "cloud-0.pcd", cloud)  # an unorganized scan of the same product
    ctx = zmq.Context()
    sub = daemon.subscriber(ctx)
    run = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "sensor", "replay", str(tmp_path), "--product", PRODUCT,
         "--endpoint", daemon.ingest, "--rate", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    verdicts = receive_verdicts(sub, 3, timeout=60)
    ctx.destroy(linger=0)
    by_id = {v.header["part_id"]: v for v in verdicts}
    assert set(by_id) == {f.meta.part_id for f in frames} | {"cloud-0"}
    assert by_id["cloud-0"].anomaly_map.shape == (len(cloud),)
    assert by_id[frames[0].meta.part_id].anomaly_map.shape == (400, 400)
    assert all(v.header["verdict"] != "error" for v in verdicts), [v.header["error"] for v in verdicts]
