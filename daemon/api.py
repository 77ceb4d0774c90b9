"""The daemon's JSON API behind ``daemon.http_api``: products, verdict replay, marking a held
cold-start part good, the live model switches of ``daemon.model_updates`` (reload, shadow,
promote, rollback) with the shadow's report, and the review station's routes (``/v1/review/``,
``daemon.review.api``).

``ServiceApi`` is a part of ``InspectionService`` (``daemon.service``), kept in its own module so
each file reads on its own; it uses the service's config, pool, result-log reader and held
frames. Routes, bodies and answers: docs/protocol.md, "HTTP API".
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from daemon.model_updates import ModelUpdates
from daemon.replay import verdicts_page
from daemon.security import inside, valid_part_id, valid_product
from sensors.frame import Frame
from sensors.pointfiles import write_pcd, write_xyz_tiff

PRODUCT_ROUTE = re.compile(r"/v1/products/(.+)/(good|reload|shadow|unshadow|promote|rollback)\Z", re.DOTALL)

log = logging.getLogger("inspectd.service")


class ServiceApi(ModelUpdates):
    """``api(method, path, body) -> (status, JSON reply)``, the callback the HTTP server calls."""

    def api(self, method: str, path: str, body: Any, who: str = "anonymous") -> tuple[int, dict[str, Any]]:
        """``GET /v1/products``, ``GET /v1/actors``, ``GET /v1/verdicts?...``, ``GET /v1/shadow?product=P``,
        ``POST /v1/products/<p>/good``, ``POST /v1/products/<p>/<reload|shadow|unshadow|promote|rollback>``
        and ``/v1/review/...``. ``path`` may carry a query string; ``who`` is the caller's token name
        (the ``user`` of a label)."""
        path, _, query = path.partition("?")
        if path.startswith("/v1/review/"):
            return self.review.handle(method, path, query, body, who)
        if method == "GET" and path == "/v1/verdicts":
            return verdicts_page(self.reader, query)
        if method == "GET" and path == "/v1/actors":
            return 200, {"actors": self.pool.actor_table() if self.pool is not None else []}
        if method == "GET" and path == "/v1/products":
            with self.held_lock:
                held = sorted({p for p, _ in self.held})
            return 200, {"enrolled": sorted(self.products), "cold_start": self.cold_start, "held_cold_start": held}
        if method == "GET" and path == "/v1/shadow":
            return self.shadow_status(query)
        m = PRODUCT_ROUTE.match(path)
        if method != "POST" or m is None:
            return 404, {"error": f"no route {method} {path}"}
        product, action = m.groups()
        if not valid_product(product):
            return 400, {"error": f"product {product!r} is not a valid product name"}
        if action == "good":
            part_id = body.get("part_id") if isinstance(body, dict) else None
            if not isinstance(part_id, str):
                return 400, {"error": 'body must be {"part_id": "<id>"}'}
            if not valid_part_id(part_id):
                return 400, {"error": f"part id {part_id!r} is not a valid part id"}
            return self.mark_good(product, part_id, who)
        if action == "shadow":
            return self.start_shadow(product, body)
        if action == "unshadow":
            return self.stop_shadow(product)
        return {"reload": self.reload, "promote": self.promote, "rollback": self.rollback}[action](product)

    def held_frame(self, product: str, part_id: str) -> Frame | None:
        """A held cold-start frame, if it is still among the last ``cold_start.keep_frames``."""
        with self.held_lock:
            return self.held.get((product, part_id))

    def collect_good(self, product: str, part_id: str, points_mm: np.ndarray | None = None) -> str | None:
        """Write a good cold-start part to ``<collect_dir>/<product>/good/`` for a later
        ``inspectd enroll``: the held frame as sent, else ``points_mm`` (a stored scan) as PCD."""
        frame = self.held_frame(product, part_id)
        if frame is None and points_mm is None:
            return None
        folder = inside(self.cfg.cold_start.collect_dir, product, "good")
        folder.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", part_id)
        if frame is not None and frame.organized:
            path = inside(folder, f"{stem}.tiff")
            write_xyz_tiff(path, frame.points)
        elif frame is not None:
            path = inside(folder, f"{stem}.pcd")
            write_pcd(path, frame.points[frame.valid_mask()])
        else:
            pts = np.asarray(points_mm, dtype=np.float32).reshape(-1, 3)
            path = inside(folder, f"{stem}.pcd")
            write_pcd(path, pts[np.isfinite(pts).all(axis=1) & np.any(pts != 0, axis=1)])
        self.metrics.marked_good.labels(product=self.metrics.product_label(product)).inc()
        log.info("collected %s/%s for enrollment", product, part_id)
        return str(path)

    def mark_good(self, product: str, part_id: str, who: str = "anonymous") -> tuple[int, dict[str, Any]]:
        """Collect a held cold-start frame for enrollment and store the decision as a ``good``
        label (the one case of labelling that works by part id)."""
        frame = self.held_frame(product, part_id)
        if frame is None:
            return 404, {"error": f"part {part_id!r} of {product!r} is not held (only the last "
                                  f"{self.cfg.cold_start.keep_frames} cold-start parts are)"}
        path = self.collect_good(product, part_id)
        assert path is not None
        n = sum(1 for _ in inside(self.cfg.cold_start.collect_dir, product, "good").iterdir())
        label = self.review.label_part(product, part_id, frame.in_mm().points.reshape(-1, 3), who)
        return 200, {"saved": path, "collected": n, "label": label}

    def _render_metrics(self) -> bytes:
        """/metrics, with the review queue recounted first (at most every few seconds)."""
        self.review.refresh_metrics()
        return self.metrics.render()
