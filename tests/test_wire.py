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


def test_deeply_nested_header_is_refused_and_salvage_never_raises() -> None:
    nested = [b"[" * 1000 + b"]" * 1000, b""]
    with pytest.raises(FrameError) as e:
        decode_frame(nested)
    assert e.value.reason == "header_not_json"
    assert salvage_header(nested) == {}
    deep_truth = b'{"truth":' + b'{"a":' * 900 + b"1" + b"}" * 901
    assert salvage_header([deep_truth]) == {}
    for junk in ([], [b""], [b"\x00" * 10], [b"[]"], [b'{"seq": 1e999}'], [bytes(20_000)]):
        salvage_header(junk)


@pytest.mark.parametrize(
    "change",
    [
        {"product": "flange\n"},
        {"protocol": True},
        {"seq": 2**63},
        {"seq": -1},
        {"seq": True},
        {"sensor_id": "s" * 257},
        {"part_id": ""},
        {"truth": {"a": {"b": {"c": {"d": {}}}}}},
        {"buffers": [{"name": ["points"], "dtype": "float32", "shape": [6, 5, 3]}]},
        {"buffers": [{"name": "points", "dtype": {"x": 1}, "shape": [6, 5, 3]}]},
    ],
)
def test_hostile_fields_are_refused(change: dict) -> None:
    with pytest.raises(FrameError) as e:
        decode_frame(header_and_buffers(**change))
    assert e.value.reason in {"bad_field", "unknown_version", "unsupported_dtype"}


def test_salvage_drops_fields_a_verdict_could_not_carry() -> None:
    ident = salvage_header(header_and_buffers(seq=2**70, product="flange\n", truth={"a": {"b": {"c": {"d": {}}}}}))
    assert "seq" not in ident and "product" not in ident and "truth" not in ident
    assert ident["part_id"] == "p-1"


def test_size_caps_follow_max_points() -> None:
    from sensors.wire import MAX_HEADER_BYTES, max_message_bytes, max_part_bytes

    assert max_part_bytes(1000) == MAX_HEADER_BYTES
    assert max_part_bytes(1_000_000) == 12_000_000
    assert max_message_bytes(1_000_000) == 16_000_000 + MAX_HEADER_BYTES
