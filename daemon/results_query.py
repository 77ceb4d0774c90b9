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


def _oldest_first(conn: sqlite3.Connection, before: float | None, batch: int) -> Iterator[list[tuple]]:
    """``(id, decided_at, map_path)`` rows, oldest first, ``batch`` at a time. Oldest = lowest id:
    the daemon inserts verdicts in the order it decides them. Keyset pages on the primary key:
    memory stays bounded, and deleting a page already read does not disturb the next one."""
    last = -1
    while True:
        sql = "SELECT id, decided_at, map_path FROM verdicts WHERE id > ?"
        args: list[Any] = [last]
        if before is not None:
            sql += " AND decided_at < ?"
            args.append(before)
        page = conn.execute(sql + " ORDER BY id LIMIT ?", [*args, batch]).fetchall()
        if not page:
            return
        yield page
        last = page[-1][0]


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database's pages in use (the file minus its free pages, WAL included)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])


def prune(
    log: str | Path, older_than_s: float | None = None, max_bytes: int | None = None,
    dry_run: bool = False, now: float | None = None, batch: int = 500,
) -> dict[str, Any]:
    """Delete rows decided more than ``older_than_s`` ago, then the oldest rows until the log's
    pages in use plus the map files of the remaining rows fit in ``max_bytes``; delete the map
    files of every deleted row. Rows go oldest first, in batches, each its own short transaction
    (the running daemon's writes wait at most one batch). Returns what it removed (or would,
    with ``dry_run``). The database part is measured after each batch (pages in use; SQLite reuses
    freed pages, ``vacuum`` shrinks the file); a dry run estimates it at the average row size."""
    if older_than_s is None and max_bytes is None:
        raise ValueError("give --older-than and/or --max-bytes")
    p = Path(log)
    if not p.is_file():
        raise FileNotFoundError(f"no result log at {p}")
    now = time.time() if now is None else now
    conn = sqlite3.connect(str(p), timeout=30, isolation_level=None)
    report = {"rows_deleted": 0, "maps_deleted": 0, "map_bytes_freed": 0}
    shadows = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shadow_scores'").fetchone()

    def drop(rows: list[tuple]) -> int:
        """Delete ``rows`` and then their maps (a crash leaves an orphan map, never a row without
        its map); returns the map bytes freed."""
        files = [f for _, _, m in rows for f in map_files(m)]
        freed = sum(f.stat().st_size for f in files)
        report["rows_deleted"] += len(rows)
        report["maps_deleted"] += len(files)
        report["map_bytes_freed"] += freed
        if not dry_run:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM verdicts WHERE id = ?", [(r[0],) for r in rows])
            if shadows:  # a shadow model's scores go with the verdict they were recorded beside
                conn.executemany("DELETE FROM shadow_scores WHERE verdict_id = ?", [(r[0],) for r in rows])
            conn.execute("COMMIT")
            for f in files:
                f.unlink(missing_ok=True)
        return freed

    try:
        n_rows = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
        db = float(_used_bytes(conn))
        row_bytes = db / n_rows if n_rows else 0.0
        maps_total = sum(
            f.stat().st_size for (m,) in conn.execute("SELECT map_path FROM verdicts WHERE map_path IS NOT NULL")
            for f in map_files(m)
        )
        oldest_left = None
        cutoff = now - older_than_s if older_than_s is not None else None
        if cutoff is not None:
            for page in _oldest_first(conn, cutoff, batch):
                maps_total -= drop(page)
                db -= row_bytes * len(page)
        if max_bytes is not None:
            if not dry_run:
                db = _used_bytes(conn)
            last = -1
            while maps_total + db > max_bytes:
                page = conn.execute("SELECT id, decided_at, map_path FROM verdicts WHERE id > ? ORDER BY id LIMIT ?",
                                    (last, batch)).fetchall()
                if not page:
                    break
                doomed = []
                for row in page:
                    if maps_total + db <= max_bytes:
                        break
                    last = row[0]
                    if dry_run and cutoff is not None and row[1] < cutoff:
                        continue  # counted by the age pass already
                    doomed.append(row)
                    maps_total -= sum(f.stat().st_size for f in map_files(row[2]))
                    db -= row_bytes
                if doomed:
                    drop(doomed)
                if not dry_run:
                    db = _used_bytes(conn)  # measured: the pages SQLite actually freed
        if not dry_run:
            oldest_left = iso(conn.execute("SELECT MIN(decided_at) FROM verdicts").fetchone()[0])
        return {**report, "rows_left": n_rows - report["rows_deleted"], "oldest_left": oldest_left, "dry_run": dry_run}
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
