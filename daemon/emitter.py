"""The emitter: the one thread that writes map files, commits the result log and publishes.

For each verdict, in this order: the map files (a failure, a full disk for one, leaves
``map_path`` null and is counted), the log row (a failed commit turns the verdict into an error
verdict ``log_failed``, counted), then the PUB socket. Whatever fails, exactly one verdict is
published. Verdicts come from ``EmitLanes``: scored ones before errors. Map files are kept
within the retention budget (bytes and age).

Protocol 2 (``daemon.delivery``): once a verdict is committed its frame is acknowledged on the
PUB socket; a verdict that could not be committed releases its frame, so a resend is taken as
new; a resent frame already in the log gets its original verdict again (``Republish``).

A verdict scored beside a shadow model comes with its shadow row (``daemon.shadow``), written
to the log's ``shadow_scores`` table once the verdict is committed; a failure there is logged
and never touches the verdict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from daemon.config import Config
from daemon.delivery import Delivery, Republish
from daemon.lanes import ERRORS, SCORED, EmitLanes
from daemon.maps import MapRetention, write_maps
from daemon.metrics import DaemonMetrics
from daemon.resultlog import ResultLog
from daemon.review.feed import Feed
from sensors.wire import encode_verdict

log = logging.getLogger("inspectd.emitter")
PRUNE_EVERY_S = 10.0


class Emitter:
    """Owns the PUB socket and the result log while it runs (one thread)."""

    def __init__(
        self, cfg: Config, metrics: DaemonMetrics, lanes: EmitLanes, results: ResultLog, pub: zmq.Socket,
        retention: MapRetention, delivery: Delivery | None = None, feed: Feed | None = None,
    ) -> None:
        self.cfg, self.metrics, self.lanes, self.results, self.pub = cfg, metrics, lanes, results, pub
        self.retention = retention
        self.delivery = delivery
        self.feed = feed
        """The review station's live feed (bounded per browser: never blocks this thread)."""
        self.answered = 0
        """Verdicts and republished verdicts sent (read by the service at stop)."""
        self._map_failures = 0

    def run(self, stop: object, beat: Callable[[], None] = lambda: None) -> None:
        """Emit verdicts, scored first, until ``stop`` comes; then the error verdicts still waiting.
        ``beat`` is called at least once a second while the loop is alive (for /readyz)."""
        stopping = False
        last_prune = time.monotonic()
        while True:
            beat()
            got = self.lanes.get(timeout=0 if stopping else 1.0)
            if got is None:
                if stopping:
                    return
            elif got[1] is stop:
                stopping = True  # ingest and dispatch are done: only error verdicts can be left
            elif isinstance(got[1], Republish):
                self.republish(got[1].header)
            else:
                self.emit_one(*got[1])
            for lane in (SCORED, ERRORS):
                self.metrics.emit_queue.labels(lane=lane).set(self.lanes.depth(lane))
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                self.metrics.maps_pruned.inc(self.retention.prune())

    def emit_one(
        self, header: dict[str, Any], amap: np.ndarray | None, frame: Any, timings: dict[str, float], mono: float | None,
        shadow: dict[str, Any] | None = None,
    ) -> None:
        """Record and publish one verdict (and its shadow row, if any); whatever fails, exactly
        one verdict is published."""
        try:
            header, amap = self._record(header, amap, frame, timings, mono)
        except Exception as e:  # a bug in recording: the frame is still answered
            log.exception("failed to record verdict for %s", header.get("part_id"))
            header, amap = self._fallback(header, "internal_error", repr(e)), None
        if shadow is not None and header.get("verdict_id") is not None and header["verdict"] != "error":
            try:
                self.results.append_shadow({**shadow, "verdict_id": header["verdict_id"],
                                            "decided_at": header["decided_at"]})
            except Exception:  # the shadow's record is lost, the live verdict goes out as it is
                log.exception("cannot record the shadow score of %s", header.get("part_id"))
        try:
            self._publish(header, amap, timings)
        except Exception as e:  # e.g. a header that cannot be encoded: publish its identity only
            log.exception("failed to publish verdict for %s", header.get("part_id"))
            self._publish(self._fallback(header, "internal_error", repr(e)), None, {})
        self.answered += 1
        if self.feed is not None:
            try:
                self.feed.publish(header)
            except Exception:  # the live feed is a convenience: the verdict is out already
                log.exception("live feed failed for %s", header.get("part_id"))
        if self.delivery is None:
            return
        if header.get("verdict_id") is None:  # not committed: a resend must be taken as new
            self.delivery.release(header)
            return
        ack = self.delivery.committed(header)
        if ack is not None:
            self.pub.send_multipart(ack)

    def republish(self, header: dict[str, Any]) -> None:
        """A resent protocol-2 frame: its original verdict again (without the map), and its ack."""
        try:
            self.pub.send_multipart(encode_verdict({**header, "republished": True}, None), copy=False)
            ack = self.delivery.committed(header) if self.delivery is not None else None
            if ack is not None:
                self.pub.send_multipart(ack)
        except Exception:
            log.exception("failed to republish verdict %s", header.get("verdict_id"))
        self.answered += 1

    def _fallback(self, header: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
        """An error verdict that keeps only the frame's plain identity fields."""
        self.metrics.frames_refused.labels(reason=reason).inc()
        keep = {k: header[k] for k in ("sensor_id", "product", "part_id", "seq", "capture_time") if k in header}
        now = time.time()
        return {
            **keep, "verdict": "error", "score": None, "threshold": None, "scorer": None, "model_version": None,
            "error": {"reason": reason, "detail": detail[:500]}, "received_at": header.get("received_at", now),
            "decided_at": now, "map_path": None, "verdict_id": header.get("verdict_id"),
        }

    def _write_map(self, header: dict[str, Any], amap: np.ndarray | None, frame: Any) -> str | None:
        """Write the map files the policy asks for; on failure (full or read-only disk) None, counted."""
        policy = self.cfg.storage.maps
        if amap is None or not (policy == "all" or (policy == "flagged" and header["verdict"] != "pass")):
            return None
        try:
            npz = write_maps(
                self.cfg.storage.maps_dir, header["product"], str(header["part_id"]), header["verdict"], amap,
                frame.in_mm().points.reshape(-1, 3), header["threshold"] or 0.0,
            )
        except Exception as e:
            self.metrics.map_write_failures.inc()
            if self._map_failures % 100 == 0:  # one line per 100 failures: a full disk must not flood the log
                log.warning("cannot write the map of %s (%d failures so far): %s",
                            header.get("part_id"), self._map_failures + 1, e)
            self._map_failures += 1
            return None
        self.retention.track(npz)
        if self.retention.total > self.retention.max_bytes:
            self.metrics.maps_pruned.inc(self.retention.prune())
        return str(npz)

    def _record(
        self, header: dict[str, Any], amap: np.ndarray | None, frame: Any, timings: dict[str, float], mono: float | None
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """Write the map files, then commit the log row. A failed commit turns the verdict into
        ``log_failed`` (the part's result cannot be vouched for later), which is still published."""
        t0 = time.monotonic()
        header["map_path"] = self._write_map(header, amap, frame)
        t1 = time.monotonic()
        timings["maps"] = t1 - t0
        header["decided_at"] = time.time()
        elapsed = t1 - mono if mono is not None else header["decided_at"] - header["received_at"]
        header["latency_ms"] = max(0.0, elapsed) * 1000.0
        header["stage_ms"] = {k: round(v * 1000.0, 3) for k, v in timings.items()}
        try:
            header["verdict_id"] = self.results.append(header)
        except Exception as e:
            self.metrics.log_failures.inc()
            log.error("result log commit failed for %s: %s", header.get("part_id"), e)
            failed = self._fallback(header, "log_failed", f"the result log could not commit: {e}")
            failed.update(latency_ms=header["latency_ms"], map_path=header["map_path"], verdict_id=None)
            return failed, None
        timings["log"] = time.monotonic() - t1
        return header, amap

    def _publish(self, header: dict[str, Any], amap: np.ndarray | None, timings: dict[str, float]) -> None:
        """Count the verdict, then send it (its map only with ``publish.maps: inline``): a
        subscriber that has the verdict finds it counted in /metrics."""
        message = encode_verdict(header, amap if self.cfg.publish.maps == "inline" else None)
        product = self.metrics.product_label(header.get("product"))
        self.metrics.verdicts.labels(product=product, verdict=header["verdict"]).inc()
        start = header.get("capture_time", header.get("received_at"))
        if isinstance(start, (int, float)):
            self.metrics.latency.labels(product=product).observe(max(0.0, time.time() - start))
        t0 = time.monotonic()
        self.pub.send_multipart(message, copy=False)
        timings["publish"] = time.monotonic() - t0
        self.metrics.observe_stages(timings)
