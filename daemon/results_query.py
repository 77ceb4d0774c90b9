"""Results out of the SQLite result log: filtered export (CSV, JSON lines) and retention.

Export opens the log read-only (``file:...?mode=ro``), so it is safe beside the running daemon
(WAL: readers never block the writer). Retention (``prune``) deletes the oldest rows, and the
anomaly-map files their ``map_path`` names, by age and/or until the log and its maps fit a byte
budget. The schema is daemon/resultlog.py's; docs/mes-integration.md documents both.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

COLUMNS = (
    "id", "decided_at", "part_id", "product", "sensor_id", "seq", "verdict", "score", "threshold", "scorer",
    "model_version", "error_reason", "error_detail", "capture_time", "received_at", "latency_ms", "map_path",
)
"""Exported columns, in order; the ``*_time`` / ``*_at`` ones as ISO 8601 UTC strings."""
TIME_COLUMNS = ("decided_at", "capture_time", "received_at")
MAP_SUFFIXES = (".npz", ".png", ".ply")
"""The files daemon/maps.py writes for one verdict share a stem: ``<part>.npz`` + ``.png`` or ``.ply``."""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.IGNORECASE)
_UNIT_B = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` → seconds."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError(f"bad duration {text!r} (expected e.g. 90s, 15m, 12h, 30d, 2w)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1.5GiB``, ``1000000`` → bytes (binary units)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (expected e.g. 500M, 2G, 1048576)")
    return int(float(m.group(1)) * _UNIT_B[m.group(2).lower()])


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time → Unix seconds: ISO 8601 (UTC unless it has an offset), Unix seconds,
    or a duration meaning that long ago (``2h`` = two hours before now)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if _DURATION.match(text.lower()):
        return (time.time() if now is None else now) - parse_duration(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r} (expected ISO 8601, Unix seconds, or a duration ago such as 2h)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def iso(ts: float | None) -> str | None:
    """Unix seconds → ``2026-12-03T08:15:02.123Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to the result log (never creates or changes it)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no result log at {p}")
    conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


@dataclass(frozen=True)
class Filters:
    """Which verdicts to export; every field optional, all given ones must hold."""

    since: float | None = None
    until: float | None = None
    product: str | None = None
    verdict: str | None = None
    part_id: str | None = None
    limit: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for sql, value in (
            ("decided_at >= ?", self.since), ("decided_at < ?", self.until), ("product = ?", self.product),
            ("verdict = ?", self.verdict), ("part_id = ?", self.part_id),
        ):
            if value is not None:
                clauses.append(sql)
                args.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def query(log: str | Path, filters: Filters) -> Iterator[dict[str, Any]]:
    """The verdicts matching ``filters``, oldest first, as dicts of ``COLUMNS`` (times as ISO strings)."""
    where, args = filters.where()
    sql = f"SELECT {', '.join(COLUMNS)} FROM verdicts{where} ORDER BY decided_at, id"
    if filters.limit is not None:
        sql += " LIMIT ?"
        args.append(filters.limit)
    conn = open_readonly(log)
    try:
        for row in conn.execute(sql, args):
            rec = dict(row)
            for col in TIME_COLUMNS:
                rec[col] = iso(rec[col])
            yield rec
    finally:
        conn.close()


def export(rows: Iterator[dict[str, Any]], fmt: str, out: IO[str] | None = None) -> int:
    """Write ``rows`` as CSV (a header line, then one line per verdict) or JSON lines to ``out``
    (default stdout); returns the count."""
    out = sys.stdout if out is None else out
    n = 0
    if fmt == "csv":
        w = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for rec in rows:
            w.writerow(rec)
            n += 1
    elif fmt == "jsonl":
        for rec in rows:
            out.write(json.dumps(rec) + "\n")
            n += 1
    else:
        raise ValueError(f"unknown format {fmt!r} (csv or jsonl)")
    return n


def map_files(map_path: str | None) -> list[Path]:
    """The files one verdict's anomaly map occupies (npz + png or ply), those that exist."""
    if not map_path:
        return []
    p = Path(map_path)
    return [f for f in (p.with_suffix(s) for s in MAP_SUFFIXES) if f.is_file()]


def prune(
    log: str | Path, older_than_s: float | None = None, max_bytes: int | None = None,
    dry_run: bool = False, now: float | None = None, batch: int = 500,
) -> dict[str, Any]:
    """Delete rows decided more than ``older_than_s`` ago, then the oldest rows until the log file
    plus the map files of the remaining rows fit in ``max_bytes``; delete the map files of every
    deleted row. Rows are deleted oldest first, in batches (each its own short transaction, so the
    running daemon's writes wait at most one batch). Returns what it removed (or would, ``dry_run``).

    Byte accounting: the maps' sizes on disk plus the database's pages in use (SQLite reuses the
    pages of deleted rows; ``VACUUM`` would shrink the file, which ``vacuum`` in the CLI runs)."""
    if older_than_s is None and max_bytes is None:
        raise ValueError("give --older-than and/or --max-bytes")
    p = Path(log)
    if not p.is_file():
        raise FileNotFoundError(f"no result log at {p}")
    now = time.time() if now is None else now
    conn = sqlite3.connect(str(p), timeout=30, isolation_level=None)
    try:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = conn.execute("SELECT id, decided_at, map_path FROM verdicts ORDER BY decided_at, id").fetchall()
        n_rows = len(rows)
        db_used = (conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]) * page
        row_bytes = db_used / n_rows if n_rows else 0.0
        sizes = [sum(f.stat().st_size for f in map_files(m)) for _, _, m in rows]
        cut = 0
        if older_than_s is not None:
            limit = now - older_than_s
            while cut < n_rows and rows[cut][1] < limit:
                cut += 1
        if max_bytes is not None:
            total = db_used + sum(sizes)
            total -= sum(sizes[:cut]) + row_bytes * cut
            while cut < n_rows and total > max_bytes:
                total -= sizes[cut] + row_bytes
                cut += 1
        doomed = rows[:cut]
        report = {
            "rows_deleted": len(doomed),
            "maps_deleted": sum(len(map_files(m)) for _, _, m in doomed),
            "map_bytes_freed": int(sum(sizes[:cut])),
            "rows_left": n_rows - len(doomed),
            "oldest_left": iso(rows[cut][1]) if cut < n_rows else None,
            "dry_run": dry_run,
        }
        if dry_run:
            return report
        for i in range(0, len(doomed), batch):
            chunk = doomed[i : i + batch]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM verdicts WHERE id = ?", [(r[0],) for r in chunk])
            conn.execute("COMMIT")
            for _, _, m in chunk:  # after the commit: a crash leaves orphan maps, never rows without maps
                for f in map_files(m):
                    f.unlink(missing_ok=True)
        return report
    finally:
        conn.close()


def vacuum(log: str | Path) -> int:
    """Rewrite the log file to its used size (brief exclusive lock); returns the bytes it shrank by."""
    p = Path(log)
    before = p.stat().st_size
    conn = sqlite3.connect(str(p), timeout=30, isolation_level=None)
    try:
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return before - p.stat().st_size
