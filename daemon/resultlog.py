"""The durable result log: every verdict, committed to SQLite before it is published.

WAL journal with ``synchronous=FULL``: a verdict a subscriber has seen survives a power cut.
One connection, used only by the daemon's emitter thread.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    part_id       TEXT,
    product       TEXT,
    sensor_id     TEXT,
    seq           INTEGER,
    verdict       TEXT NOT NULL,
    score         REAL,
    threshold     REAL,
    scorer        TEXT,
    model_version TEXT,
    error_reason  TEXT,
    error_detail  TEXT,
    capture_time  REAL,
    received_at   REAL NOT NULL,
    decided_at    REAL NOT NULL,
    latency_ms    REAL,
    map_path      TEXT,
    header_json   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_product_time ON verdicts (product, decided_at);
CREATE INDEX IF NOT EXISTS verdicts_part ON verdicts (part_id);
"""


class ResultLog:
    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(p), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def append(self, header: dict[str, Any]) -> int:
        """Insert one verdict and commit; returns its row id."""
        err = header.get("error") or {}
        cur = self.conn.execute(
            "INSERT INTO verdicts (part_id, product, sensor_id, seq, verdict, score, threshold, scorer,"
            " model_version, error_reason, error_detail, capture_time, received_at, decided_at, latency_ms,"
            " map_path, header_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                header.get("part_id"),
                header.get("product"),
                header.get("sensor_id"),
                header.get("seq"),
                header["verdict"],
                header.get("score"),
                header.get("threshold"),
                header.get("scorer"),
                header.get("model_version"),
                err.get("reason"),
                err.get("detail"),
                header.get("capture_time"),
                header["received_at"],
                header["decided_at"],
                header.get("latency_ms"),
                header.get("map_path"),
                json.dumps(header, default=str),
            ),
        )
        return int(cur.lastrowid)

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
