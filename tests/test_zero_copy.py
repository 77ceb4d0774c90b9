"""The daemon path copies a frame's points once between the ZeroMQ receive and the scorer: the
decode is a view on the received ZeroMQ buffer, the hand-over to an actor is one ``ray.put``,
and the actor reads the frame from the object store in place (docs/design/daemon-path.md).
Real ZeroMQ on loopback, a real local Ray. Also: the bench reports every hop of that path, and
maps every timing key of the fused scorer onto a stage. Timings are measured by the bench,
never asserted here."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import zmq
from test_few_defects import FUSED, prepared
from test_template import posed

from daemon.pool import for_actor
from sensors.simulated import simulated_parts
from sensors.wire import decode_frame, encode_frame
from tests.test_components import l_part
from tools.bench.daemon_path import HOPS, PATH_HOPS, account_for_frames, header_stage_means, hops_ms
from tools.bench.measure import PeakRSS
from tools.bench.report import render_markdown
from tools.bench.run import bracket
from tools.bench.stages import STAGE_OF, map_stages
from workers.actor import ScoringWorker
from workers.fused import FusedScorer

from conftest import PRODUCT


def _received(parts: list) -> list[zmq.Frame]:
    """``parts`` sent over a real PUSH → PULL pair on loopback TCP and received without a copy."""
    ctx = zmq.Context()
    try:
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart(parts, copy=False)
        assert pull.poll(10_000), "nothing arrived on loopback"
        out = pull.recv_multipart(copy=False)
        push.close(linger=0)
        pull.close(linger=0)
        return out
    finally:
        ctx.term()


def test_decode_is_a_view_on_the_zeromq_buffer() -> None:
    frame = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=3, good_only=True)))
    parts = _received(encode_frame(frame))
    decoded = decode_frame(parts, max_points=frame.n_points)
    assert np.shares_memory(decoded.points, np.frombuffer(parts[1].buffer, np.uint8))
    assert decoded.gt_mask is not None and np.shares_memory(decoded.gt_mask, np.frombuffer(parts[2].buffer, np.uint8))
    del parts
    gc.collect()  # the view keeps its ZeroMQ frame alive: the array still reads what was sent
    np.testing.assert_array_equal(decoded.points, frame.points)
    travelling = for_actor(decoded)  # what goes to the actor: the same arrays, the truth mask left behind
    assert travelling.gt_mask is None and travelling.points is decoded.points
    assert travelling.valid_mask() is decoded.valid_mask()  # computed once at ingest, not again in the actor


def test_actor_reads_the_put_frames_in_place(enrolled_models: Path) -> None:
    frames = list(simulated_parts([PRODUCT], 2, 0.0, seed=5, good_only=True))
    worker = ScoringWorker(str(enrolled_models))
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=128 * 2**20,
             _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        ref = ray.put([for_actor(f) for f in frames])
        a, b = ray.get(ref), ray.get(ref)
        assert np.shares_memory(a[0].points, b[0].points), "each fetch copied the frame"
        assert not a[0].points.flags.writeable  # the object store's shared memory, read-only
        replies = worker.score_shared([ref])
    finally:
        ray.shutdown()
    for frame, reply in zip(frames, replies, strict=True):
        assert isinstance(reply, dict), reply
        assert reply["timings"]["deserialize"] >= 0.0 and reply["finished_at"] >= reply["started_at"]
        alone = worker.score(frame)
        assert reply["object_score"] == pytest.approx(alone["object_score"], rel=1e-6)
        np.testing.assert_array_equal(reply["anomaly_map"], alone["anomaly_map"])


def test_actor_touches_every_page_of_the_warm_up_blocks(enrolled_models: Path) -> None:
    """``ScoringWorker.touch`` reads the blocks ``ActorPool.warm_store`` put, in place."""
    worker = ScoringWorker(str(enrolled_models))
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=128 * 2**20,
             _node_ip_address="127.0.0.1", logging_level="ERROR")
    try:
        refs = [ray.put(np.zeros(2**20, np.uint8)) for _ in range(3)]
        assert worker.touch([refs]) == 3 * 2**20
    finally:
        ray.shutdown()


def test_fused_timing_keys_map_onto_stages() -> None:
    scorer = FusedScorer(**FUSED)
    scorer.fit([prepared(posed(l_part(s), s)) for s in range(4)])
    keys = set(scorer.score(prepared(posed(l_part(9), 9))).timings)
    totals = {"template", "patchcore"}
    assert totals <= keys and not (totals & set(STAGE_OF))
    assert keys - totals <= set(STAGE_OF), keys - totals - set(STAGE_OF)
    stages = map_stages({k: 1.0 for k in keys - totals})
    assert stages["features"] and stages["search"] and stages["network"] is None


def test_bench_reports_every_hop() -> None:
    raw = {"decode": 2.0, "queue": 0.5, "put": 3.0, "actor_wait": 1.5, "deserialize": 0.2, "preprocess": 10.0,
           "score": 80.0, "features": 60.0, "search": 20.0, "map_back": 1.0, "return": 2.5, "decision": 0.1,
           "maps": 0.0, "log": 1.2, "publish": 0.3}
    verdicts = [(0.110, {"latency_ms": 102.0}), (0.114, {"latency_ms": 104.0}), (0.2, {"error": {"reason": "x"}})]
    assert header_stage_means([(0.1, {"stage_ms": {"queue": 1.0}}), (0.1, {"stage_ms": {"queue": 3.0, "put": 2.0}}),
                               (0.2, {"error": {"reason": "x"}, "stage_ms": {"queue": 50.0}})]) == {"queue": 2.0, "put": 1.0}
    hops = hops_ms(raw, verdicts)
    assert set(HOPS) <= set(hops) and hops["total"] == pytest.approx(112.0)
    assert sum(hops[h] for h in HOPS) == pytest.approx(hops["total"])  # the hops account for the latency
    assert hops["path"] == pytest.approx(sum(hops[h] for h in PATH_HOPS))
    assert map_stages(raw)["transport"] == pytest.approx(0.5 + 3.0 + 1.5 + 0.2 + 2.5)
    machine = {"cpu": "test", "cores": 2, "memory_gib": 1.0, "gpu": None, "python": "3.11", "torch": "x"}
    sizes = {"cloud-30k": {"points_per_frame": 30_000, "overhead_ratio_p50": 1.1,
                           "in_process": {"latency_ms_p50": 100.0, "latency_ms_p99": 120.0, "peak_rss_mib": 1.0,
                                          "stages_ms_mean": map_stages(raw)},
                           "daemon": {"latency_ms_p50": 110.0, "latency_ms_p99": 130.0, "offered_rate_per_s": 1.0,
                                      "throughput_per_s_saturated": 2.0, "peak_rss_mib_daemon_and_workers": 1.0,
                                      "stages_ms_mean": map_stages(raw), "hops_ms_mean": hops,
                                      "overhead_ratio_hops": 1.08}}}
    page = render_markdown({"machine": machine, "scorer": "patchcore-fpfh", "backend": "torch-cpu",
                            "command": "inspectd bench", "sizes": sizes})
    header = next(line for line in page.splitlines() if line.startswith("| frame | decode | queue | put"))
    for column in ("actor wait", "deserialize", "preprocess", "score", "map back", "return", "decision", "log",
                   "publish", "wire", "total", "path", "overhead within the run"):
        assert f"| {column} |" in header, column


def test_in_process_rounds_bracket_the_daemon_run() -> None:
    def round_(lat: list[float], decode: float) -> dict:
        raw = {"decode": decode, "score": 50.0}
        return {"frames": len(lat), "latency_ms_p50": float(np.percentile(lat, 50)), "latencies_ms": lat,
                "stage_samples": len(lat), "stages_ms_raw": raw, "stages_ms_mean": map_stages(raw), "peak_rss_mib": 5.0}

    both = bracket(round_([100.0, 110.0, 120.0], 2.0), round_([200.0, 210.0, 220.0], 4.0))
    assert both["frames"] == 6 and both["rounds_p50_ms"] == [110.0, 210.0]
    assert both["latency_ms_p50"] == pytest.approx(160.0) and both["stages_ms_raw"]["decode"] == pytest.approx(3.0)


def test_bench_tells_a_dropped_publish_from_a_lost_frame() -> None:
    counts = account_for_frames(["a", "b", "c", "d"], received={"a", "b"}, logged={"a", "b", "c"})
    assert counts == {"sent": 4, "received": 2, "not_published": 1, "unanswered": 1}


def test_memory_sampler_sees_a_child_and_costs_little() -> None:
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 * 2**20); time.sleep(3)"])
    try:
        time.sleep(1.0)
        with PeakRSS(os.getpid(), children=True, period=0.05) as alone:
            time.sleep(0.3)
        assert alone.peak > 64 * 2**20  # the child's buffer is counted
        assert 0.0 <= alone.cpu_fraction < 0.5
    finally:
        child.kill()
        child.wait()


def test_an_actor_keeps_freed_frame_memory_for_the_next_frame() -> None:
    """``hold_freed_heap``: a freed frame-sized block is reused, not faulted in again (in a fresh
    process, as a Ray worker starts; without it glibc returns the first such blocks to the kernel)."""
    import subprocess
    import sys

    probe = (
        "import resource, numpy as np\n"
        "from workers.actor import hold_freed_heap\n"
        "assert hold_freed_heap()\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    np.ones(5_000_000, np.float32)\n"  # 20 MB, allocated, touched, freed
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(faults(), faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split()
    second = int(out[1])  # without hold_freed_heap: ~750 with transparent huge pages, ~4900 without
    assert second < 100, f"the second block faulted {second} pages in: the first was returned to the kernel"


@pytest.mark.parametrize("handover", ["shared_memory", "object_store"])
def test_daemon_over_unix_sockets(enrolled_models: Path, tmp_path: Path, handover: str) -> None:
    """ipc:// endpoints, as a sensor adapter on the daemon's machine connects: every frame gets
    its verdict with its map, whichever way the frames reach the actors (``workers.handover``)."""
    import json
    import urllib.request

    from sensors.publisher import FramePusher

    from conftest import launch_daemon, receive_verdicts

    with launch_daemon(enrolled_models, tmp_path, ingest={"endpoint": f"ipc://{tmp_path}/ingest.sock"},
                       publish={"endpoint": f"ipc://{tmp_path}/verdicts.sock"}, workers={"handover": handover}) as d:
        with urllib.request.urlopen(d.http + "/v1/actors", timeout=10) as r:
            assert {a["handover"] for a in json.loads(r.read())["actors"]} == {handover}
        # captured once the daemon is up: a frame made before a slow start is too old at dequeue
        frames = list(simulated_parts([PRODUCT], 3, 0.0, seed=8, good_only=True))
        ctx = zmq.Context()
        try:
            sub = d.subscriber(ctx)
            with FramePusher(d.ingest) as push:
                for f in frames:
                    push.send(f)
            verdicts = receive_verdicts(sub, len(frames), 60)
        finally:
            ctx.destroy(linger=0)
    assert sorted(v.header["part_id"] for v in verdicts) == sorted(f.meta.part_id for f in frames)
    log = (tmp_path / "daemon.log").read_text()
    if handover == "object_store":  # ActorPool.warm_store at start, for frames that go through the store
        assert "object store warmed" in log
    else:
        assert "through shared memory" in log and "object store warmed" not in log
    for v in verdicts:
        assert not v.header.get("error"), v.header
        assert v.anomaly_map is not None and v.anomaly_map.shape == frames[0].points.shape[:-1]
