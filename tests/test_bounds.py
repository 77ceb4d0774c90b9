"""The daemon's bounds, in-process: emitter lanes, map retention, label sets, the memory bound."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, load_config, pub_hwm, worst_case_memory
from daemon.lanes import ERRORS, SCORED, EmitLanes
from daemon.maps import MapRetention, file_stem
from daemon.metrics import OTHER, DaemonMetrics


def test_scored_verdicts_go_before_errors_and_lanes_are_bounded() -> None:
    lanes = EmitLanes(scored_size=2, errors_size=3)
    for i in range(3):
        assert lanes.put(f"e{i}", ERRORS)
    assert not lanes.put("e3", ERRORS, timeout=0.05)  # full: the producer waits, nothing is dropped silently
    lanes.put("s0", SCORED)
    lanes.put("s1", SCORED)
    assert [lanes.get()[1] for _ in range(5)] == ["s0", "s1", "e0", "e1", "e2"]
    assert lanes.get(timeout=0.05) is None
    got: list = []
    t = threading.Thread(target=lambda: got.append(lanes.get(timeout=5)))
    t.start()
    lanes.put("late", ERRORS)
    t.join()
    assert got == [(ERRORS, "late")]


def test_retention_deletes_oldest_over_budget_and_too_old(tmp_path: Path) -> None:
    day = tmp_path / "flange" / "2026-01-01"
    day.mkdir(parents=True)
    now = time.time()
    for i in range(5):
        p = day / f"p{i}.npz"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - 100 + i, now - 100 + i))
    r = MapRetention(tmp_path, max_bytes=3000, max_age_s=3600)
    assert r.total == 5000 and r.prune(now) == 2
    assert sorted(p.name for p in day.iterdir()) == ["p2.npz", "p3.npz", "p4.npz"]
    new = day / "new.npz"
    new.write_bytes(b"y" * 10)
    r.track(new)
    assert MapRetention(tmp_path, max_bytes=1e9, max_age_s=50).prune(now) == 3  # the age limit
    assert [p.name for p in day.iterdir()] == ["new.npz"]


def test_file_stem_never_names_a_dot_file() -> None:
    assert file_stem("..") == "part" and file_stem("../../etc/x") == "_.._etc_x" and file_stem(".a") == "a"


def test_label_values_come_from_bounded_sets() -> None:
    m = DaemonMetrics("test", sensors=["cam-a"], max_sensor_labels=2, products=["flange"])
    assert m.sensor_label("cam-a") == "cam-a"
    assert [m.sensor_label(f"s{i}") for i in range(4)] == ["s0", "s1", OTHER, OTHER]
    assert m.sensor_label("s0") == "s0" and m.sensor_label(None) == OTHER
    assert m.product_label("flange") == "flange" and m.product_label("gear") == OTHER
    m.allow_product("gear")
    assert m.product_label("gear") == "gear" and m.product_label(None) == OTHER


def test_start_up_refuses_a_config_above_its_memory_bound(tmp_path: Path) -> None:
    terms = worst_case_memory(Config())
    assert sum(terms.values()) <= Config().memory.bound_mb * 2**20
    p = tmp_path / "c.yaml"
    p.write_text("ingest: {max_connections: 1000}\n")
    with pytest.raises(ConfigError, match="worst-case memory .* exceeds memory.bound_mb"):
        load_config(p)


def test_pub_high_water_mark_follows_the_byte_budget() -> None:
    inline = Config.model_validate({"ingest": {"max_points": 160_000}, "publish": {"buffer_mb": 4}})
    none = Config.model_validate({"ingest": {"max_points": 160_000}, "publish": {"buffer_mb": 4, "maps": "none"}})
    assert pub_hwm(inline) == 4 * 2**20 // (32_768 + 640_000)
    assert pub_hwm(none) == 4 * 2**20 // 32_768


def test_deadline_follows_size_and_takt() -> None:
    w = Config.model_validate({"workers": {"takt_ms": 1000, "ms_per_mpoint": 8000}}).workers
    assert w.deadline_s(0) == 1.0 and w.deadline_s(1_000_000) == 9.0


def test_emitter_publishes_through_a_failed_map_write_and_a_failed_commit(tmp_path: Path) -> None:
    """Real SQLite and a real PUB socket: the maps folder is a file, then the log is closed."""
    import numpy as np
    import zmq

    from daemon.emitter import Emitter
    from daemon.resultlog import ResultLog
    from sensors.wire import decode_verdict

    from malformed import make_frame

    (tmp_path / "maps").write_text("not a folder")
    cfg = Config.model_validate({"storage": {"maps_dir": str(tmp_path / "maps"), "maps": "all"}})
    metrics = DaemonMetrics("test", products=["flange"])
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.3)
    results = ResultLog(tmp_path / "r.sqlite")
    em = Emitter(cfg, metrics, EmitLanes(4, 4), results, pub, MapRetention(tmp_path / "none", 1e9, 1e9))
    frame = make_frame()
    header = {"product": "flange", "part_id": "p", "seq": 1, "verdict": "pass", "threshold": 1.0,
              "received_at": time.time(), "error": None}
    em.emit_one(dict(header), np.zeros((6, 5), np.float32), frame, {}, time.monotonic())
    results.close()
    em.emit_one(dict(header), np.zeros((6, 5), np.float32), frame, {}, time.monotonic())
    got = [decode_verdict(sub.recv_multipart()).header for _ in range(2) if sub.poll(5000)]
    ctx.destroy(linger=0)
    assert got[0]["verdict"] == "pass" and got[0]["map_path"] is None and got[0]["verdict_id"] == 1
    assert got[1]["verdict"] == "error" and got[1]["error"]["reason"] == "log_failed" and got[1]["part_id"] == "p"
    sample = metrics.registry.get_sample_value
    assert sample("inspectd_map_write_failures_total") == 2 and sample("inspectd_log_failures_total") == 1
