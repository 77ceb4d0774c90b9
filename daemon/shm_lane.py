"""The daemon's side of the shared-memory hand-over to the scoring actors on its own node.

``ActorPool`` hands a call to such an actor here instead of through a Ray task call
(``workers.handover`` has the format and why; docs/design/daemon-path.md the measurements):
the call's frames are copied once into the actor's slot file (``/dev/shm``, in a folder only
this user can open), a small JSON request goes to the actor's ``serve`` loop over a ZeroMQ Unix
socket, and a receiver thread turns each reply into the call's result, its maps copied out of
the slot, completing the call's future as a Ray call's would.

Bounded: an actor has ``slots`` slots (its calls in flight), each as large as the largest call
it has carried; ``submit`` answers None when no slot is free or the actor's loop is not
listening, and the pool then uses the Ray call. Which actor died is the pool's to learn (its
``serve`` call fails); ``fail_actor`` then fails that actor's calls here.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
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
    slot: Slot
    frames: list[dict[str, Any]]
    future: Future


class SharedMemoryLane:
    """Per actor: a PUSH socket the actor's ``serve`` loop pulls requests from, and ``slots``
    slot files; one PULL socket and thread for every actor's replies."""

    def __init__(self, actors: int, slots: int, root: str = SHM_ROOT) -> None:
        remove_stale(root)
        self.dir = Path(tempfile.mkdtemp(prefix=f"inspectd-{os.getpid()}-", dir=root))  # mode 0700
        self.slots = slots
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
        self._slot_files: dict[tuple[int, int], Slot] = {}
        self._free = [set(range(slots)) for _ in range(actors)]
        self._holds: dict[int, tuple[int, int]] = {}
        """Call id → the (actor, slot) it holds until ``release``."""
        self._pending: dict[int, Pending] = {}
        self._lock = threading.Lock()
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

    def submit(self, actor: int, frames: list[Frame]) -> tuple[int, Future] | None:
        """Hand ``frames`` to ``actor``: the call's id and the future of its results (a list as
        ``ScoringWorker.score_batch`` returns), or None when it cannot be handed over now."""
        free = self._free[actor]
        if not free:
            return None
        k = min(free)
        descs, need = layout(frames)
        slot = self._slot_files.get((actor, k))
        if slot is None or slot.size < need:
            if slot is not None:
                slot.unlink()  # the actor keeps its mapping of the old file until the new one arrives
            path = self.dir / f"actor-{actor}-slot-{k}-{next(self._generation)}"
            slot = self._slot_files[(actor, k)] = Slot(path, need, create=True)
        write_frames(slot.array, frames, descs)
        call = next(self._ids)
        future: Future = Future()
        request = {"call": call, "key": f"{k}", "slot": slot.path, "size": slot.size, "frames": descs}
        with self._lock:
            self._pending[call] = Pending(actor, slot, descs, future)
        try:
            self._requests[actor].send(json.dumps(request).encode(), zmq.NOBLOCK)
        except zmq.Again:  # its loop is not connected (starting, restarting)
            with self._lock:
                del self._pending[call]
            return None
        free.discard(k)
        self._holds[call] = (actor, k)
        return call, future

    def release(self, call: int) -> None:
        """The call's result was taken, or given up: its slot serves the next call."""
        with self._lock:
            self._pending.pop(call, None)
        held = self._holds.pop(call, None)
        if held is not None:
            self._free[held[0]].add(held[1])

    def fail_actor(self, actor: int, error: BaseException) -> None:
        """Fail every call in flight on ``actor`` (it died) with ``error``."""
        with self._lock:
            calls = [(c, p) for c, p in self._pending.items() if p.actor == actor]
            for c, _ in calls:
                del self._pending[c]
        for _, p in calls:
            p.future.set_exception(error)

    def _receive(self) -> None:
        while not self._closing.is_set():
            if not self._replies.poll(200):
                continue
            call_id, reply = self._replies.recv_multipart()
            with self._lock:
                pending = self._pending.pop(int(call_id), None)
            if pending is None:  # given up (deadline, death) before the actor answered
                continue
            try:
                pending.future.set_result(read_reply(pending.slot.array, pending.frames, reply))
            except Exception as e:  # a reply this daemon cannot read fails its call, not the lane
                log.error("cannot read a reply of actor %d: %s", pending.actor, e)
                pending.future.set_exception(ScoringError(f"unreadable reply: {type(e).__name__}: {e}"))

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
