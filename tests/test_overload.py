"""Overload: 30 sender connections pushing as fast as they can for 60 s, plus 20 subscribers that
never read, against a real daemon on loopback (about 2.5 minutes).

Checked: the daemon's RSS stays under its configured ``memory.bound_mb`` throughout; frames
older than ``ingest.max_age_ms`` at dequeue are answered ``overloaded``; every frame a sender's
``send`` accepted has exactly one verdict in the result log. ``INSPECTD_OVERLOAD_S`` shortens
the push phase for a quick local run."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import zmq
from procstats import rss_mb, wait_rows

from daemon.config import Config, worst_case_memory
from sensors.simulated import simulated_parts
from sensors.wire import encode_frame

from conftest import PRODUCT, launch_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SENDERS = 30
SUBSCRIBERS = 20
PUSH_S = float(os.environ.get("INSPECTD_OVERLOAD_S", "60"))
SECTIONS = {
    "ingest": {"max_points": 160_000, "receive_hwm": 2, "max_connections": 32, "max_age_ms": 2000,
               "queue_size": 8, "max_wait_ms": 1000},
    "publish": {"maps": "inline", "buffer_mb": 4, "max_subscribers": 32},
    "workers": {"actors": 2, "large_actors": 0},
    "memory": {"bound_mb": 1000, "baseline_mb": 500},
}


def push_as_fast_as_possible(endpoint: str, frame, sensor: str, stop: threading.Event, sent: dict) -> None:
    """One sender connection: send until ``stop``; count only the sends ZeroMQ accepted."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 2)
    sock.setsockopt(zmq.SNDTIMEO, 500)
    sock.setsockopt(zmq.LINGER, 120_000)  # the frames send accepted must reach the daemon
    sock.connect(endpoint)
    seq = 0
    while not stop.is_set():
        meta = replace(frame.meta, sensor_id=sensor, seq=seq, part_id=f"{sensor}-{seq}", capture_time=time.time())
        try:
            sock.send_multipart(encode_frame(replace(frame, meta=meta)), copy=False)
        except zmq.Again:
            continue
        seq += 1
    sent[sensor] = seq
    sock.close()
    ctx.term()


def test_flood_is_bounded_and_answered(enrolled_models: Path, tmp_path: Path) -> None:
    cfg = Config.model_validate(SECTIONS)
    worst = sum(worst_case_memory(cfg).values()) / 2**20
    assert worst <= cfg.memory.bound_mb
    frame = next(simulated_parts([PRODUCT], 1, 0.0, seed=50, good_only=True))
    with launch_daemon(enrolled_models, tmp_path, **SECTIONS) as d:
        sub_ctx = zmq.Context()
        subs = []
        for _ in range(SUBSCRIBERS):  # subscribed, connected, never read
            s = sub_ctx.socket(zmq.SUB)
            s.setsockopt(zmq.SUBSCRIBE, b"verdict/")
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 65536)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.publish)
            subs.append(s)
        rss: list[float] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                rss.append(rss_mb(d.proc.pid))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        stop, sent = threading.Event(), {}
        senders = [threading.Thread(target=push_as_fast_as_possible, args=(d.ingest, frame, f"load-{k}", stop, sent))
                   for k in range(SENDERS)]
        for t in senders:
            t.start()
        time.sleep(PUSH_S)
        stop.set()
        for t in senders:
            t.join(timeout=180)
        total = sum(sent.values())
        db = tmp_path / "results.sqlite"
        rows = wait_rows(db, total, timeout=120)
        watching.set()
        watcher.join()
        sub_ctx.destroy(linger=0)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            distinct = conn.execute("SELECT COUNT(DISTINCT sensor_id || '/' || seq) FROM verdicts").fetchone()[0]
            reasons = dict(conn.execute(
                "SELECT COALESCE(error_reason, verdict), COUNT(*) FROM verdicts GROUP BY 1").fetchall())
            aged = conn.execute(
                "SELECT COUNT(*) FROM verdicts WHERE error_detail LIKE '%old at dequeue%'").fetchone()[0]
        print(f"overload: {SENDERS} senders x {PUSH_S:.0f}s sent {total}, log {rows} ({distinct} distinct), "
              f"{reasons}; RSS max {max(rss):.0f} MB (bound {cfg.memory.bound_mb:.0f}, worst case {worst:.0f})")
        assert all(not t.is_alive() for t in senders) and len(sent) == SENDERS
        assert rows == total and distinct == total
        assert aged > 0
        assert max(rss) < cfg.memory.bound_mb
