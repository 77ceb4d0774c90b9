"""The audit trail: one row per state-changing API call (who, from where, what, when, outcome).

It lives in its own table of the result log's SQLite file, written through its own connection
(WAL lets it and the verdict writer share the file), so an operator finds verdicts and the
actions that shaped them (parts marked good, model reloads) in one place.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    who     TEXT NOT NULL,
    peer    TEXT NOT NULL,
    action  TEXT NOT NULL,
    status  INTEGER NOT NULL,
    detail  TEXT
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (at);
"""


class AuditLog:
    """Appends audit rows; safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(str(p), check_same_thread=False, isolation_level=None, timeout=10.0)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def record(self, who: str, peer: str, action: str, status: int, detail: str = "") -> None:
        """Commit one row: ``who`` is the token's name (or ``unauthenticated``), ``peer`` host:port."""
        with self._lock:
            self.conn.execute(
                "INSERT INTO audit (at, who, peer, action, status, detail) VALUES (?,?,?,?,?,?)",
                (time.time(), who, peer, action, int(status), detail),
            )

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.conn.execute("SELECT id, at, who, peer, action, status, detail FROM audit ORDER BY id")
            names = [c[0] for c in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self.conn.close()
