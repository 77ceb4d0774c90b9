"""The review station's reads of the result log: the queue, history, one verdict, product figures.

A read-only SQLite connection of its own (WAL: the emitter keeps writing meanwhile), shared
between the API threads under one lock. The queue is every verdict that needs a person
(``needs_review``: ``review`` verdicts and every cold-start verdict) of the last
``QUEUE_WINDOW_S`` without a label yet; the partial index on ``needs_review`` keeps it cheap on
a log of millions of rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from daemon.decision import clopper_pearson
from daemon.review.feed import summary

QUEUE_WINDOW_S = 7 * 86400.0
"""Verdicts older than this leave the queue (their maps may be gone: storage.maps_max_age_days)."""
MAX_ROWS = 500
HIST_BINS = 20

_UNLABELLED = "NOT EXISTS (SELECT 1 FROM labels l WHERE l.verdict_id = v.id)"
_LATEST_LABEL = ("SELECT label, kind, user, at, scan FROM labels WHERE verdict_id = ? ORDER BY id DESC LIMIT 1")


def _row(row_id: int, text: str, label: tuple | None = None) -> dict[str, Any]:
    out = summary({**json.loads(text), "verdict_id": row_id})
    out["label"] = dict(zip(("label", "kind", "user", "at"), label[:4], strict=True)) if label and label[0] else None
    return out


class ReviewQueries:
    """Reads for the station; ``labels`` (daemon.labels) must exist in the same file."""

    def __init__(self, results: str | Path) -> None:
        self.conn = sqlite3.connect(Path(results).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        self.lock = threading.Lock()

    def queue(self, now: float, product: str | None = None, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """The oldest waiting verdicts first, and how many wait in all."""
        where, args = ["v.needs_review = 1", "v.decided_at >= ?", _UNLABELLED], [now - QUEUE_WINDOW_S]
        if product:
            where.append("v.product = ?")
            args.append(product)
        cond = " AND ".join(where)
        with self.lock:
            rows = self.conn.execute(f"SELECT v.id, v.header_json FROM verdicts v WHERE {cond} ORDER BY v.id LIMIT ?",
                                     (*args, max(1, min(limit, MAX_ROWS)))).fetchall()
            total = self.conn.execute(f"SELECT COUNT(*) FROM verdicts v WHERE {cond}", args).fetchone()[0]
        return [_row(i, t) for i, t in rows], int(total)

    def waiting(self, now: float) -> dict[str, tuple[int, float]]:
        """Per product: (parts waiting, decided_at of the oldest) — for the metrics."""
        with self.lock:
            rows = self.conn.execute(
                f"SELECT v.product, COUNT(*), MIN(v.decided_at) FROM verdicts v WHERE v.needs_review = 1"
                f" AND v.decided_at >= ? AND {_UNLABELLED} GROUP BY v.product", (now - QUEUE_WINDOW_S,)).fetchall()
        return {str(p): (int(n), float(t)) for p, n, t in rows}

    def history(self, product: str | None = None, verdict: str | None = None, part_id: str | None = None,
                since: float | None = None, until: float | None = None, before_id: int | None = None,
                limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; ``part_id`` matches a substring; ``before_id`` pages further back."""
        where, args = ["1 = 1"], []
        for cond, value in (("v.product = ?", product), ("v.verdict = ?", verdict), ("v.decided_at >= ?", since),
                            ("v.decided_at < ?", until), ("v.id < ?", before_id)):
            if value is not None:
                where.append(cond)
                args.append(value)
        if part_id:
            where.append("instr(v.part_id, ?) > 0")
            args.append(part_id)
        sql = (f"SELECT v.id, v.header_json, l.label, l.kind, l.user, l.at FROM verdicts v LEFT JOIN labels l ON l.id ="
               f" (SELECT MAX(id) FROM labels WHERE verdict_id = v.id) WHERE {' AND '.join(where)} ORDER BY v.id DESC LIMIT ?")
        with self.lock:
            rows = self.conn.execute(sql, (*args, max(1, min(limit, MAX_ROWS)))).fetchall()
        return [_row(r[0], r[1], r[2:]) for r in rows]

    def verdict(self, verdict_id: int) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """The whole header of one verdict and its newest label, or None."""
        with self.lock:
            row = self.conn.execute("SELECT header_json FROM verdicts WHERE id = ?", (verdict_id,)).fetchone()
            label = self.conn.execute(_LATEST_LABEL, (verdict_id,)).fetchone()
        if row is None:
            return None
        header = {**json.loads(row[0]), "verdict_id": verdict_id}
        return header, dict(zip(("label", "kind", "user", "at", "scan"), label, strict=True)) if label else None

    def latest_for_part(self, product: str, part_id: str) -> int | None:
        """The newest verdict id of a part (mark-good names parts, not verdicts)."""
        with self.lock:
            row = self.conn.execute("SELECT MAX(id) FROM verdicts WHERE product = ? AND part_id = ?",
                                    (product, part_id)).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def products(self) -> list[str]:
        with self.lock:
            rows = self.conn.execute("SELECT DISTINCT product FROM verdicts WHERE product IS NOT NULL").fetchall()
        return sorted(str(r[0]) for r in rows)

    def product(self, product: str, now: float) -> dict[str, Any]:
        """Model, thresholds, counts, good vs confirmed-defective score histograms, FRR and escape rate."""
        with self.lock:
            latest = self.conn.execute(
                "SELECT header_json FROM verdicts WHERE product = ? AND score IS NOT NULL ORDER BY id DESC LIMIT 1",
                (product,)).fetchone()
            counts = dict(self.conn.execute("SELECT verdict, COUNT(*) FROM verdicts WHERE product = ? GROUP BY verdict",
                                            (product,)).fetchall())
            labelled = self.conn.execute(
                "SELECT l.label, v.verdict, v.score FROM labels l JOIN verdicts v ON v.id = l.verdict_id WHERE l.id IN"
                " (SELECT MAX(id) FROM labels WHERE product = ? AND verdict_id IS NOT NULL GROUP BY verdict_id)",
                (product,)).fetchall()
        h = json.loads(latest[0]) if latest else {}
        good = [(v, s) for lab, v, s in labelled if lab == "good"]
        bad = [(v, s) for lab, v, s in labelled if lab == "defective"]
        waiting = self.waiting(now).get(product, (0, now))
        return {
            "product": product,
            "model_version": h.get("model_version"), "model_revision": h.get("model_revision"),
            "scorer": h.get("scorer"), "zero_shot": bool(h.get("zero_shot")),
            "threshold": h.get("threshold"), "review_low": h.get("review_low"), "fail_from": h.get("fail_from"),
            "counts": {k: int(counts.get(k, 0)) for k in ("pass", "review", "fail", "error")},
            "queue": {"waiting": waiting[0], "oldest_wait_s": now - waiting[1] if waiting[0] else 0.0},
            "labelled": {"good": len(good), "defective": len(bad)},
            "histogram": histogram([s for _, s in good], [s for _, s in bad], h.get("threshold")),
            "false_reject": rate(sum(v == "fail" for v, _ in good), len(good)),
            "sent_to_review_good": rate(sum(v == "review" for v, _ in good), len(good)),
            "escape": rate(sum(v == "pass" for v, _ in bad), len(bad)),
        }

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def rate(k: int, n: int) -> dict[str, Any]:
    """k of n with its exact (Clopper-Pearson) 95 % interval; None figures when n is 0."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci95": None}
    return {"k": int(k), "n": int(n), "rate": k / n, "ci95": list(clopper_pearson(int(k), int(n)))}


def histogram(good: list[float | None], bad: list[float | None], threshold: float | None) -> dict[str, Any]:
    """Shared bins over the confirmed-good and confirmed-defective scores (the threshold inside the range)."""
    g = np.array([s for s in good if s is not None and np.isfinite(s)], dtype=np.float64)
    b = np.array([s for s in bad if s is not None and np.isfinite(s)], dtype=np.float64)
    every = np.concatenate([g, b, [threshold] if threshold is not None else []])
    if every.size == 0:
        return {"edges": [], "good": [], "defective": [], "threshold": threshold}
    lo, hi = float(every.min()), float(every.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    return {"edges": edges.tolist(), "good": np.histogram(g, edges)[0].tolist(),
            "defective": np.histogram(b, edges)[0].tolist(), "threshold": threshold}
