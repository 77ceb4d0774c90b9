"""The inspectd wire codec: frames in, verdicts out, as documented bytes (docs/protocol.md).

Every message is a ZeroMQ multipart message. Frames (sensor → daemon, PUSH → PULL):

    part 0   header: UTF-8 JSON object (``"protocol": 1, "type": "frame"``, metadata, and
             ``"buffers"``, the list of the raw buffers that follow: name, dtype, shape)
    part 1.. one raw buffer per entry of ``buffers``, little-endian, C order, no padding

Verdicts (daemon → subscribers, PUB → SUB):

    part 0   topic: ASCII ``verdict/<product>/`` (``verdict/_unknown/`` when the frame had no
             readable product); subscribe to ``verdict/`` for all products
    part 1   header: UTF-8 JSON object (``"type": "verdict"``)
    part 2   the anomaly map as raw little-endian float32, present when ``header["map"]`` is not null

Decoding makes no copies: arrays are read-only views on the received ZeroMQ buffers.
Nothing is pickled; a malformed message raises ``FrameError`` with a stable ``reason``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sensors.frame import PRODUCT_NAME, Frame, FrameError, FrameMeta

PROTOCOL_VERSION = 1
#: Frame protocol versions the daemon accepts: 2 adds acknowledgement, resend and dedupe.
FRAME_PROTOCOLS = (1, 2)
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}
BUFFER_NAMES = ("points", "rgb", "gt")
DEFAULT_MAX_POINTS = 500_000
MAX_HEADER_BYTES = 16_384
"""Part 0 of a frame (and of a verdict's header) may not be longer than this."""
MAX_SEQ = 2**63 - 1
MAX_ID_CHARS = 256
"""Longest ``sensor_id``, ``part_id`` and ``units`` accepted."""
MAX_TRUTH_DEPTH = 4
BYTES_PER_POINT = 16
"""The most bytes one point costs on the wire: float32 XYZ (12), rgb (3), gt (1)."""

#: Every reason a frame can be refused with, in the order the decoder checks them.
REFUSAL_REASONS = (
    "message_too_large",
    "header_too_large",
    "header_not_json",
    "unknown_version",
    "wrong_type",
    "missing_field",
    "bad_field",
    "buffer_count_mismatch",
    "unsupported_dtype",
    "bad_shape",
    "too_many_points",
    "buffer_size_mismatch",
    "no_finite_points",
)

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "sensor_id": str,
    "product": str,
    "part_id": str,
    "seq": int,
    "capture_time": (int, float),
    "buffers": list,
}


def max_message_bytes(max_points: int) -> int:
    """The largest frame message, all parts together, that ``max_points`` allows."""
    return max_points * BYTES_PER_POINT + MAX_HEADER_BYTES


def max_part_bytes(max_points: int) -> int:
    """The largest single part of a frame message (the points buffer): ZeroMQ's ``MAXMSGSIZE``."""
    return max(max_points * 12, MAX_HEADER_BYTES)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (1 for a scalar)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _buffer_view(part: Any) -> memoryview:
    """A memoryview over a zmq.Frame, bytes, or any buffer-protocol object, without copying."""
    buf = getattr(part, "buffer", part)
    return memoryview(buf).cast("B")


def encode_frame(frame: Frame) -> list[bytes | memoryview]:
    """A frame as the parts of one multipart message (header first, then raw buffers)."""
    m = frame.meta
    arrays: list[tuple[str, np.ndarray]] = [("points", frame.points)]
    if frame.rgb is not None:
        arrays.append(("rgb", frame.rgb))
    if frame.gt_mask is not None:
        arrays.append(("gt", frame.gt_mask))
    header: dict[str, Any] = {
        "protocol": m.protocol,
        "type": "frame",
        "sensor_id": m.sensor_id,
        "product": m.product,
        "part_id": m.part_id,
        "seq": int(m.seq),
        "capture_time": float(m.capture_time),
        "units": m.units,
        "layout": frame.layout,
        "buffers": [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape)} for n, a in arrays],
    }
    if m.truth is not None:
        header["truth"] = m.truth
    parts: list[bytes | memoryview] = [json.dumps(header, separators=(",", ":")).encode()]
    for _, a in arrays:
        le = a.astype(a.dtype.newbyteorder("<"), copy=False)
        parts.append(memoryview(np.ascontiguousarray(le)).cast("B"))
    return parts


