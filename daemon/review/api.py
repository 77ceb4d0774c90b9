"""The review station's JSON routes (under ``/v1/review/``) and its metrics.

Reads: the queue, history, one part with its map drawn on it, product figures. Write: a
person's decision on a verdict (``POST /v1/review/parts/<verdict_id>/label``), stored with
the caller's token name as ``user`` (``daemon.labels``). A ``good`` decision on a cold-start
part also collects the scan for ``inspectd enroll`` (``cold_start.collect_dir``), like
``inspectd mark-good``. Routes and bodies: docs/protocol.md, "Review station".
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from daemon.config import Config
from daemon.labels import Label, LabelStore
from daemon.metrics import DaemonMetrics
from daemon.review.queries import ReviewQueries
from daemon.review.view import load_scan, part_view
from daemon.security import valid_part_id, valid_product
from sensors.frame import Frame

PART_ROUTE = re.compile(r"/v1/review/parts/(\d{1,18})(/label)?\Z")
PRODUCT_ROUTE = re.compile(r"/v1/review/products/([^/]+)\Z")
METRICS_EVERY_S = 2.0
MAX_REGION = 4_000_000
log = logging.getLogger("inspectd.review")

#: ``collect(product, part_id, points_mm)`` writes a good cold-start part for enrollment; returns its path.
Collect = Callable[[str, str, np.ndarray | None], str | None]


def _q(query: dict[str, list[str]], name: str) -> str | None:
    v = query.get(name)
    return v[0] if v else None


def _num(query: dict[str, list[str]], name: str, kind: type = float) -> Any:
    v = _q(query, name)
    return None if v in (None, "") else kind(v)


def region_of(body: dict[str, Any]) -> list[int] | None | str:
    """The marked indices from ``region`` (a list) or ``region_runs`` (``[[start, length], ...]``,
    compact for painted image areas); a string says what is wrong."""
    region, runs = body.get("region"), body.get("region_runs")
    if runs:
        if not isinstance(runs, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x >= 0 for x in r) for r in runs):
            return "region_runs must be a list of [start, length] pairs of non-negative integers"
        if sum(r[1] for r in runs) > MAX_REGION:
            return f"a region holds at most {MAX_REGION} indices"
        region = [i for start, n in runs for i in range(start, start + n)] + list(region or [])
    if region is not None and (not isinstance(region, list) or len(region) > MAX_REGION):
        return "region must be a list of point or pixel indices"
    return sorted(set(region)) if region else None


class ReviewApi:
    """Handles ``/v1/review/...``; ``open`` once the result log exists (the service's start)."""

    def __init__(self, cfg: Config, metrics: DaemonMetrics, held: Callable[[str, str], Frame | None],
                 collect: Collect) -> None:
        self.cfg, self.metrics, self.held, self.collect = cfg, metrics, held, collect
        self.store: LabelStore | None = None
        self.db: ReviewQueries | None = None
        self._metrics_at = 0.0
        self._seen: set[str] = set()

    def open(self) -> None:
        self.store = LabelStore(self.cfg.storage.results, Path(self.cfg.storage.data_dir) / "labels")
        self.db = ReviewQueries(self.cfg.storage.results)

    def close(self) -> None:
        for x in (self.store, self.db):
            if x is not None:
                x.close()

    # ------------------------------------------------------------------ routes
    def handle(self, method: str, path: str, query: str, body: Any, who: str) -> tuple[int, dict[str, Any]]:
        if self.db is None or self.store is None:
            return 503, {"error": "the daemon is starting"}
        q = parse_qs(query, keep_blank_values=False)
        try:
            return self._route(method, path, q, body, who)
        except ValueError as e:
            return 400, {"error": str(e)[:300]}

    def _route(self, method: str, path: str, q: dict[str, list[str]], body: Any, who: str) -> tuple[int, dict]:
        assert self.db is not None
        now = time.time()
        if method == "GET" and path == "/v1/review/queue":
            items, total = self.db.queue(now, _q(q, "product"), _num(q, "limit", int) or 100)
            return 200, {"items": items, "waiting": total, "now": now}
        if method == "GET" and path == "/v1/review/history":
            items = self.db.history(_q(q, "product") or None, _q(q, "verdict") or None, _q(q, "part_id") or None,
                                    _num(q, "since"), _num(q, "until"), _num(q, "before_id", int),
                                    _num(q, "limit", int) or 100)
            return 200, {"items": items, "now": now}
        if method == "GET" and path == "/v1/review/products":
            return 200, {"products": self.db.products()}
        if method == "GET" and (m := PRODUCT_ROUTE.match(path)):
            if not valid_product(m.group(1)):
                return 400, {"error": "not a valid product name"}
            return 200, self.db.product(m.group(1), now)
        m = PART_ROUTE.match(path)
        if m is None:
            return 404, {"error": f"no route {method} {path}"}
        found = self.db.verdict(int(m.group(1)))
        if found is None:
            return 404, {"error": f"no verdict {m.group(1)}"}
        header, label = found
        if method == "GET" and not m.group(2):
            return 200, {"verdict": header, "label": label, "view": self._view(header)}
        if method == "POST" and m.group(2):
            return self.decide(header, body, who)
        return 404, {"error": f"no route {method} {path}"}

    def _points(self, header: dict[str, Any]) -> tuple[np.ndarray | None, tuple | None]:
        """The scan's points in mm: from the map file, else from a held cold-start frame."""
        scan = load_scan(header.get("map_path"), self.cfg.storage.maps_dir)
        if scan is not None and scan[1] is not None:
            return scan[1], scan
        frame = self.held(str(header.get("product")), str(header.get("part_id")))
        return (frame.in_mm().points.reshape(-1, 3) if frame is not None else None), scan

    def _view(self, header: dict[str, Any]) -> dict[str, Any]:
        points, scan = self._points(header)
        if scan is None:
            return {"kind": "none", "why": "no map file for this verdict (storage.maps policy or retention)"}
        return part_view(scan[0], points, scan[2])

    # ------------------------------------------------------------------ decisions
    def decide(self, header: dict[str, Any], body: Any, who: str) -> tuple[int, dict[str, Any]]:
        """Store a person's decision on one verdict; a good cold-start part is also collected."""
        if not isinstance(body, dict) or body.get("label") not in ("good", "defective"):
            return 400, {"error": 'body must be {"label": "good"|"defective", "kind": str?, "region": [int]?}'}
        kind = body.get("kind") or None
        if kind is not None and not isinstance(kind, str):
            return 400, {"error": "kind must be a string"}
        region = region_of(body)
        if isinstance(region, str):
            return 400, {"error": region}
        points, _ = self._points(header)
        if points is None:
            return 409, {"error": "the scan of this part is no longer kept (no map file, not held): it cannot be labelled"}
        return self.record(header, body["label"], kind, region, points, who)

    def record(self, header: dict[str, Any], label: str, kind: str | None, region: list[int] | None,
               points: np.ndarray, who: str) -> tuple[int, dict[str, Any]]:
        assert self.store is not None
        product, part_id = str(header.get("product")), str(header.get("part_id"))
        if not valid_product(product) or not valid_part_id(part_id):
            return 400, {"error": "this verdict's product or part id cannot be labelled"}
        now = time.time()
        stored = self.store.add(Label(
            product=product, part_id=part_id, sensor_id=header.get("sensor_id"), seq=header.get("seq"), label=label,
            kind=kind, region=region, user=who, at=now, model_version=header.get("model_version"),
            object_score=header.get("score")), points, verdict_id=header.get("verdict_id"))
        plabel = self.metrics.product_label(product)
        self.metrics.labels_stored.labels(product=plabel, label=label).inc()
        if isinstance(header.get("decided_at"), (int, float)):
            self.metrics.review_wait.labels(product=plabel).observe(max(0.0, now - header["decided_at"]))
        reply: dict[str, Any] = {"label": label, "kind": kind, "user": who, "scan": stored.scan,
                                 "verdict_id": header.get("verdict_id")}
        if label == "good" and header.get("zero_shot"):
            reply["collected"] = self.collect(product, part_id, points)
        log.info("%s labelled %s/%s %s%s", who, product, part_id, label, f" ({kind})" if kind else "")
        self._metrics_at = 0.0  # the queue changed: the next scrape recounts
        return 200, reply

    def label_part(self, product: str, part_id: str, points: np.ndarray, who: str) -> str | None:
        """``inspectd mark-good``'s label: the part's newest verdict, labelled good; the scan path."""
        assert self.db is not None
        vid = self.db.latest_for_part(product, part_id)
        found = self.db.verdict(vid) if vid is not None else None
        header = found[0] if found else {"product": product, "part_id": part_id, "verdict_id": None}
        status, reply = self.record({**header, "zero_shot": False}, "good", None, None, points, who)
        return reply.get("scan") if status == 200 else None

    # ------------------------------------------------------------------ metrics
    def refresh_metrics(self) -> None:
        """Queue length and oldest wait per product, recounted at most every ``METRICS_EVERY_S``."""
        now = time.time()
        if self.db is None or now - self._metrics_at < METRICS_EVERY_S:
            return
        self._metrics_at = now
        try:
            waiting = self.db.waiting(now)
        except Exception:  # a busy or missing table must not break /metrics
            log.exception("cannot count the review queue")
            return
        per: dict[str, tuple[int, float]] = {}
        for product, (n, oldest) in waiting.items():
            label = self.metrics.product_label(product)
            m, o = per.get(label, (0, now))
            per[label] = (m + n, min(o, oldest))
        for label in set(per) - self._seen:  # decision series exist (at 0) before the first decision
            self.metrics.review_wait.labels(product=label)
            for kind in ("good", "defective"):
                self.metrics.labels_stored.labels(product=label, label=kind)
        for label in self._seen | set(per):
            n, oldest = per.get(label, (0, now))
            self.metrics.review_queue.labels(product=label).set(n)
            self.metrics.review_oldest.labels(product=label).set(max(0.0, now - oldest) if n else 0.0)
        self._seen |= set(per)
