"""The shared-memory hand-over between the daemon and an actor on its machine
(``workers.handover``, ``daemon.shm_lane``, ``ScoringWorker.serve``): what travels, that the
actor reads the frames in place and writes the maps in place, and that its answers are the same
as scoring the frame directly. Real ZeroMQ Unix sockets and real files in /dev/shm; the actor's
loop runs in a thread of this process, as it runs in a thread of a Ray actor (the daemon tests
run it in Ray: tests/test_daemon_e2e.py, tests/test_zero_copy.py)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from daemon.shm_lane import SharedMemoryLane
from sensors.frame import Frame, FrameError
from sensors.simulated import simulated_parts
from workers.actor import ScoringWorker
from workers.handover import (
    ScoringError,
    Slot,
    frame_bytes,
    layout,
    map_bytes,
    read_frames,
    read_reply,
    write_frames,
    write_reply,
)

from conftest import PRODUCT


def _slots(tmp_path: Path, frames: list[Frame]) -> tuple[Slot, list[Slot], list[dict]]:
    """A call's frame slot, written, its frames' map slots and its descriptors."""
    names = [f"map-{i}" for i in range(len(frames))]
    descs, need = layout(frames, names)
    slot = Slot(tmp_path / "frames", need)
    maps = [Slot(tmp_path / name, map_bytes(f.n_points)) for name, f in zip(names, frames, strict=True)]
    write_frames(slot.array, frames, descs)
    return slot, maps, descs


def test_frames_travel_whole_and_are_read_in_place(tmp_path: Path) -> None:
    camera = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=4, good_only=True)))
    camera.points[0, :3] = np.nan  # invalid pixels
    camera = replace(camera, rgb=np.full((*camera.points.shape[:2], 3), 7, np.uint8), gt_mask=None)
    cloud = Frame(points=np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32),
                  meta=replace(camera.meta, part_id="cloud-1", units="um", truth={"defective": True, "defect": "dent"}))
    slot, map_slots, descs = _slots(tmp_path, [camera, cloud])
    assert slot.size <= frame_bytes(camera.n_points) + frame_bytes(cloud.n_points)
    other = Slot(slot.path)  # the actor's own mapping of the same file
    frames, maps = read_frames(other.array, [m.array for m in map_slots], descs)
    for sent, got in zip([camera, cloud], frames, strict=True):
        np.testing.assert_array_equal(got.points, sent.points)
        assert got.meta == sent.meta
        assert got.valid_mask() is not None and np.array_equal(got.valid_mask(), sent.valid_mask())
        assert np.shares_memory(got.points, other.array) and not got.points.flags.writeable
    np.testing.assert_array_equal(frames[0].rgb, camera.rgb)
    assert frames[1].rgb is None
    assert [m.shape for m in maps] == [camera.points.shape[:2], (500,)] and all(m.flags.writeable for m in maps)
    assert all(np.shares_memory(m, s.array) for m, s in zip(maps, map_slots, strict=True))


def test_a_reply_carries_maps_and_errors(tmp_path: Path) -> None:
    frames = list(simulated_parts([PRODUCT], 3, 0.0, seed=6, good_only=True))
    slot, map_slots, descs = _slots(tmp_path, frames)
    bufs = [m.array for m in map_slots]
    _, maps = read_frames(slot.array, bufs, descs)
    maps[0][:] = 1.5  # a scorer that wrote its map into the slot
    apart = np.full(frames[1].points.shape[:2], 2.5, np.float32)  # and one that did not
    results = [
        {"object_score": np.float32(0.25), "anomaly_map": maps[0], "timings": {"score": 0.01},
         "verdict_fields": {"pose": np.eye(4), "fitness": np.float64(0.9)}},
        {"object_score": 0.5, "anomaly_map": apart, "timings": {}, "verdict_fields": {}},
        FrameError("too_few_points", "12 foreground points"),
    ]
    got = read_reply(bufs, descs, write_reply(bufs, descs, results))
    assert got[0]["object_score"] == 0.25 and got[0]["verdict_fields"]["pose"] == np.eye(4).tolist()
    assert np.all(got[0]["anomaly_map"] == 1.5) and np.all(got[1]["anomaly_map"] == 2.5)
    assert all(np.shares_memory(g["anomaly_map"], b) for g, b in zip(got[:2], bufs, strict=False))  # in place
    assert isinstance(got[2], FrameError) and got[2].reason == "too_few_points" and got[2].detail == "12 foreground points"
    crashed = read_reply(bufs[:1], descs[:1], write_reply(bufs[:1], descs[:1], [ValueError("boom")]))
    assert isinstance(crashed[0], ScoringError) and str(crashed[0]) == "ValueError: boom"


def _lane(root: str | None = None, max_map_slots: int = 2) -> SharedMemoryLane:
    """One actor, one frame slot for calls of up to 2 frames of the simulator's size."""
    n = 400 * 400
    kw = {} if root is None else {"root": root}
    return SharedMemoryLane(actors=1, slots=1, frame_slot_bytes=2 * frame_bytes(n), map_slot_bytes=map_bytes(n),
                            frames_per_call=1, max_map_slots=max_map_slots, **kw)


def _submit(lane: SharedMemoryLane, frames: list[Frame]) -> tuple[int, object]:
    """Submit once the actor's loop listens (a ZeroMQ connect takes a moment)."""
    deadline = time.monotonic() + 30
    while (handed := lane.submit(0, frames)) is None:
        assert time.monotonic() < deadline, "the actor's loop never connected"
        time.sleep(0.01)
    return handed


