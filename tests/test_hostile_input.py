"""Hostile input and a failing emit path, against a real daemon on loopback: a header nested
1,000 deep, label values from the wire, map files on a full disk (/dev/full), a result log that
cannot commit (another process holds its write lock), and a part id of ``..``."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
from test_daemon_e2e import metric_value

from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts

from conftest import PRODUCT, RunningDaemon, launch_daemon, receive_verdicts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hostile(enrolled_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """One daemon; one configured sensor id and two more label values for ids first seen."""
    root = tmp_path_factory.mktemp("hostile")
    with launch_daemon(enrolled_models, root, ingest={"sensors": ["cam-a"], "max_sensor_labels": 2}) as d:
        yield d


def good_frames(n: int, seed: int, **meta: object) -> list:
    """``n`` good simulated parts captured now, with ``meta`` fields replaced (``{i}`` in strings)."""
    out = []
    for i, f in enumerate(simulated_parts([PRODUCT], n, 0.0, seed=seed, good_only=True)):
        changes = {k: v.format(i=i) if isinstance(v, str) else v for k, v in meta.items()}
        out.append(replace(f, meta=replace(f.meta, capture_time=time.time(), **changes)))
    return out


def send_and_collect(d: RunningDaemon, messages: list, expected: int, timeout: float = 60) -> list:
    """Send frames (or raw message parts) and return the verdicts a subscriber received."""
    ctx = zmq.Context()
    sub = d.subscriber(ctx)
    with FramePusher(d.ingest) as push:
        for m in messages:
            push.send_parts(m) if isinstance(m, list) else push.send(m)
    verdicts = receive_verdicts(sub, expected, timeout=timeout)
    ctx.destroy(linger=0)
    return verdicts


def test_recursion_header_does_not_stop_ingest(hostile: RunningDaemon) -> None:
    nested = [b"[" * 1000 + b"]" * 1000, b""]
    after = good_frames(1, seed=31, part_id="after-nested")[0]
    verdicts = send_and_collect(hostile, [nested, nested, after], 3)
    assert len(verdicts) == 3
    errors = [v.header for v in verdicts if v.header["verdict"] == "error"]
    assert [h["error"]["reason"] for h in errors] == ["header_not_json"] * 2
    scored = [v.header for v in verdicts if v.header["verdict"] != "error"]
    assert [h["part_id"] for h in scored] == ["after-nested"]
    assert "Exception in thread" not in (hostile.root / "daemon.log").read_text()


def test_label_values_stay_in_bounded_sets(hostile: RunningDaemon) -> None:
    before = len(hostile.metrics())
    frames = good_frames(2, seed=32, sensor_id="cam-a")
    frames += good_frames(40, seed=33, sensor_id="x" * 200 + "{i}", product="unknown-{i}", part_id="u-{i}")
    # in bursts under the PUB's high-water mark (16 verdicts with this config's inline maps): a
    # burst beyond it may drop verdicts for a subscriber whose socket lags, as documented
    verdicts = []
    for i in range(0, len(frames), 8):
        verdicts += send_and_collect(hostile, frames[i:i + 8], len(frames[i:i + 8]), timeout=90)
    assert len(verdicts) == len(frames)
    text = hostile.metrics()
    sensors = {line.split('sensor_id="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("inspectd_frames_received_total{")}
    assert "cam-a" in sensors and "other" in sensors and len(sensors) <= 1 + 2 + 1
    products = {line.split('product="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("inspectd_verdicts_total{")}
    assert products <= {PRODUCT, "other"}
    assert len(text) - before < 8_000, "42 hostile ids must not add label values"


def test_full_disk_map_write_still_publishes_and_counts(hostile: RunningDaemon) -> None:
    day = time.strftime("%Y-%m-%d")
    folder = hostile.root / "maps" / PRODUCT / day
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"full-{i}.npz").symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    before = metric_value(hostile.metrics(), "inspectd_map_write_failures_total")
    verdicts = send_and_collect(hostile, good_frames(3, seed=34, part_id="full-{i}"), 3)
    assert len(verdicts) == 3
    for v in verdicts:
        assert v.header["verdict"] in ("pass", "review", "fail") and v.header["map_path"] is None
    assert metric_value(hostile.metrics(), "inspectd_map_write_failures_total") - before == 3


def test_dot_dot_part_id_keeps_its_verdict_and_map(hostile: RunningDaemon) -> None:
    verdicts = send_and_collect(hostile, good_frames(1, seed=35, part_id=".."), 1)
    assert len(verdicts) == 1 and verdicts[0].header["verdict"] in ("pass", "review", "fail")
    path = Path(verdicts[0].header["map_path"])
    assert path.is_file() and path.name == "part.npz" and (hostile.root / "maps") in path.parents


def test_failed_log_commit_is_answered_log_failed(hostile: RunningDaemon) -> None:
    before = metric_value(hostile.metrics(), "inspectd_log_failures_total")
    lock = sqlite3.connect(hostile.root / "results.sqlite", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the daemon's commit waits out its busy timeout, then fails
    try:
        verdicts = send_and_collect(hostile, good_frames(1, seed=36, part_id="no-log"), 1)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert len(verdicts) == 1
    h = verdicts[0].header
    assert h["verdict"] == "error" and h["error"]["reason"] == "log_failed" and h["part_id"] == "no-log"
    assert metric_value(hostile.metrics(), "inspectd_log_failures_total") - before == 1
    after = send_and_collect(hostile, good_frames(1, seed=37, part_id="log-back"), 1)
    assert len(after) == 1 and after[0].header["verdict_id"] is not None
