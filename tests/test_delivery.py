"""Protocol-2 bookkeeping on a real SQLite result log: dedupe, acknowledgements, seq gaps, replay
pages, and a log written before the protocol column existed. Fast: no daemon, no sockets."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from daemon.delivery import Delivery
from daemon.metrics import DaemonMetrics
from daemon.replay import verdicts_page
from daemon.resultlog import LogReader, ResultLog
from sensors.frame import FrameMeta


def meta(seq: int, protocol: int = 2, part: str | None = None, sensor: str = "cam") -> FrameMeta:
    return FrameMeta(sensor_id=sensor, product="flange", part_id=part or f"p{seq}", seq=seq,
                     capture_time=time.time(), protocol=protocol)


def commit(log: ResultLog, m: FrameMeta) -> dict:
    now = time.time()
    header = {"sensor_id": m.sensor_id, "product": m.product, "part_id": m.part_id, "seq": m.seq,
              "protocol": m.protocol, "verdict": "pass", "score": 0.1, "received_at": now, "decided_at": now}
    header["verdict_id"] = log.append(header)
    return header


def metric(metrics: DaemonMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_resent_frames_are_answered_once(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "r.sqlite")
    metrics = DaemonMetrics("test")
    d = Delivery(LogReader(tmp_path / "r.sqlite"), metrics)
    assert d.classify(meta(0)) == ("new", None)
    assert d.classify(meta(0)) == ("in_flight", None)  # still inside the daemon
    assert d.classify(meta(0, part="other")) == ("new", None)  # another part: not a copy
    header = commit(log, meta(0))
    topic, body = d.committed(header)
    assert topic == b"ack/cam/"
    assert json.loads(body) == {"protocol": 2, "type": "ack", "sensor_id": "cam", "seq": 0, "part_id": "p0",
                                "verdict_id": header["verdict_id"], "verdict": "pass"}
    status, original = d.classify(meta(0))
    assert status == "logged" and original["verdict_id"] == header["verdict_id"]
    assert d.classify(meta(0, protocol=1)) == ("new", None)  # protocol 1: never deduplicated
    assert metric(metrics, "inspectd_duplicate_frames_total", found="in_flight") == 1
    assert metric(metrics, "inspectd_duplicate_frames_total", found="logged") == 1


def test_seq_gaps_are_counted_also_after_a_restart(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "r.sqlite")
    for seq in (0, 1, 2):
        commit(log, meta(seq, protocol=1))
    metrics = DaemonMetrics("test")
    d = Delivery(LogReader(tmp_path / "r.sqlite"), metrics)  # a restarted daemon: last seq 2 from the log
    d.track_seq(meta(3, protocol=1))
    assert metric(metrics, "inspectd_seq_gaps_total") == 0
    d.track_seq(meta(7, protocol=1))
    assert (metric(metrics, "inspectd_seq_gaps_total"), metric(metrics, "inspectd_seq_missing_total")) == (1, 3)
    d.track_seq(meta(0, protocol=1))  # a protocol-1 sensor that started again
    d.track_seq(meta(1, protocol=1))
    assert metric(metrics, "inspectd_seq_gaps_total") == 1


def test_replay_pages_and_an_old_log_gains_the_protocol_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the first release's table, without the protocol column
        conn.execute("CREATE TABLE verdicts (id INTEGER PRIMARY KEY AUTOINCREMENT, part_id TEXT, product TEXT,"
                     " sensor_id TEXT, seq INTEGER, verdict TEXT NOT NULL, score REAL, threshold REAL, scorer TEXT,"
                     " model_version TEXT, error_reason TEXT, error_detail TEXT, capture_time REAL,"
                     " received_at REAL NOT NULL, decided_at REAL NOT NULL, latency_ms REAL, map_path TEXT,"
                     " header_json TEXT NOT NULL)")
        conn.execute("INSERT INTO verdicts (sensor_id, seq, verdict, received_at, decided_at, header_json)"
                     " VALUES ('old', 0, 'pass', 1, 1, '{}')")
    log = ResultLog(path)
    ids = [commit(log, meta(seq))["verdict_id"] for seq in range(3)]
    reader = LogReader(path)
    code, page = verdicts_page(reader, "sensor_id=cam&limit=2")
    assert code == 200 and [v["verdict_id"] for v in page["verdicts"]] == ids[:2] and page["more"]
    code, page = verdicts_page(reader, f"after_id={page['last_id']}")
    assert [v["seq"] for v in page["verdicts"]] == [2] and not page["more"]
    assert verdicts_page(reader, "limit=0")[0] == 400
    assert verdicts_page(reader, "after_id=x")[0] == 400
    assert verdicts_page(reader, "bogus=1")[0] == 400
    assert verdicts_page(None, "")[0] == 503
