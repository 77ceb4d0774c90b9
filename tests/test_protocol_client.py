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


def _recv_until(sockets: list, want, timeout: float) -> list[tuple[int, list[bytes]]]:
    """Messages from ``sockets`` (index, parts) until ``want(messages)`` holds or ``timeout`` passes."""
    poller = zmq.Poller()
    for s in sockets:
        poller.register(s, zmq.POLLIN)
    got: list[tuple[int, list[bytes]]] = []
    deadline = time.time() + timeout
    while not want(got) and time.time() < deadline:
        for s, _ in poller.poll(200):
            got.append((sockets.index(s), s.recv_multipart()))
    return got


def test_protocol_2_ack_resend_and_replay(daemon: RunningDaemon) -> None:
    import urllib.request

    sensor_id = "doc-v2-client"
    ctx = zmq.Context()
    acks = ctx.socket(zmq.SUB)
    acks.connect(daemon.publish)
    acks.setsockopt(zmq.SUBSCRIBE, f"ack/{sensor_id}/".encode())
    verdicts = ctx.socket(zmq.SUB)
    verdicts.connect(daemon.publish)
    verdicts.setsockopt(zmq.SUBSCRIBE, f"verdict/{PRODUCT}/".encode())
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.connect(daemon.ingest)
    time.sleep(0.5)

    pts = simulated_points()
    h, w, _ = pts.shape
    raw = pts.astype("<f4").tobytes()

    def frame(seq: int, part_id: str) -> list[bytes]:
        header = {"protocol": 2, "sensor_id": sensor_id, "product": PRODUCT, "part_id": part_id, "seq": seq,
                  "capture_time": time.time(),
                  "buffers": [{"name": "points", "dtype": "float32", "shape": [h, w, 3]}]}
        return [json.dumps(header).encode("utf-8"), raw]

    def ack_bodies(got: list) -> list[dict]:
        return [json.loads(p[1]) for i, p in got if i == 0]

    def verdict_heads(got: list, part_id: str) -> list[dict]:
        heads = [json.loads(p[1]) for i, p in got if i == 1]
        return [v for v in heads if v.get("part_id") == part_id]

    try:
        # 1. a protocol-2 frame: its verdict, then its ack on ack/<sensor_id>/
        push.send_multipart(frame(0, "v2-a"))
        got = _recv_until([acks, verdicts], lambda g: ack_bodies(g) and verdict_heads(g, "v2-a"), 90)
        (ack,) = ack_bodies(got)
        assert ack["type"] == "ack" and ack["protocol"] == 2
        assert (ack["sensor_id"], ack["seq"], ack["part_id"]) == (sensor_id, 0, "v2-a")
        assert ack["verdict"] in ("pass", "review", "fail")
        (first,) = verdict_heads(got, "v2-a")
        assert first["protocol"] == 2 and first["verdict_id"] == ack["verdict_id"]

        # 2. the same frame resent: the original verdict again (republished), acked again, not rescored
        push.send_multipart(frame(0, "v2-a"))
        got = _recv_until([acks, verdicts], lambda g: ack_bodies(g) and verdict_heads(g, "v2-a"), 60)
        (again,) = ack_bodies(got)
        assert again["verdict_id"] == ack["verdict_id"] and again["verdict"] == ack["verdict"]
        (repub,) = verdict_heads(got, "v2-a")
        assert repub["republished"] is True and repub["verdict_id"] == first["verdict_id"]
        assert repub["score"] == first["score"] and repub["map"] is None

        # 3. a frame sent twice at once: the copy is answered by the original's ack, one verdict id
        push.send_multipart(frame(1, "v2-b"))
        push.send_multipart(frame(1, "v2-b"))
        got = _recv_until([acks, verdicts], lambda g: len(ack_bodies(g)) >= 2, 30)
        assert ack_bodies(got) and len({a["verdict_id"] for a in ack_bodies(got)}) == 1

        # 4. replay from the log: one row per frame, paged by after_id
        def replay(query: str) -> dict:
            with urllib.request.urlopen(f"{daemon.http}/v1/verdicts?{query}", timeout=10) as r:
                return json.loads(r.read())

        page = replay(f"sensor_id={sensor_id}")
        assert [(v["seq"], v["part_id"]) for v in page["verdicts"]] == [(0, "v2-a"), (1, "v2-b")]
        assert page["verdicts"][0]["verdict_id"] == ack["verdict_id"] and page["more"] is False
        one = replay(f"sensor_id={sensor_id}&limit=1")
        assert one["more"] is True and one["last_id"] == ack["verdict_id"]
        rest = replay(f"sensor_id={sensor_id}&after_id={one['last_id']}")
        assert [v["part_id"] for v in rest["verdicts"]] == ["v2-b"]
        window = replay(f"since={first['decided_at'] - 0.001}&until={first['decided_at'] + 0.001}")
        assert ack["verdict_id"] in [v["verdict_id"] for v in window["verdicts"]]
    finally:
        ctx.destroy(linger=0)
