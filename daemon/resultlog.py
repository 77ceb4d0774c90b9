"""The durable result log: every verdict, committed to SQLite before it is published.

WAL journal with ``synchronous=FULL``: a verdict a subscriber has seen survives a power cut.
The writing connection is used only by the daemon's emitter thread. Readers (ingest's
dedupe of resent protocol-2 frames, the HTTP replay route) open their own read-only
``LogReader``; WAL lets them read while the emitter writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
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

#: Added after the first release: logs written before it gain the column (NULL: protocol 1).
MIGRATIONS = """
CREATE INDEX IF NOT EXISTS verdicts_sensor_seq ON verdicts (sensor_id, seq);
CREATE INDEX IF NOT EXISTS verdicts_decided ON verdicts (decided_at);
"""

#: Scores of a product's shadow model, one row per verdict it scored beside the live model.
SHADOW_SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_scores (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    verdict_id      INTEGER NOT NULL,
    product         TEXT NOT NULL,
    part_id         TEXT,
    live_version    TEXT,
    live_revision   TEXT,
    live_score      REAL,
    live_verdict    TEXT NOT NULL,
    shadow_version  TEXT,
    shadow_revision TEXT NOT NULL,
    shadow_score    REAL,
    shadow_verdict  TEXT NOT NULL,
    shadow_error    TEXT,
    shadow_seconds  REAL,
    decided_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS shadow_pair ON shadow_scores (product, shadow_revision, live_revision);
CREATE INDEX IF NOT EXISTS shadow_verdict ON shadow_scores (verdict_id);
"""
SHADOW_FIELDS = ("verdict_id", "product", "part_id", "live_version", "live_revision", "live_score", "live_verdict",
                 "shadow_version", "shadow_revision", "shadow_score", "shadow_verdict", "shadow_error",
                 "shadow_seconds", "decided_at")
#: Rows a person must look at (the review station's queue): ``review`` verdicts and every
#: cold-start verdict. Logs written before the column gain it, filled once from the header.
REVIEW_MIGRATION = """
ALTER TABLE verdicts ADD COLUMN needs_review INTEGER;
UPDATE verdicts SET needs_review = 1
 WHERE verdict = 'review' OR json_extract(header_json, '$.zero_shot') IN (1, 'true');
"""
REVIEW_INDEX = "CREATE INDEX IF NOT EXISTS verdicts_needs_review ON verdicts (decided_at) WHERE needs_review = 1"

#: The most rows one replay page returns.
MAX_PAGE = 1000


