"""A seeded, structure-aware mutator of frame messages, for the fuzz test.

Each message starts from a valid encoded frame (a small organized or unorganized cloud) and gets
one or more mutations: a header field replaced by a hostile value or deleted, a buffer spec
broken, header bytes flipped, inserted or cut, buffer parts truncated, extended, dropped, added
or filled with NaN, a deeply nested JSON value; or the message is random bytes altogether.
Messages that keep a readable header carry ``part_id`` ``fz-<i>``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import numpy as np

from sensors.wire import encode_frame

from malformed import make_frame

HOSTILE_VALUES: list[object] = [
    None, True, False, 0, -1, 1, 2**63 - 1, 2**63, 2**64, -(2**63), 1e308, -1e308, 0.5, "", "x" * 300,
    "flange\n", "flange", "../..", "..", "\u0000", "\U0001f642", [], {}, [[[]]], [1, 2, 3],
    {"a": {"b": {"c": {"d": {}}}}}, {"defective": True}, "nan", "Infinity",
]
SHAPES: list[object] = [[], [0, 3], [-1, 3], [6, 5, 3], [30, 3], [5, 6, 3], [2**40, 3], [True, 3], [1.5, 3],
                        [6, 5, 3, 1], "6,5,3", None, [[6], 5, 3]]
DTYPES: list[object] = ["float32", "uint8", "float64", "<f4", "", None, 7, ["float32"]]
NAMES: list[object] = ["points", "rgb", "gt", "normals", "", None, ["points"], {"n": 1}]


def base_messages(capture_time: float) -> list[tuple[dict, list[bytes]]]:
    """Valid frames to mutate: (header, buffer parts), organized and not, with and without extras."""
    out = []
    for organized in (True, False):
        for extras in (True, False):
            parts = [bytes(p) for p in encode_frame(make_frame(organized, extras))]
            header = json.loads(parts[0])
            header["capture_time"] = capture_time
            out.append((header, parts[1:]))
    return out


def _nested(rng: random.Random) -> bytes:
    depth = rng.choice([50, 999, 1000, 5000])
    return b'{"truth":' + b"[" * depth + b"]" * depth + b"}"


def _mutate_header(h: dict, rng: random.Random) -> None:
    op = rng.randrange(5)
    keys = list(h) + ["extra", "protocol", "type", "layout", "units", "truth"]
    if op == 0:
        h[rng.choice(keys)] = rng.choice(HOSTILE_VALUES)
    elif op == 1:
        h.pop(rng.choice(list(h)), None)
    elif op == 2 and isinstance(h.get("buffers"), list) and all(isinstance(b, dict) for b in h["buffers"]) \
            and h["buffers"]:
        spec = dict(rng.choice(h["buffers"]))
        field = rng.choice(["shape", "dtype", "name"])
        spec[field] = rng.choice({"shape": SHAPES, "dtype": DTYPES, "name": NAMES}[field])
        h["buffers"] = [spec if rng.random() < 0.5 else b for b in h["buffers"]]
    elif op == 3:
        doubled = h["buffers"] * 2 if isinstance(h.get("buffers"), list) else []
        h["buffers"] = rng.choice([[], "points", [None], [{}], doubled])
    else:
        h["seq"] = rng.choice([-5, 2**63, 2**100, 3.5, "7", True])


def _mutate_parts(parts: list[bytes], rng: random.Random) -> list[bytes]:
    op = rng.randrange(6)
    parts = list(parts)
    if op == 0 and parts:
        i = rng.randrange(len(parts))
        parts[i] = parts[i][: rng.randrange(len(parts[i]) + 1)]
    elif op == 1 and parts:
        i = rng.randrange(len(parts))
        parts[i] = parts[i] + rng.randbytes(rng.choice([1, 3, 4, 12, 100]))
    elif op == 2 and parts:
        parts.pop(rng.randrange(len(parts)))
    elif op == 3:
        parts.insert(rng.randrange(len(parts) + 1), rng.randbytes(rng.randrange(64)))
    elif op == 4 and parts:
        parts[0] = np.full(len(parts[0]) // 4, np.nan, np.float32).tobytes()
    else:
        parts = parts[::-1]
    return parts


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(3)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.choice([b"[", b"{", b'"', b"\\", b"\xff", b"\x00", b"}", b",", rng.randbytes(4)])
        else:
            del b[i:]
    return bytes(b)


def mutated_messages(n: int, seed: int, capture_time: float) -> Iterator[list[bytes]]:
    """``n`` mutated messages: about 85 % structure-aware, 15 % random bytes."""
    rng = random.Random(seed)
    bases = base_messages(capture_time)
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:
            yield [rng.randbytes(rng.randrange(2000)) for _ in range(rng.randint(0, 4))] or [b""]
            continue
        header, buffers = rng.choice(bases)
        h = json.loads(json.dumps(header))
        h["part_id"] = f"fz-{i}"
        for _ in range(rng.randint(1, 3)):
            _mutate_header(h, rng)
        raw = json.dumps(h).encode()
        if kind < 0.30:
            raw = _mutate_bytes(raw, rng)
        elif kind < 0.35:
            raw = _nested(rng)
        parts = list(buffers)
        if rng.random() < 0.3:
            parts = _mutate_parts(parts, rng)
        yield [raw, *parts]
