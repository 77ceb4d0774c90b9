"""The daemon's side of the shared-memory hand-over to the scoring actors on its own node.

``ActorPool`` hands a call to such an actor here instead of through a Ray task call
(``workers.handover`` has the format and why; docs/design/daemon-path.md the measurements):
the call's frames are copied once into one of the actor's frame slots (a file in ``/dev/shm``,
in a folder only this user can open), a small JSON request goes to the actor's ``serve`` loop
over a ZeroMQ Unix socket, the actor writes the maps into one of its map slots, and a receiver
thread turns each reply into the call's result, completing the call's future as a Ray call's
would. The maps are views on the map slot, published from there without a copy: the map slot
is free again once the last of them is dropped (``weakref.finalize``).

Bounded, and allocated once: an actor has ``slots`` frame slots (its calls in flight), each for
the largest call the config admits, and the map slots are shared: two per frame in flight to
start with (a call's maps wait for the emitter while the actor scores its next call), more while
maps wait to be published, up to a cap. Every slot is written once when it is made, so no frame
pays for the kernel finding pages. ``submit`` answers None when no slot is free or the actor's
loop is not listening, and the pool then uses the Ray call. Which actor died is the pool's to
learn (its ``serve`` call fails); ``fail_actor`` then fails that actor's calls here.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from sensors.frame import Frame
from workers.handover import ScoringError, Slot, layout, map_bytes, read_reply, write_frames

log = logging.getLogger("inspectd.handover")

SHM_ROOT = "/dev/shm"
"""Where slot files and sockets live: a RAM file system on Linux."""


def remove_stale(root: str = SHM_ROOT) -> list[Path]:
    """Remove the folders a daemon killed before its clean-up left in ``root`` (their slot
    files hold RAM until removed): ours, named after a process that no longer runs."""
    removed = []
    for folder in Path(root).glob("inspectd-*-*"):
        pid = folder.name.split("-")[1]
        if not pid.isdigit() or folder.stat().st_uid != os.getuid() or Path(f"/proc/{pid}").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@dataclass
class Pending:
    """A call handed over and not yet answered."""

    actor: int
    maps: list[int]
    """Its frames' map slots."""
    frames: list[dict[str, Any]]
    future: Future