def parse_header(part: Any) -> dict[str, Any]:
    """Part 0 as a JSON object, or ``FrameError`` (``header_too_large``, ``header_not_json``).

    Any failure of the JSON parser is a refusal, a ``RecursionError`` from deep nesting included."""
    view = _buffer_view(part)
    if view.nbytes > MAX_HEADER_BYTES:
        raise FrameError("header_too_large", f"part 0 has {view.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(view).decode("utf-8"))
    except (RecursionError, MemoryError, UnicodeDecodeError, ValueError) as e:
        raise FrameError("header_not_json", f"part 0 is not UTF-8 JSON: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(header, dict):
        raise FrameError("header_not_json", "part 0 is JSON but not an object")
    return header


def decode_frame(parts: Sequence[Any], max_points: int = DEFAULT_MAX_POINTS) -> Frame:
    """Validate and decode one frame message. Raises ``FrameError`` with the refusal reason."""
    if not parts:
        raise FrameError("header_not_json", "empty message")
    total = sum(_buffer_view(p).nbytes for p in parts)
    if total > max_message_bytes(max_points):
        raise FrameError("message_too_large", f"{total} bytes, limit {max_message_bytes(max_points)}")
    header = parse_header(parts[0])
    version = header.get("protocol")
    if type(version) is not int or version not in FRAME_PROTOCOLS:
        raise FrameError("unknown_version", f"protocol {version!r}, this daemon speaks {FRAME_PROTOCOLS}")
    if header.get("type", "frame") != "frame":
        raise FrameError("wrong_type", f"type {header.get('type')!r}, expected 'frame'")
    for key, typ in _REQUIRED.items():
        if key not in header:
            raise FrameError("missing_field", f"header has no {key!r}")
        value = header[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise FrameError("bad_field", f"{key!r} has type {type(value).__name__}")
    if not PRODUCT_NAME.fullmatch(header["product"]):
        raise FrameError("bad_field", f"product {header['product']!r} must match {PRODUCT_NAME.pattern}")
    if not 0 <= header["seq"] <= MAX_SEQ:
        raise FrameError("bad_field", f"seq must be within 0..{MAX_SEQ}")
    if not math.isfinite(header["capture_time"]):
        raise FrameError("bad_field", "capture_time is not finite")
    units = header.get("units", "mm")
    truth = header.get("truth")
    if not isinstance(units, str) or (truth is not None and not isinstance(truth, dict)):
        raise FrameError("bad_field", "units must be a string and truth an object")
    for key in ("sensor_id", "part_id"):
        if not header[key] or len(header[key]) > MAX_ID_CHARS:
            raise FrameError("bad_field", f"{key!r} must have 1 to {MAX_ID_CHARS} characters")
    if len(units) > MAX_ID_CHARS or (truth is not None and _depth(truth) > MAX_TRUTH_DEPTH):
        raise FrameError("bad_field", f"units longer than {MAX_ID_CHARS} or truth nested deeper than {MAX_TRUTH_DEPTH}")

    specs = header["buffers"]
    if len(parts) - 1 != len(specs):
        raise FrameError("buffer_count_mismatch", f"header lists {len(specs)} buffers, message has {len(parts) - 1}")
    arrays: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
            raise FrameError("missing_field", f"buffers[{i}] needs name, dtype and shape")
        name, dtype_name, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or name not in BUFFER_NAMES or name in arrays:
            raise FrameError("bad_field", f"buffers[{i}].name {name!r} unknown or repeated; known: {BUFFER_NAMES}")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise FrameError("unsupported_dtype", f"{name}: dtype {dtype_name!r}; supported: {sorted(DTYPES)}")
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise FrameError("bad_shape", f"{name}: shape {shape!r} must be 1 to 3 non-negative integers")
        if name == "points":
            if not ((len(shape) == 3 and shape[2] == 3) or (len(shape) == 2 and shape[1] == 3)):
                raise FrameError("bad_shape", f"points: shape {shape} must be [H, W, 3] or [N, 3]")
            if math.prod(shape[:-1]) > max_points:
                raise FrameError("too_many_points", f"{math.prod(shape[:-1])} points, limit {max_points}")
        dtype = DTYPES[dtype_name]
        view = _buffer_view(parts[i + 1])
        expected = math.prod(shape) * dtype.itemsize
        if view.nbytes != expected:
            raise FrameError("buffer_size_mismatch", f"{name}: {view.nbytes} bytes, shape × dtype needs {expected}")
        arrays[name] = np.frombuffer(view, dtype=dtype).reshape(shape)
    if "points" not in arrays:
        raise FrameError("missing_field", "no 'points' buffer")
    points = arrays["points"]
    layout = header.get("layout", "organized" if points.ndim == 3 else "unorganized")
    if layout != ("organized" if points.ndim == 3 else "unorganized"):
        raise FrameError("bad_shape", f"layout {layout!r} does not match points shape {list(points.shape)}")
    meta = FrameMeta(
        sensor_id=header["sensor_id"],
        product=header["product"],
        part_id=header["part_id"],
        seq=header["seq"],
        capture_time=float(header["capture_time"]),
        units=units,
        truth=truth,
        protocol=int(version),
    )
    frame = Frame(points=points.astype(np.float32, copy=False), meta=meta, rgb=arrays.get("rgb"), gt_mask=arrays.get("gt"))
    if not frame.valid_mask().any():
        raise FrameError("no_finite_points", "every point is NaN or infinite")
    return frame


def salvage_header(parts: Sequence[Any]) -> dict[str, Any]:
    """Best-effort identity fields of a refused message, for its error verdict. Never raises:
    whatever cannot be salvaged is left out (a field that would make the verdict itself invalid,
    such as an out-of-range ``seq`` or a deeply nested ``truth``, included)."""
    try:
        header = parse_header(parts[0]) if parts else {}
    except Exception:  # noqa: BLE001 (a refused message's identity is optional, its verdict is not)
        return {}
    out: dict[str, Any] = {}
    for key in ("sensor_id", "part_id"):
        if isinstance(header.get(key), str):
            out[key] = header[key][:MAX_ID_CHARS]
    product = header.get("product")
    if isinstance(product, str) and PRODUCT_NAME.fullmatch(product):
        out["product"] = product
    seq = header.get("seq")
    if type(seq) is int and 0 <= seq <= MAX_SEQ:
        out["seq"] = seq
    ct = header.get("capture_time")
    if type(ct) in (int, float) and math.isfinite(ct):
        out["capture_time"] = float(ct)
    truth = header.get("truth")
    if isinstance(truth, dict) and _depth(truth) <= MAX_TRUTH_DEPTH:
        out["truth"] = truth
    return out


def verdict_topic(product: str | None) -> bytes:
    """The PUB topic of a verdict: ``verdict/<product>/``."""
    return f"verdict/{product or '_unknown'}/".encode("ascii")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def encode_verdict(header: dict[str, Any], anomaly_map: np.ndarray | None) -> list[bytes | memoryview]:
    """A verdict as [topic, header JSON, map bytes?]. Non-finite floats in the header become null."""
    h = dict(header)
    h.setdefault("protocol", PROTOCOL_VERSION)  # the frame's version (a protocol-2 frame: 2)
    h["type"] = "verdict"
    parts: list[bytes | memoryview] = [verdict_topic(h.get("product"))]
    if anomaly_map is not None:
        amap = np.ascontiguousarray(anomaly_map, dtype="<f4")
        h["map"] = {"dtype": "float32", "shape": list(amap.shape)}
        parts.append(json.dumps(_json_safe(h), separators=(",", ":"), allow_nan=False).encode())
        parts.append(memoryview(amap).cast("B"))
    else:
        h["map"] = None
        parts.append(json.dumps(_json_safe(h), separators=(",", ":"), allow_nan=False).encode())
    return parts


@dataclass
class VerdictMessage:
    topic: str
    header: dict[str, Any]
    anomaly_map: np.ndarray | None


def decode_verdict(parts: Sequence[Any]) -> VerdictMessage:
    """Decode a verdict message (for subscribers: the demo, tests, client libraries)."""
    if len(parts) < 2:
        raise FrameError("buffer_count_mismatch", f"a verdict has 2 or 3 parts, got {len(parts)}")
    topic = bytes(_buffer_view(parts[0])).decode("ascii")
    header = parse_header(parts[1])
    spec = header.get("map")
    amap = None
    if spec is not None:
        if len(parts) != 3:
            raise FrameError("buffer_count_mismatch", "header announces a map but the message has no part 2")
        amap = np.frombuffer(_buffer_view(parts[2]), dtype="<f4").reshape(spec["shape"])
    return VerdictMessage(topic, header, amap)


def ack_topic(sensor_id: str) -> bytes:
    """The PUB topic of a protocol-2 sensor's acknowledgements: ``ack/<sensor_id>/``."""
    return f"ack/{sensor_id}/".encode()


def encode_ack(sensor_id: str, seq: int, part_id: Any, verdict_id: int, verdict: str) -> list[bytes]:
    """An acknowledgement: the frame ``(sensor_id, seq)`` has its verdict committed to the result log."""
    body = {"protocol": 2, "type": "ack", "sensor_id": sensor_id, "seq": seq, "part_id": part_id,
            "verdict_id": verdict_id, "verdict": verdict}
    return [ack_topic(sensor_id), json.dumps(body, separators=(",", ":")).encode()]


def decode_ack(parts: Sequence[Any]) -> dict[str, Any]:
    """An acknowledgement's JSON body (``FrameError`` if the message is not one)."""
    if len(parts) != 2:
        raise FrameError("buffer_count_mismatch", f"an ack has 2 parts, got {len(parts)}")
    body = parse_header(parts[1])
    if body.get("type") != "ack" or not isinstance(body.get("seq"), int):
        raise FrameError("wrong_type", "not an acknowledgement")
    return body
