"""The shared-memory hand-over between the daemon and a scoring actor on its machine.

A Ray task call costs 2–4 ms on the 2-core VM before any work: the object store put, the
hand-over to the actor and the reply (docs/design/daemon-path.md, "The shared-memory
hand-over"). For an actor on the daemon's own node the daemon instead writes a call's frames
into a memory-mapped file of its own (a *slot*, in ``/dev/shm``), sends the actor a small JSON
request over a ZeroMQ Unix socket, and the actor writes each frame's anomaly map back into the
same slot and answers with a small JSON reply. Both sides read the arrays in place.

This module is the format both sides share: where a call's arrays sit in a slot
(:func:`layout`, :func:`write_frames`, :func:`read_frames`), how a reply travels
(:func:`write_reply`, :func:`read_reply`), and the mapped files (:class:`Slot`).
Nothing is pickled: requests and replies are JSON, arrays are raw little-endian buffers.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sensors.frame import Frame, FrameError, FrameMeta

ALIGN = 64
"""Every array starts on a cache line."""


class ScoringError(RuntimeError):
    """An exception an actor raised while scoring a frame, as the daemon sees it (its type name
    and message travel; the exception object does not)."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _arrays(frame: Frame) -> list[tuple[str, np.ndarray]]:
    """What of a frame travels: the points, the colours if any, and the valid mask the daemon
    computed at decode (the ground-truth mask never decides and stays behind)."""
    out = [("points", frame.points)]
    if frame.rgb is not None:
        out.append(("rgb", frame.rgb))
    out.append(("valid", frame.valid_mask()))
    return out


def layout(frames: list[Frame]) -> tuple[list[dict[str, Any]], int]:
    """Each frame's descriptor (its meta and where its arrays and its map go) and the slot size
    the call needs. The map region holds one float32 per pixel / point."""
    descs, offset = [], 0
    for frame in frames:
        buffers = []
        for name, a in _arrays(frame):
            buffers.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
            offset += _aligned(a.nbytes)
        lead = list(frame.points.shape[:-1])
        descs.append({"meta": asdict(frame.meta), "buffers": buffers,
                      "map": {"dtype": "<f4", "shape": lead, "offset": offset}})
        offset += _aligned(4 * frame.n_points)
    return descs, offset


def _view(buf: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    count = int(np.prod(spec["shape"], dtype=np.int64))
    return buf[spec["offset"]:spec["offset"] + count * dtype.itemsize].view(dtype).reshape(spec["shape"])


def write_frames(buf: np.ndarray, frames: list[Frame], descs: list[dict[str, Any]]) -> None:
    """Copy each frame's arrays into ``buf`` (the slot, uint8) where ``descs`` place them."""
    for frame, desc in zip(frames, descs, strict=True):
        for (_, a), spec in zip(_arrays(frame), desc["buffers"], strict=True):
            np.copyto(_view(buf, spec), a, casting="no")


def read_frames(buf: np.ndarray, descs: list[dict[str, Any]]) -> tuple[list[Frame], list[np.ndarray]]:
    """The frames of a request, their arrays read-only views on ``buf`` (no copy), and the
    writable views where their anomaly maps go."""
    frames, maps = [], []
    for desc in descs:
        arrays = {}
        for spec in desc["buffers"]:
            a = _view(buf, spec)
            a.flags.writeable = False
            arrays[spec["name"]] = a
        frames.append(Frame(points=arrays["points"], meta=FrameMeta(**desc["meta"]), rgb=arrays.get("rgb"),
                            _valid=arrays["valid"]))
        maps.append(_view(buf, desc["map"]))
    return frames, maps


def _plain(value: Any) -> Any:
    """``json.dumps``'s fallback for numpy values in a reply."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_reply(buf: np.ndarray, descs: list[dict[str, Any]], results: list[dict[str, Any] | BaseException]) -> bytes:
    """A call's reply: each frame's anomaly map in its map region of ``buf`` (copied there unless
    the scorer wrote it there, see :func:`read_frames`), and the JSON of everything else (an exception as its type, message and, for a ``FrameError``, its
    reason)."""
    out: list[dict[str, Any]] = []
    for desc, r in zip(descs, results, strict=True):
        if isinstance(r, BaseException):
            error = {"type": type(r).__name__, "message": str(r)[:2000]}
            if isinstance(r, FrameError):
                error.update(reason=r.reason, detail=r.detail)
            out.append({"error": error})
            continue
        r = dict(r)
        amap = r.pop("anomaly_map", None)
        if amap is not None:
            target = _view(buf, desc["map"])
            if amap.shape != target.shape:
                raise ValueError(f"anomaly map of shape {amap.shape} for a frame of {target.shape}")
            if amap.ctypes.data != target.ctypes.data:
                np.copyto(target, amap, casting="same_kind")
        r["map"] = amap is not None
        out.append(r)
    return json.dumps(out, default=_plain).encode()


def read_reply(buf: np.ndarray, descs: list[dict[str, Any]], reply: bytes) -> list[dict[str, Any] | BaseException]:
    """The results :func:`write_reply` sent: dicts with their ``anomaly_map`` copied out of the
    slot (the slot serves the actor's next call while the map waits to be published), or the
    exceptions (``FrameError`` kept as such, anything else a :class:`ScoringError`)."""
    out: list[dict[str, Any] | BaseException] = []
    for desc, r in zip(descs, json.loads(reply), strict=True):
        if "error" in r:
            e = r["error"]
            out.append(FrameError(e["reason"], e["detail"]) if "reason" in e
                       else ScoringError(f"{e['type']}: {e['message']}"))
            continue
        r["anomaly_map"] = _view(buf, desc["map"]).copy() if r.pop("map") else None
        out.append(r)
    return out


class Slot:
    """One memory-mapped file in a private folder: the daemon creates it (``create=True``) at
    the size a call needs, the actor maps the same file. ``array`` is the whole mapping as
    uint8. The daemon grows a slot by creating a new file (a new ``path``), so a mapping never
    changes size under a reader."""

    def __init__(self, path: str | Path, size: int, create: bool = False) -> None:
        self.path = str(path)
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def unlink(self) -> None:
        """Remove the file; the mapping stays valid until it is dropped."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
