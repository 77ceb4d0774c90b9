"""``inspectd results``: export and retention on a result log written by the real daemon."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

from daemon.cli import main
from daemon.results_query import COLUMNS, map_files, parse_duration, parse_size, parse_time
from sensors.frame import Frame
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts

from conftest import PRODUCT, RunningDaemon, receive_verdicts


def results(*args: str) -> str:
    """``inspectd results ARGS`` in this process (the CLI's own code path), its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["results", *args]) == 0
    return out.getvalue()


def db_used_bytes(log: Path) -> int:
    with sqlite3.connect(log) as c:
        pages = c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * c.execute("PRAGMA page_size").fetchone()[0]


def test_parsers() -> None:
    assert parse_duration("30d") == 30 * 86400 and parse_duration("90s") == 90
    assert parse_size("2G") == 2 << 30 and parse_size("500M") == 500 << 20 and parse_size("1024") == 1024
    assert parse_time("2026-12-03T08:00:00Z") == parse_time("2026-12-03T09:00:00+01:00") == 1796284800.0
    assert abs(parse_time("2h", now=10_000.0) - 2800.0) < 1e-9
    with pytest.raises(ValueError):
        parse_time("yesterday")


@pytest.fixture(scope="module")
def log_with_verdicts(daemon: RunningDaemon) -> tuple[Path, float]:
    """The daemon's log after 4 scored parts and 2 parts of a product without a model (error verdicts)."""
    since = time.time() - 0.001
    ctx = zmq.Context()
    sub = daemon.subscriber(ctx)
    frames = []
    for i, f in enumerate(simulated_parts([PRODUCT], 4, 0.5, seed=61)):
        pts = f.valid_points()[::16].copy()
        frames.append(Frame(points=pts, meta=replace(f.meta, sensor_id="results-e2e", seq=i)))
    for i in range(2):
        frames.append(Frame(points=frames[0].points, meta=replace(frames[0].meta, product="gear", part_id=f"gear-{i}")))
    with FramePusher(daemon.ingest) as push:
        for f in frames:
            push.send(f)
        got = receive_verdicts(sub, len(frames), timeout=90)
    ctx.destroy(linger=0)
    assert len(got) == len(frames)
    return daemon.root / "results.sqlite", since


@pytest.mark.slow
def test_csv_has_a_header_and_one_row_per_verdict_and_filters_narrow(log_with_verdicts: tuple[Path, float]) -> None:
    log, since = log_with_verdicts
    with sqlite3.connect(log) as c:
        total = c.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "results", "--log", str(log), "--format", "csv"],
                         capture_output=True, text=True, timeout=120)  # the command itself, once
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert len(rows) == total and list(rows[0]) == list(COLUMNS)
    mine = list(csv.DictReader(io.StringIO(results("--log", str(log), "--since", repr(since)))))
    assert len(mine) == 6
    assert [r["product"] for r in mine].count("gear") == 2
    gear = list(csv.DictReader(io.StringIO(results("--log", str(log), "--product", "gear", "--since", repr(since)))))
    assert len(gear) == 2 and {r["verdict"] for r in gear} == {"error"}
    assert {r["error_reason"] for r in gear} == {"unknown_product"}
    errors = results("--log", str(log), "--since", repr(since), "--verdict", "error", "--format", "jsonl")
    objs = [json.loads(x) for x in errors.splitlines()]
    assert sorted(o["part_id"] for o in objs) == ["gear-0", "gear-1"]
    assert objs[0]["decided_at"].endswith("Z")
    scored = [r for r in mine if r["product"] == PRODUCT]
    one = results("--log", str(log), "--part-id", scored[0]["part_id"], "--since", repr(since), "--format", "jsonl")
    assert len(one.splitlines()) == 1
    assert len(results("--log", str(log), "--limit", "3").splitlines()) == 4
    assert results("--log", str(log), "--until", repr(since - 3600), "--since", repr(since - 7200)).count("\n") == 1
    assert all(Path(r["map_path"]).is_file() for r in scored)


@pytest.mark.slow
def test_prune_removes_rows_and_maps_by_age_then_by_size(log_with_verdicts: tuple[Path, float], tmp_path: Path) -> None:
    src, _ = log_with_verdicts
    log = tmp_path / "results.sqlite"
    with sqlite3.connect(src) as a, sqlite3.connect(log) as b:
        a.backup(b)  # a consistent copy beside the running daemon
    maps = tmp_path / "maps"
    with sqlite3.connect(log) as c:
        for rid, mp in c.execute("SELECT id, map_path FROM verdicts WHERE map_path IS NOT NULL").fetchall():
            new = maps / f"{rid}" / Path(mp).name
            new.parent.mkdir(parents=True)
            for f in map_files(mp):
                shutil.copy(f, new.with_suffix(f.suffix))
            c.execute("UPDATE verdicts SET map_path = ? WHERE id = ?", (str(new), rid))
        ids = [r[0] for r in c.execute("SELECT id FROM verdicts WHERE map_path IS NOT NULL ORDER BY id")]
        old = ids[:2]
        c.executemany("UPDATE verdicts SET decided_at = decided_at - 40 * 86400 WHERE id = ?", [(i,) for i in old])
        n = c.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def map_of(rid: int) -> list[Path]:
        return list((maps / str(rid)).iterdir())

    assert all(map_of(i) for i in old)
    dry = json.loads(results("prune", "--log", str(log), "--older-than", "30d", "--dry-run"))
    assert dry["rows_deleted"] == 2 and all(map_of(i) for i in old)
    rep = json.loads(results("prune", "--log", str(log), "--older-than", "30d"))
    assert rep["rows_deleted"] == 2 and rep["rows_left"] == n - 2 and rep["maps_deleted"] >= 2
    assert not any(map_of(i) for i in old) and all(map_of(i) for i in ids[2:])
    with sqlite3.connect(log) as c:
        assert c.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == n - 2
        by_age = [r[0] for r in c.execute("SELECT id FROM verdicts ORDER BY id")]

    map_bytes = sum(f.stat().st_size for i in ids[2:] for f in map_of(i))
    budget = db_used_bytes(log) + map_bytes // 2
    rep = json.loads(results("prune", "--log", str(log), "--max-bytes", str(budget), "--vacuum"))
    assert 0 < rep["rows_deleted"] < n - 2
    left = sum(f.stat().st_size for i in ids[2:] for f in map_of(i))
    assert left + db_used_bytes(log) <= budget
    with sqlite3.connect(log) as c:
        kept = {r[0] for r in c.execute("SELECT id FROM verdicts")}
        assert len(kept) == rep["rows_left"]
    assert set(by_age[rep["rows_deleted"]:]) == kept  # the oldest went first
    assert all(bool(map_of(i)) == (i in kept) for i in ids[2:])  # maps go with their rows
