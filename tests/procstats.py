"""What the load tests measure about a running daemon: its RSS, its open files, its result log."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of one process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_rows(db: Path, where: str = "1", args: tuple = ()) -> int:
    """Rows of the daemon's result log matching ``where`` (read-only, WAL lets it read while the daemon writes)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM verdicts WHERE {where}", args).fetchone()[0])


def wait_rows(db: Path, n: int, timeout: float, where: str = "1", args: tuple = ()) -> int:
    """Wait until the log holds ``n`` matching rows (or ``timeout`` seconds pass without progress)."""
    last, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = log_rows(db, where, args)
        if rows >= n:
            return rows
        if rows != last:
            last, deadline = rows, time.monotonic() + timeout
        time.sleep(0.5)
    return log_rows(db, where, args)


def log_reasons(db: Path, where: str = "1") -> dict[str, int]:
    """Count of matching log rows by error reason (or verdict), for assertion messages."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        rows = conn.execute(f"SELECT COALESCE(error_reason, verdict), COUNT(*) FROM verdicts WHERE {where} GROUP BY 1")
        return dict(rows.fetchall())
