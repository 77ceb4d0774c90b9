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
