"""The wire codec: round trips, zero-copy decoding, and one test per refusal reason."""

from __future__ import annotations

import numpy as np
import pytest

from sensors.frame import FrameError
from sensors.wire import (
    REFUSAL_REASONS,
    decode_frame,
    decode_verdict,
    encode_frame,
    encode_verdict,
    salvage_header,
)

from malformed import BAD_MESSAGES, header_and_buffers, make_frame


@pytest.mark.parametrize("organized", [True, False])
def test_round_trip(organized: bool) -> None:
    f = make_frame(organized)
    parts = [bytes(p) for p in encode_frame(f)]
    g = decode_frame(parts)
    assert g.meta == f.meta
    np.testing.assert_array_equal(g.points, f.points)
    np.testing.assert_array_equal(g.rgb, f.rgb)
    np.testing.assert_array_equal(g.gt_mask, f.gt_mask)
    assert g.organized == organized
    assert g.valid_mask().sum() == f.n_points - 1


def test_decode_does_not_copy() -> None:
    parts = [bytes(p) for p in encode_frame(make_frame())]
    buf = bytearray(parts[1])
    g = decode_frame([parts[0], buf, parts[2], parts[3]])
    assert np.shares_memory(g.points, np.frombuffer(buf, dtype=np.uint8))


def test_every_reason_has_a_case() -> None:
    assert set(BAD_MESSAGES) == set(REFUSAL_REASONS)


@pytest.mark.parametrize("reason", sorted(BAD_MESSAGES))
def test_refusals_name_their_reason(reason: str) -> None:
    with pytest.raises(FrameError) as e:
        decode_frame(BAD_MESSAGES[reason](), max_points=1_000_000)
    assert e.value.reason == reason


def test_salvage_keeps_identity_of_refused_frames() -> None:
    ident = salvage_header(header_and_buffers(protocol=99))
    assert ident["part_id"] == "p-1" and ident["product"] == "flange"
    assert salvage_header([b"garbage"]) == {}


def test_verdict_round_trip_with_nan_free_json() -> None:
    amap = np.arange(12, dtype=np.float32).reshape(3, 4)
    parts = encode_verdict({"product": "gear", "verdict": "fail", "score": float("nan")}, amap)
    assert bytes(parts[0]) == b"verdict/gear/"
    msg = decode_verdict([bytes(p) for p in parts])
    assert msg.header["score"] is None and msg.header["map"]["shape"] == [3, 4]
    np.testing.assert_array_equal(msg.anomaly_map, amap)
    err = decode_verdict([bytes(p) for p in encode_verdict({"verdict": "error"}, None)])
    assert err.topic == "verdict/_unknown/" and err.anomaly_map is None


def test_a_stopped_stream_reports_exactly_what_it_sent() -> None:
    import threading

    import zmq

    from sensors.publisher import stream
    from sensors.wire import decode_frame

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    frames = (make_frame(organized=False) for _ in range(1000))
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    sent = stream(frames, f"tcp://127.0.0.1:{port}", rate=50.0, stop=stop)
    received = 0
    while pull.poll(500):
        decode_frame(pull.recv_multipart())
        received += 1
    ctx.destroy(linger=0)
    assert 0 < sent < 1000 and received == sent
