"""The shared-memory hand-over between the daemon and a scoring actor on its machine.

A Ray task call costs 2–4 ms on the 2-core VM before any work: the object store put, the
hand-over to the actor and the reply (docs/design/daemon-path.md, "The shared-memory
hand-over"). For an actor on the daemon's own node the daemon instead writes a call's frames
into a memory-mapped file of its own (a *slot*, in ``/dev/shm``), sends the actor a small JSON
request over a ZeroMQ Unix socket, and the actor writes each frame's anomaly map back into the
same slot and answers with a small JSON reply. Both sides read the arrays in place.

A call uses a frame slot, free again once its result is in, and a map slot per frame, which the
daemon publishes the map from in place, free again once the map is dropped. Slots have fixed
sizes (for the largest call the config admits) and are written once at start, so no frame
waits for the kernel to find pages. This module is the format both sides share: where a call's
arrays sit in its slots
(:func:`layout`, :func:`write_frames`, :func:`read_frames`), how a reply travels
(:func:`write_reply`, :func:`read_reply`), and the mapped files (:class:`Slot`).
Nothing is pickled: requests and replies are JSON, arrays are raw little-endian buffers.
"""

from __future__ import annotations

import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sensors.frame import Frame, FrameError, FrameMeta

ALIGN = 64
"""Every array starts on a cache line."""
SPLIT_COPY_BYTES = 8 * 2**20
"""An array above this is copied by two threads: a 27.6 MB frame took 1.9 ms on one and 1.05 ms
on two on the 2-core VM (numpy releases the GIL while it copies; memory bandwidth is the bound)."""
_helper = ThreadPoolExecutor(1, thread_name_prefix="handover-copy")


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


def frame_bytes(n_points: int, rgb: bool = True) -> int:
    """Frame-slot bytes one frame of ``n_points`` takes at most: points, colours, valid mask."""
    return _aligned(12 * n_points) + (_aligned(3 * n_points) if rgb else 0) + _aligned(n_points)


def map_bytes(n_points: int) -> int:
    """Map-slot bytes of a frame of ``n_points``: one float32 per pixel / point."""
    return _aligned(4 * n_points)


def layout(frames: list[Frame], map_slots: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Each frame's descriptor (its meta, where its arrays go in the frame slot, and its map
    slot, named in ``map_slots``) and the frame-slot bytes the call needs."""
    descs, offset = [], 0
    for frame, slot in zip(frames, map_slots, strict=True):
        buffers = []
        for name, a in _arrays(frame):
            buffers.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
            offset += _aligned(a.nbytes)
        lead = list(frame.points.shape[:-1])
        descs.append({"meta": asdict(frame.meta), "buffers": buffers,
                      "map": {"slot": slot, "dtype": "<f4", "shape": lead, "offset": 0}})
    return descs, offset


def _view(buf: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    count = int(np.prod(spec["shape"], dtype=np.int64))
    return buf[spec["offset"]:spec["offset"] + count * dtype.itemsize].view(dtype).reshape(spec["shape"])


def copy_into(target: np.ndarray, source: np.ndarray) -> None:
    """``np.copyto`` (same dtype), a large array in two halves on two threads (``SPLIT_COPY_BYTES``)."""
    if source.nbytes <= SPLIT_COPY_BYTES or len(source) < 2:
        np.copyto(target, source, casting="no")
        return
    half = len(source) // 2
    other = _helper.submit(np.copyto, target[half:], source[half:], casting="no")
    np.copyto(target[:half], source[:half], casting="no")
    other.result()


def write_frames(buf: np.ndarray, frames: list[Frame], descs: list[dict[str, Any]]) -> None:
    """Copy each frame's arrays into ``buf`` (the frame slot, uint8) where ``descs`` place them."""
    for frame, desc in zip(frames, descs, strict=True):
        for (_, a), spec in zip(_arrays(frame), desc["buffers"], strict=True):
            copy_into(_view(buf, spec), a)


