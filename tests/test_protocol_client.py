"""A client written from docs/protocol.md alone: raw pyzmq, json and numpy, no inspectd import.

It builds frame messages byte by byte as the document describes and reads verdicts the same
way, so a drift between the document and the daemon fails here."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
import zmq

from conftest import PRODUCT, RunningDaemon

pytestmark = pytest.mark.slow


def simulated_points() -> np.ndarray:
    # A real part image from the simulated camera, so the daemon can score it; the bytes are ours.
    from sensors.simulated import simulated_parts

    return np.asarray(next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=5, good_only=True))).points)


def test_client_from_the_document(daemon: RunningDaemon) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(daemon.publish)
    sub.setsockopt(zmq.SUBSCRIBE, f"verdict/{PRODUCT}/".encode())
    sub.setsockopt(zmq.SUBSCRIBE, b"verdict/_unknown/")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.connect(daemon.ingest)
    time.sleep(0.5)

    pts = simulated_points()
    h, w, _ = pts.shape
    # little-endian float32, C order, NaN as 0x7FC00000
    raw = b"".join(struct.pack("<f", float(v)) if np.isfinite(v) else b"\x00\x00\xc0\x7f" for v in pts[:2].ravel())
    raw += pts[2:].astype("<f4").tobytes()
    assert len(raw) == h * w * 3 * 4
    header = {"protocol": 1, "sensor_id": "doc-client", "product": PRODUCT, "part_id": "doc-1", "seq": 0,
              "capture_time": time.time(), "units": "mm", "my_own_key": 1,
              "buffers": [{"name": "points", "dtype": "float32", "shape": [h, w, 3]}]}
    push.send_multipart([json.dumps(header).encode("utf-8"), raw])
    bad = dict(header, part_id="doc-2", buffers=[{"name": "points", "dtype": "float32", "shape": [h, w - 1, 3]}])
    push.send_multipart([json.dumps(bad).encode("utf-8"), raw])

    got = {}
    deadline = time.time() + 60
    while len(got) < 2 and time.time() < deadline:
        if sub.poll(200):
            parts = sub.recv_multipart()
            head = json.loads(parts[1].decode("utf-8"))
            got[head["part_id"]] = (parts, head)
    ctx.destroy(linger=0)

    parts, head = got["doc-1"]
    assert parts[0] == f"verdict/{PRODUCT}/".encode("ascii")
    assert head["protocol"] == 1 and head["type"] == "verdict"
    assert head["verdict"] in ("pass", "review", "fail") and head["error"] is None
    assert head["review_low"] <= head["threshold"] <= head["fail_from"]
    assert head["map"] == {"dtype": "float32", "shape": [h, w]} and len(parts) == 3
    amap = np.frombuffer(parts[2], "<f4").reshape(h, w)
    assert np.isnan(amap[~np.isfinite(pts).all(axis=2)]).all()
    assert np.isfinite(amap[np.isfinite(pts).all(axis=2)]).all()
    for key in ("score", "received_at", "decided_at", "latency_ms", "stage_ms", "verdict_id", "model_version"):
        assert key in head
    parts, head = got["doc-2"]
    assert head["verdict"] == "error" and head["error"]["reason"] == "buffer_size_mismatch"
    assert head["map"] is None and len(parts) == 2