class ResultLog:
    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self.conn = sqlite3.connect(str(p), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(verdicts)")}
        if "protocol" not in columns:
            self.conn.execute("ALTER TABLE verdicts ADD COLUMN protocol INTEGER")
        self.conn.executescript(MIGRATIONS)
        self.conn.executescript(SHADOW_SCHEMA)
        if "needs_review" not in columns:
            self.conn.executescript(f"BEGIN; {REVIEW_MIGRATION} COMMIT;")
        self.conn.execute(REVIEW_INDEX)

    def append(self, header: dict[str, Any]) -> int:
        """Insert one verdict and commit; returns its row id."""
        err = header.get("error") or {}
        cur = self.conn.execute(
            "INSERT INTO verdicts (part_id, product, sensor_id, seq, verdict, score, threshold, scorer,"
            " model_version, error_reason, error_detail, capture_time, received_at, decided_at, latency_ms,"
            " map_path, header_json, protocol, needs_review) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                int(header.get("protocol") or 1),
                1 if header["verdict"] == "review" or header.get("zero_shot") else None,
            ),
        )
        return int(cur.lastrowid)

    def append_shadow(self, record: dict[str, Any]) -> int:
        """Insert one shadow score (``SHADOW_FIELDS``, ``verdict_id`` the live verdict's row)."""
        cur = self.conn.execute(
            f"INSERT INTO shadow_scores ({', '.join(SHADOW_FIELDS)}) VALUES ({', '.join('?' * len(SHADOW_FIELDS))})",
            tuple(record.get(k) for k in SHADOW_FIELDS),
        )
        return int(cur.lastrowid)

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class LogReader:
    """A read-only connection to the result log, safe to share between threads (one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        self.lock = threading.Lock()

    def find_committed(self, sensor_id: str, seq: int, part_id: str) -> dict[str, Any] | None:
        """The first verdict committed for this protocol-2 frame (same sensor, seq and part), if any."""
        with self.lock:
            row = self.conn.execute(
                "SELECT id, header_json FROM verdicts WHERE sensor_id = ? AND seq = ? AND part_id = ? AND protocol = 2"
                " ORDER BY id LIMIT 1",
                (sensor_id, seq, part_id),
            ).fetchone()
        if row is None:
            return None
        header = json.loads(row[1])
        header["verdict_id"] = row[0]
        return header

    def last_seqs(self) -> dict[str, int]:
        """Each sensor's seq in its most recently committed verdict (gap detection after a restart)."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT sensor_id, seq FROM verdicts WHERE id IN"
                " (SELECT MAX(id) FROM verdicts WHERE sensor_id IS NOT NULL AND typeof(seq) = 'integer'"
                " GROUP BY sensor_id)"
            ).fetchall()
        return {str(s): int(q) for s, q in rows}

    def page(
        self,
        sensor_id: str | None = None,
        after_id: int = 0,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Committed verdicts in log order (``verdict_id`` > ``after_id``), optionally one sensor's,
        optionally with ``since`` <= ``decided_at`` < ``until``; at most ``min(limit, MAX_PAGE)``."""
        where, args = ["id > ?"], [after_id]
        if sensor_id is not None:
            where.append("sensor_id = ?")
            args.append(sensor_id)
        if since is not None:
            where.append("decided_at >= ?")
            args.append(since)
        if until is not None:
            where.append("decided_at < ?")
            args.append(until)
        sql = f"SELECT id, header_json FROM verdicts WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        with self.lock:
            rows = self.conn.execute(sql, (*args, max(1, min(limit, MAX_PAGE)))).fetchall()
        out = []
        for row_id, text in rows:
            header = json.loads(text)
            header["verdict_id"] = row_id
            out.append(header)
        return out

    def shadow_rows(
        self, product: str, shadow_revision: str, live_revision: str, disagreeing: bool = False, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The newest shadow rows of one live/shadow pair (only those whose verdicts differ with
        ``disagreeing``), newest first, at most ``limit``."""
        where = "product = ? AND shadow_revision = ? AND live_revision = ?"
        if disagreeing:
            where += " AND shadow_error IS NULL AND live_verdict != shadow_verdict"
        sql = f"SELECT {', '.join(SHADOW_FIELDS)} FROM shadow_scores WHERE {where} ORDER BY id DESC LIMIT ?"
        with self.lock:
            rows = self.conn.execute(sql, (product, shadow_revision, live_revision, max(1, limit))).fetchall()
        return [dict(zip(SHADOW_FIELDS, row, strict=True)) for row in rows]

    def shadow_counts(self, product: str, shadow_revision: str, live_revision: str) -> dict[str, int]:
        """``compared`` (both scored), ``agreed`` (same verdict) and ``errors`` (the shadow failed)."""
        with self.lock:
            row = self.conn.execute(
                "SELECT SUM(shadow_error IS NULL), SUM(shadow_error IS NULL AND live_verdict = shadow_verdict),"
                " SUM(shadow_error IS NOT NULL) FROM shadow_scores"
                " WHERE product = ? AND shadow_revision = ? AND live_revision = ?",
                (product, shadow_revision, live_revision),
            ).fetchone()
        return {"compared": int(row[0] or 0), "agreed": int(row[1] or 0), "errors": int(row[2] or 0)}

    def close(self) -> None:
        with self.lock:
            self.conn.close()