class SharedMemoryLane:
    """Per actor: a PUSH socket the actor's ``serve`` loop pulls requests from and ``slots``
    frame slots of ``frame_slot_bytes``; for every actor: map slots of ``map_slot_bytes`` (as
    many as frames in flight, twice over, to start with; more while maps wait to be published,
    up to ``max_map_slots``), one PULL socket and a thread for the replies."""

    def __init__(self, actors: int, slots: int, frame_slot_bytes: int, map_slot_bytes: int, frames_per_call: int,
                 max_map_slots: int, root: str = SHM_ROOT) -> None:
        remove_stale(root)
        self.dir = Path(tempfile.mkdtemp(prefix=f"inspectd-{os.getpid()}-", dir=root))  # mode 0700
        self._ctx = zmq.Context()
        self._requests: list[zmq.Socket] = []
        self._replies = self._ctx.socket(zmq.PULL)
        self._map_slot_bytes = map_slot_bytes
        self._max_map_slots = max(max_map_slots, 1)
        self._map_slots: list[Slot] = []
        self._maps_free: set[int] = set()
        """Map slots the daemon holds no map of (a map is held until it is published and dropped)."""
        self._lock = threading.RLock()  # a map's finalizer may run in any thread, this one included
        try:
            for i in range(actors):
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                self._requests.append(sock)
                sock.bind(self.request_endpoint(i))
            self._replies.setsockopt(zmq.LINGER, 0)
            self._replies.bind(self.reply_endpoint)
            self._frame_slots = {(i, k): Slot(self.dir / f"frames-{i}-{k}", frame_slot_bytes)
                                 for i in range(actors) for k in range(slots)}
            for _ in range(min(2 * actors * slots * frames_per_call, self._max_map_slots)):
                self._new_map_slot()
        except BaseException:  # e.g. /dev/shm too small for the slots: leave nothing behind
            self._close_sockets()
            raise
        self._free = [set(range(slots)) for _ in range(actors)]
        self._holds: dict[int, tuple[int, int]] = {}
        """Call id → the (actor, frame slot) it holds until ``release``."""
        self._pending: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="handover-replies", daemon=True)
        self._thread.start()

    def _new_map_slot(self) -> None:
        j = len(self._map_slots)
        self._map_slots.append(Slot(self.dir / f"map-{j}", self._map_slot_bytes))
        self._maps_free.add(j)

    def request_endpoint(self, actor: int) -> str:
        return f"ipc://{self.dir}/actor-{actor}.sock"

    @property
    def reply_endpoint(self) -> str:
        return f"ipc://{self.dir}/replies.sock"

    def submit(self, actor: int, frames: list[Frame]) -> tuple[int, Future] | None:
        """Hand ``frames`` to ``actor``: the call's id and the future of its results (a list as
        ``ScoringWorker.score_batch`` returns, each map a view on its map slot), or None when it
        cannot be handed over now (no free slot, or the actor's loop is not listening)."""
        if not self._free[actor] or any(map_bytes(f.n_points) > self._map_slot_bytes for f in frames):
            return None
        with self._lock:
            while len(self._maps_free) < len(frames) and len(self._map_slots) < self._max_map_slots:
                try:
                    self._new_map_slot()
                except OSError as e:  # /dev/shm is full: make do with the slots there are
                    log.warning("no room for another map slot (%s); %d kept", e, len(self._map_slots))
                    self._max_map_slots = len(self._map_slots)
            if len(self._maps_free) < len(frames):
                return None
            maps = sorted(self._maps_free)[:len(frames)]
            self._maps_free.difference_update(maps)
        k = min(self._free[actor])
        slot = self._frame_slots[(actor, k)]
        descs, need = layout(frames, [f"map-{j}" for j in maps])
        if need > slot.size:
            with self._lock:
                self._maps_free.update(maps)
            return None
        write_frames(slot.array, frames, descs)
        call = next(self._ids)
        future: Future = Future()
        request = {"call": call, "frame_slot": f"frames-{actor}-{k}", "frames": descs}
        with self._lock:
            self._pending[call] = Pending(actor, maps, descs, future)
        try:
            self._requests[actor].send(json.dumps(request).encode(), zmq.NOBLOCK)
        except zmq.Again:  # its loop is not connected (starting, restarting)
            with self._lock:
                del self._pending[call]
                self._maps_free.update(maps)
            return None
        self._free[actor].discard(k)
        self._holds[call] = (actor, k)
        return call, future

    def _hand_out(self, pending: Pending, results: list[Any]) -> None:
        """Each map slot is free again once the map read from it is dropped (at once for a
        frame that has no map)."""
        for j, r in zip(pending.maps, results, strict=True):
            amap = r.get("anomaly_map") if isinstance(r, dict) else None
            if amap is None:
                self._maps_free.add(j)
            else:
                weakref.finalize(amap, self._map_dropped, j)

    def _map_dropped(self, j: int) -> None:
        with self._lock:
            self._maps_free.add(j)

    def release(self, call: int) -> None:
        """The call's result was taken, or given up: its frame slot serves the next call (its
        map slots, once their maps are dropped)."""
        with self._lock:
            pending = self._pending.pop(call, None)
            if pending is not None:  # never answered: no map was read
                self._maps_free.update(pending.maps)
            held = self._holds.pop(call, None)
            if held is not None:
                self._free[held[0]].add(held[1])

    def fail_actor(self, actor: int, error: BaseException) -> None:
        """Fail every call in flight on ``actor`` (it died) with ``error``."""
        with self._lock:
            calls = [(c, p) for c, p in self._pending.items() if p.actor == actor]
            for c, p in calls:
                del self._pending[c]
                self._maps_free.update(p.maps)
        for _, p in calls:
            p.future.set_exception(error)

    def _receive(self) -> None:
        while not self._closing.is_set():
            if self._replies.poll(200):
                call_id, reply = self._replies.recv_multipart()
                self._answer(int(call_id), reply)

    def _answer(self, call: int, reply: bytes) -> None:
        """Complete a call's future with its results (in a method of its own, so that no local
        of the receiver's loop holds the last call's maps: their slot is free when they are dropped)."""
        with self._lock:
            pending = self._pending.pop(call, None)
        if pending is None:  # given up (deadline, death) before the actor answered
            return
        try:
            results = read_reply([self._map_slots[j].array for j in pending.maps], pending.frames, reply)
        except Exception as e:  # a reply this daemon cannot read fails its call, not the lane
            log.error("cannot read a reply of actor %d: %s", pending.actor, e)
            with self._lock:
                self._maps_free.update(pending.maps)
            pending.future.set_exception(ScoringError(f"unreadable reply: {type(e).__name__}: {e}"))
            return
        with self._lock:
            self._hand_out(pending, results)
        pending.future.set_result(results)

    def close(self) -> None:
        """Ask every listening actor loop to return, stop the receiver, close the sockets and
        remove the folder with its slot files."""
        for sock in self._requests:
            try:
                sock.send(b'{"stop": true}', zmq.NOBLOCK)
            except zmq.Again:  # no loop listening
                pass
        self._closing.set()
        self._thread.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        """Close the sockets and remove the folder (the mappings stay valid until dropped)."""
        for sock in [*self._requests, self._replies]:
            sock.close(0)
        self._ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)