def read_frames(
    buf: np.ndarray, map_bufs: list[np.ndarray], descs: list[dict[str, Any]]
) -> tuple[list[Frame], list[np.ndarray]]:
    """The frames of a request, their arrays read-only views on ``buf`` (the frame slot, no
    copy), and the writable views on ``map_bufs`` (each frame's map slot) where their maps go."""
    frames, maps = [], []
    for desc, map_buf in zip(descs, map_bufs, strict=True):
        arrays = {}
        for spec in desc["buffers"]:
            a = _view(buf, spec)
            a.flags.writeable = False
            arrays[spec["name"]] = a
        frames.append(Frame(points=arrays["points"], meta=FrameMeta(**desc["meta"]), rgb=arrays.get("rgb"),
                            _valid=arrays["valid"]))
        maps.append(_view(map_buf, desc["map"]))
    return frames, maps


def _plain(value: Any) -> Any:
    """``json.dumps``'s fallback for numpy values in a reply."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_reply(
    map_bufs: list[np.ndarray | None], descs: list[dict[str, Any]], results: list[dict[str, Any] | BaseException]
) -> bytes:
    """A call's reply: each frame's anomaly map in its map slot (copied there unless the scorer
    wrote it there, see :func:`read_frames`), and the JSON of everything else (an exception as
    its type, message and, for a ``FrameError``, its reason)."""
    out: list[dict[str, Any]] = []
    for desc, map_buf, r in zip(descs, map_bufs, results, strict=True):
        if isinstance(r, BaseException):
            error = {"type": type(r).__name__, "message": str(r)[:2000]}
            if isinstance(r, FrameError):
                error.update(reason=r.reason, detail=r.detail)
            out.append({"error": error})
            continue
        r = dict(r)
        amap = r.pop("anomaly_map", None)
        if amap is not None:
            if map_buf is None:
                raise ValueError("an anomaly map with no map slot to write it to")
            target = _view(map_buf, desc["map"])
            if amap.shape != target.shape:
                raise ValueError(f"anomaly map of shape {amap.shape} for a frame of {target.shape}")
            if amap.ctypes.data != target.ctypes.data:
                np.copyto(target, amap, casting="same_kind")
        r["map"] = amap is not None
        out.append(r)
    return json.dumps(out, default=_plain).encode()


def read_reply(
    map_bufs: list[np.ndarray | None], descs: list[dict[str, Any]], reply: bytes
) -> list[dict[str, Any] | BaseException]:
    """The results :func:`write_reply` sent: dicts with their ``anomaly_map`` a view on its map
    slot (no copy), or the exceptions (``FrameError`` kept as such, anything else a
    :class:`ScoringError`)."""
    out: list[dict[str, Any] | BaseException] = []
    for desc, map_buf, r in zip(descs, map_bufs, json.loads(reply), strict=True):
        if "error" in r:
            e = r["error"]
            out.append(FrameError(e["reason"], e["detail"]) if "reason" in e
                       else ScoringError(f"{e['type']}: {e['message']}"))
            continue
        has_map = r.pop("map")
        if has_map and map_buf is None:
            raise ValueError("an anomaly map with no map slot to read it from")
        r["anomaly_map"] = _view(map_buf, desc["map"]) if has_map else None
        out.append(r)
    return out


PAGE = mmap.PAGESIZE


class Slot:
    """One memory-mapped file in a private folder: the daemon creates it (``size``) and writes
    every page of it once, so the file system holds its pages from then on; the actor maps the
    same file (``size`` None: the file's) and reads a byte of every page, so its page table
    holds them too. ``array`` is the whole mapping as uint8."""

    def __init__(self, path: str | Path, size: int | None = None) -> None:
        self.path = str(path)
        create = size is not None
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:  # its pages now: a full /dev/shm fails here (OSError), not later (SIGBUS)
                os.posix_fallocate(fd, 0, size)
            self.size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._map, dtype=np.uint8)
        if create:
            self.array[::PAGE] = 0
        else:
            int(self.array[::PAGE].sum())

    def unlink(self) -> None:
        """Remove the file; the mapping stays valid until it is dropped."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