def test_an_actor_scores_handed_over_calls_as_it_scores_frames(enrolled_models: Path) -> None:
    worker = ScoringWorker(str(enrolled_models))
    frames = list(simulated_parts([PRODUCT], 3, 0.5, seed=12))
    lane = _lane(max_map_slots=3)
    assert stat.S_IMODE(lane.dir.stat().st_mode) == 0o700  # nobody else opens the slots or sockets
    served: list[int] = []
    loop = threading.Thread(target=lambda: served.append(
        worker.serve(lane.request_endpoint(0), lane.reply_endpoint, str(lane.dir))))
    loop.start()
    try:
        call, future = _submit(lane, frames[:2])
        assert lane.submit(0, frames[2:]) is None  # its only frame slot is taken until the result is released
        replies = future.result(timeout=120)
        lane.release(call)
        held = [r["anomaly_map"] for r in replies]  # views on a map slot, as the emitter publishes them
        copies = [m.copy() for m in held]
        first = [{k: v for k, v in r.items() if k != "anomaly_map"} for r in replies]
        tiny = Frame(points=np.zeros((3, 3), np.float32), meta=frames[2].meta)  # too few points to score
        call, future = _submit(lane, [tiny])
        alone = future.result(timeout=120)
        lane.release(call)
        call, future = _submit(lane, frames[2:])  # the last free map slot, while the first two are held
        future.result(timeout=120)
        lane.release(call)
        assert lane.submit(0, frames[2:]) is None  # every map slot busy: their maps are not dropped yet
        for m, c in zip(held, copies, strict=True):
            np.testing.assert_array_equal(m, c)  # no later call wrote over a map still held
        del future  # its map dropped: that map slot is free again
        call, future = _submit(lane, frames[2:])
        future.result(timeout=120)
        lane.release(call)
        del held, replies, future
    finally:
        lane.close()
        loop.join(timeout=30)
    assert served == [4] and not loop.is_alive()  # close() stops the loop
    assert not lane.dir.exists()
    for frame, reply, amap in zip(frames[:2], first, copies, strict=True):
        direct = worker.score(frame)
        assert reply["object_score"] == pytest.approx(direct["object_score"], rel=1e-6)
        np.testing.assert_array_equal(amap, direct["anomaly_map"])
        assert reply["timings"]["deserialize"] >= 0 and reply["finished_at"] >= reply["started_at"]
    assert isinstance(alone[0], FrameError), alone


def test_a_dead_actors_calls_fail_and_a_late_answer_is_dropped(tmp_path: Path) -> None:
    frame = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=2, good_only=True)))
    killed = tmp_path / "inspectd-2147483647-x1"  # left by a daemon killed before its clean-up
    (killed / "slots").mkdir(parents=True)
    running = tmp_path / f"inspectd-{os.getpid()}-x2"  # a daemon that still runs
    running.mkdir()
    lane = _lane(str(tmp_path))
    assert not killed.exists() and running.exists()
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)  # an actor that takes the request and never answers in time
    pull.connect(lane.request_endpoint(0))
    try:
        call, future = _submit(lane, [frame])
        assert pull.poll(10_000)
        pull.recv()
        lane.fail_actor(0, RuntimeError("actor died"))
        with pytest.raises(RuntimeError, match="actor died"):
            future.result(timeout=5)
        lane.release(call)
        push = ctx.socket(zmq.PUSH)  # its answer arrives after all: nobody waits for it any more
        push.connect(lane.reply_endpoint)
        push.send_multipart([str(call).encode(), b"[]"])
        time.sleep(0.5)
        assert lane.submit(0, [frame]) is not None  # the slot was freed, the lane still works
        push.close(0)
    finally:
        pull.close(0)
        ctx.term()
        lane.close()


def test_slots_that_do_not_fit_leave_nothing_behind(tmp_path: Path) -> None:
    """A /dev/shm too small for the slots (a container's 64 MB default) fails at start, where
    the pool falls back to Ray calls, never later in a write to a mapped page (SIGBUS)."""
    with pytest.raises(OSError):
        SharedMemoryLane(actors=1, slots=1, frame_slot_bytes=1 << 56, map_slot_bytes=1024, frames_per_call=1,
                         max_map_slots=1, root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_call_the_actor_cannot_read_is_answered_and_the_loop_goes_on(enrolled_models: Path, tmp_path: Path) -> None:
    """A request naming a slot file that is not there: each of its frames gets an error and the
    actor serves on."""
    import zmq

    worker = ScoringWorker(str(enrolled_models))
    frame = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=3, good_only=True)))
    descs, _ = layout([frame], ["map-gone"])
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(f"ipc://{tmp_path}/requests.sock")
    pull.bind(f"ipc://{tmp_path}/replies.sock")
    served: list[int] = []
    loop = threading.Thread(target=lambda: served.append(
        worker.serve(f"ipc://{tmp_path}/requests.sock", f"ipc://{tmp_path}/replies.sock", str(tmp_path))))
    loop.start()
    try:
        push.send(json.dumps({"call": 7, "frame_slot": "frames-gone", "frames": descs}).encode())
        assert pull.poll(30_000), "no answer"
        call, reply = pull.recv_multipart()
        push.send(b'{"stop": true}')
        loop.join(timeout=30)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
    got = read_reply([None], descs, reply)
    assert call == b"7" and isinstance(got[0], ScoringError) and "FileNotFoundError" in str(got[0])
    assert served == [1]
