"""The daemon's side of the shared-memory hand-over to the scoring actors on its own node.

``ActorPool`` hands a call to such an actor here instead of through a Ray task call
(``workers.handover`` has the format and why; docs/design/daemon-path.md the measurements):
the call's frames are copied once into one of the actor's frame slots (a file in ``/dev/shm``,
in a folder only this user can open), a small JSON request goes to the actor's ``serve`` loop
over a ZeroMQ Unix socket, the actor writes the maps into one of its map slots, and a receiver
thread turns each reply into the call's result, completing the call's future as a Ray call's
would. The maps are views on the map slot, published from there without a copy: the map slot
is free again once the last of them is dropped (``weakref.finalize``).

Bounded: an actor has ``slots`` frame slots (its calls in flight) and twice as many map slots
(the maps of a call wait for the emitter while the actor scores its next call), each as large
as the largest call it has carried; ``submit`` answers None when none is free or the actor's
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
from workers.handover import ScoringError, Slot, layout, read_reply, write_frames

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
    maps: Slot
    map_index: int
    frames: list[dict[str, Any]]
    future: Future


class SharedMemoryLane:
    """Per actor: a PUSH socket the actor's ``serve`` loop pulls requests from, ``slots`` frame
    slots and twice as many map slots; one PULL socket and thread for every actor's replies."""

    def __init__(self, actors: int, slots: int, root: str = SHM_ROOT) -> None:
        remove_stale(root)
        self.dir = Path(tempfile.mkdtemp(prefix=f"inspectd-{os.getpid()}-", dir=root))  # mode 0700
        self._ctx = zmq.Context()
        self._requests = []
        for i in range(actors):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self.request_endpoint(i))
            self._requests.append(sock)
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(self.reply_endpoint)
        self._files: dict[str, Slot] = {}
        """Each slot's current file, by name (``actor-<i>-frames-<k>``, ``actor-<i>-maps-<j>``)."""
        self._free = [set(range(slots)) for _ in range(actors)]
        self._maps_free = [set(range(2 * slots)) for _ in range(actors)]
        """Map slots not read by the daemon: a map slot is busy until the maps the daemon was
        given on it are all dropped (published), which may be after the call's next one."""
        self._holds: dict[int, tuple[int, int]] = {}
        """Call id → the (actor, frame slot) it holds until ``release``."""
        self._map_holds: dict[int, tuple[int, int]] = {}
        """Call id → the (actor, map slot) it holds until its maps are read (or it is given up)."""
        self._pending: dict[int, Pending] = {}
        self._lock = threading.RLock()  # a map's finalizer may run in any thread, this one included
        self._ids = itertools.count(1)
        self._generation = itertools.count(1)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="handover-replies", daemon=True)
        self._thread.start()

    def request_endpoint(self, actor: int) -> str:
        return f"ipc://{self.dir}/actor-{actor}.sock"

    @property
    def reply_endpoint(self) -> str:
        return f"ipc://{self.dir}/replies.sock"

    def _file(self, name: str, size: int) -> Slot:
        """The slot ``name`` at ``size`` or larger (a larger one is a new file: see ``Slot``)."""
        slot = self._files.get(name)
        if slot is None or slot.size < size:
            if slot is not None:
                slot.unlink()  # mappings of the old file stay valid until dropped
            slot = self._files[name] = Slot(self.dir / f"{name}-{next(self._generation)}", size, create=True)
        return slot

    def submit(self, actor: int, frames: list[Frame]) -> tuple[int, Future] | None:
        """Hand ``frames`` to ``actor``: the call's id and the future of its results (a list as
        ``ScoringWorker.score_batch`` returns, each map a view on a map slot), or None when it
        cannot be handed over now (no free slot, or the actor's loop is not listening)."""
        with self._lock:
            if not self._free[actor] or not self._maps_free[actor]:
                return None
            k, j = min(self._free[actor]), min(self._maps_free[actor])
            self._maps_free[actor].discard(j)
        descs, frame_bytes, map_bytes = layout(frames)
        slot = self._file(f"actor-{actor}-frames-{k}", frame_bytes)
        maps = self._file(f"actor-{actor}-maps-{j}", map_bytes)
        write_frames(slot.array, frames, descs)
        call = next(self._ids)
        future: Future = Future()
        request = {"call": call, "frames": descs,
                   "frame_slot": {"name": f"frames-{k}", "path": slot.path, "size": slot.size},
                   "map_slot": {"name": f"maps-{j}", "path": maps.path, "size": maps.size}}
        with self._lock:
            self._pending[call] = Pending(actor, maps, j, descs, future)
            self._map_holds[call] = (actor, j)
        try:
            self._requests[actor].send(json.dumps(request).encode(), zmq.NOBLOCK)
        except zmq.Again:  # its loop is not connected (starting, restarting)
            with self._lock:
                del self._pending[call]
                self._free_maps(call)
            return None
        self._free[actor].discard(k)
        self._holds[call] = (actor, k)
        return call, future

    def _free_maps(self, call: int) -> None:
        held = self._map_holds.pop(call, None)
        if held is not None:
            self._maps_free[held[0]].add(held[1])

    def _hand_out(self, call: int, results: list[Any]) -> None:
        """The call's map slot is free again once every map read from it is dropped."""
        maps = [r["anomaly_map"] for r in results if isinstance(r, dict) and r.get("anomaly_map") is not None]
        if not maps:
            self._free_maps(call)
            return
        left = [len(maps)]

        def dropped() -> None:
            with self._lock:
                left[0] -= 1
                if left[0] == 0:
                    self._free_maps(call)

        for m in maps:
            weakref.finalize(m, dropped)

    def release(self, call: int) -> None:
        """The call's result was taken, or given up: its frame slot serves the next call (its
        map slot, once its maps are dropped)."""
        with self._lock:
            if self._pending.pop(call, None) is not None:  # never answered: no map was read
                self._free_maps(call)
            held = self._holds.pop(call, None)
            if held is not None:
                self._free[held[0]].add(held[1])

    def fail_actor(self, actor: int, error: BaseException) -> None:
        """Fail every call in flight on ``actor`` (it died) with ``error``."""
        with self._lock:
            calls = [(c, p) for c, p in self._pending.items() if p.actor == actor]
            for c, _ in calls:
                del self._pending[c]
                self._free_maps(c)
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
            results = read_reply(pending.maps.array, pending.frames, reply)
        except Exception as e:  # a reply this daemon cannot read fails its call, not the lane
            log.error("cannot read a reply of actor %d: %s", pending.actor, e)
            with self._lock:
                self._free_maps(call)
            pending.future.set_exception(ScoringError(f"unreadable reply: {type(e).__name__}: {e}"))
            return
        with self._lock:
            self._hand_out(call, results)
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
        for sock in [*self._requests, self._replies]:
            sock.close(0)
        self._ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)
