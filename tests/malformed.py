"""Malformed frame messages, one per refusal reason of the wire codec (unit and e2e tests)."""

from __future__ import annotations

import json

import numpy as np

from sensors.frame import Frame, FrameMeta
from sensors.wire import encode_frame


def make_frame(organized: bool = True, with_extras: bool = True, product: str = "flange", part_id: str = "p-1") -> Frame:
    rng = np.random.default_rng(0)
    shape = (6, 5) if organized else (30,)
    pts = rng.normal(size=(*shape, 3)).astype(np.float32)
    pts.reshape(-1, 3)[3] = np.nan
    meta = FrameMeta("cam-1", product, part_id, 7, 1700000000.5, truth={"defective": True, "defect": "dent"})
    rgb = rng.integers(0, 255, size=(*shape, 3), dtype=np.uint8) if with_extras else None
    gt = (rng.random(shape) > 0.8).astype(np.uint8) if with_extras else None
    return Frame(points=pts, meta=meta, rgb=rgb, gt_mask=gt)


def header_and_buffers(**changes) -> list[bytes]:
    part_id = changes.pop("part_id_", "p-1")
    parts = [bytes(p) for p in encode_frame(make_frame(with_extras=False, part_id=part_id))]
    header = json.loads(parts[0])
    for k, v in changes.items():
        if v is None:
            header.pop(k, None)
        else:
            header[k] = v
    return [json.dumps(header).encode(), *parts[1:]]


#: reason -> function(part_id) -> message parts
BAD_MESSAGES = {
    # three 6 MB parts: each under ZeroMQ's per-part MAXMSGSIZE at max_points >= 500 000, together over the cap
    "message_too_large": lambda pid="p-1": [header_and_buffers(part_id_=pid)[0]] + [bytes(6_000_000)] * 3,
    "header_too_large": lambda pid="p-1": header_and_buffers(part_id_=pid, padding="x" * 20_000),
    "header_not_json": lambda pid="p-1": [b"\xff\xfe not json", b""],
    "unknown_version": lambda pid="p-1": header_and_buffers(part_id_=pid, protocol=99),
    "wrong_type": lambda pid="p-1": header_and_buffers(part_id_=pid, type="verdict"),
    "missing_field": lambda pid="p-1": header_and_buffers(part_id_=pid, part_id=None),
    "bad_field": lambda pid="p-1": header_and_buffers(part_id_=pid, seq="seven"),
    "buffer_count_mismatch": lambda pid="p-1": header_and_buffers(part_id_=pid)[:1],
    "unsupported_dtype": lambda pid="p-1": header_and_buffers(part_id_=pid, buffers=[{"name": "points", "dtype": "float64", "shape": [6, 5, 3]}]),
    "bad_shape": lambda pid="p-1": header_and_buffers(part_id_=pid, buffers=[{"name": "points", "dtype": "float32", "shape": [6, 5, 4]}]),
    "too_many_points": lambda pid="p-1": header_and_buffers(part_id_=pid, buffers=[{"name": "points", "dtype": "float32", "shape": [9000, 9000, 3]}]),
    "buffer_size_mismatch": lambda pid="p-1": header_and_buffers(part_id_=pid, buffers=[{"name": "points", "dtype": "float32", "shape": [6, 4, 3]}]),
    "no_finite_points": lambda pid="p-1": [header_and_buffers(part_id_=pid)[0], np.full((6, 5, 3), np.nan, np.float32).tobytes()],
}


