"""Every Prometheus metric of the daemon, defined in one place.

``daemon/http_api.py`` serves them on ``/metrics`` (Prometheus text format). Metrics live on a
private registry per daemon so tests can run several daemons in turn.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SHADOW_BUCKETS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0)
"""Scores in good-part standard deviations above the good-part median (``score_normalized``)."""
AGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REVIEW_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 8 * 3600.0, 24 * 3600.0, 72 * 3600.0)
OTHER = "other"
"""The label value of every sensor id or product outside the bounded sets."""


class DaemonMetrics:
    """The daemon's metrics on their own registry.

    Label values never come straight from the wire: ``product_label`` and ``sensor_label`` map
    anything outside a bounded set (enrolled or configured products; configured sensor ids plus
    the first ``max_sensor_labels`` others seen) to ``other``, so hostile input cannot grow
    ``/metrics``."""

    def __init__(
        self, version: str, sensors: Iterable[str] = (), max_sensor_labels: int = 16, products: Iterable[str] = ()
    ) -> None:
        self._lock = threading.Lock()
        self._sensors = set(sensors)
        self._extra_sensors = max_sensor_labels
        self._products = set(products)
        r = self.registry = CollectorRegistry()
        self.frames_received = Counter(
            "inspectd_frames_received", "Frame messages received on ingest.", ["sensor_id"], registry=r
        )
        self.frames_refused = Counter(
            "inspectd_frames_refused", "Frames answered with an error verdict, by reason.", ["reason"], registry=r
        )
        self.verdicts = Counter(
            "inspectd_verdicts", "Verdicts published, by product and outcome.", ["product", "verdict"], registry=r
        )
        self.queue_depth = Gauge("inspectd_queue_depth", "Frames decoded and waiting for a worker.", registry=r)
        self.inflight = Gauge("inspectd_inflight_frames", "Frames being scored by actors.", registry=r)
        self.latency = Histogram(
            "inspectd_latency_seconds",
            "Frame capture (its capture_time) to verdict published.",
            ["product"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "inspectd_stage_seconds", "Time per pipeline stage.", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.actor_restarts = Counter("inspectd_actor_restarts", "Scoring actors that died and were restarted.", registry=r)
        self.handover_calls = Counter(
            "inspectd_handover_calls", "Calls to the scoring actors, by how their frames reached them "
            "(shared_memory, or object_store: a Ray call).", ["way"], registry=r)
        self.actors = Gauge("inspectd_actors", "Alive scoring actors, by inference backend.", ["backend"], registry=r)
        self.cold_start_verdicts = Counter(
            "inspectd_cold_start_verdicts", "Verdicts given by the cold-start (zero-shot) model.", ["product"], registry=r
        )
        self.marked_good = Counter("inspectd_marked_good", "Parts an operator marked good.", ["product"], registry=r)
        self.model_reloads = Counter("inspectd_model_reloads", "Live model switches.", ["product"], registry=r)
        self.shadow_agreement = Counter(
            "inspectd_shadow_agreement",
            "Frames a shadow model scored beside the live one, by whether its would-be verdict agreed (yes, no).",
            ["product", "agree"], registry=r,
        )
        self.shadow_errors = Counter(
            "inspectd_shadow_errors", "Frames a shadow model failed to score (the live verdict stands).",
            ["product"], registry=r,
        )
        self.shadow_score = Histogram(
            "inspectd_shadow_score",
            "Normalized object scores of the frames a shadow model scored, by model (live, shadow).",
            ["product", "model"], buckets=SHADOW_BUCKETS, registry=r,
        )
        self.seq_gaps = Counter(
            "inspectd_seq_gaps", "Jumps in a sensor's seq (frames that never reached the daemon).", registry=r
        )
        self.seq_missing = Counter("inspectd_seq_missing", "Seq numbers skipped by those jumps.", registry=r)
        self.duplicates = Counter(
            "inspectd_duplicate_frames",
            "Resent protocol-2 frames answered with their original verdict, not scored again.",
            ["found"],
            registry=r,
        )
        self.acks = Counter("inspectd_acks", "Acknowledgements published to protocol-2 sensors.", registry=r)
        self.thread_deaths = Counter(
            "inspectd_thread_deaths", "Daemon threads that died of an exception (the daemon then exits 1).",
            ["thread"], registry=r,
        )
        self.connections_refused = Counter(
            "inspectd_connections_refused",
            "ZeroMQ connections refused at the handshake, by socket (ingest, verdicts) and reason.",
            ["socket", "reason"],
            registry=r,
        )
        self.ready = Gauge("inspectd_ready", "1 when actors are up and models loaded.", registry=r)
        build = Gauge("inspectd_build_info", "Version of the running daemon.", ["version"], registry=r)
        build.labels(version=version).set(1)
        self.frame_age = Histogram(
            "inspectd_frame_age_seconds",
            "Frame capture to ingest dequeue: time spent in the sensor's and ZeroMQ's buffers.",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.map_write_failures = Counter(
            "inspectd_map_write_failures", "Map files that could not be written (verdict sent without map_path).",
            registry=r,
        )
        self.log_failures = Counter(
            "inspectd_log_failures", "Verdicts the result log could not commit (answered log_failed).", registry=r
        )
        self.maps_pruned = Counter("inspectd_maps_pruned", "Map files deleted by the retention policy.", registry=r)
        self.emit_queue = Gauge("inspectd_emit_queue", "Verdicts waiting for the emitter, by lane.", ["lane"], registry=r)
        self.storage_free = Gauge(
            "inspectd_storage_free_bytes", "Free bytes on the file system of maps or results.", ["volume"], registry=r
        )
        self.storage_size = Gauge(
            "inspectd_storage_size_bytes", "Size of the file system of maps or results.", ["volume"], registry=r
        )
        self.review_queue = Gauge(
            "inspectd_review_queue_parts", "Parts waiting for a person's decision (review and cold-start "
            "verdicts of the last 7 days without a label).", ["product"], registry=r,
        )
        self.review_oldest = Gauge(
            "inspectd_review_oldest_wait_seconds", "How long the oldest part in the review queue has waited.",
            ["product"], registry=r,
        )
        self.review_wait = Histogram(
            "inspectd_review_wait_seconds", "Verdict to a person's decision on it.", ["product"],
            buckets=REVIEW_BUCKETS, registry=r,
        )
        self.labels_stored = Counter(
            "inspectd_labels", "Operator decisions stored, by label (good, defective).", ["product", "label"], registry=r
        )

    def watch_storage(self, volumes: dict[str, Path]) -> None:
        """Report free and total bytes of each volume's file system at every scrape."""
        for name, path in volumes.items():
            self.storage_free.labels(volume=name).set_function(lambda p=path: _disk(p)[0])
            self.storage_size.labels(volume=name).set_function(lambda p=path: _disk(p)[1])

    def allow_product(self, product: str) -> None:
        """Give an enrolled or configured product its own label value."""
        with self._lock:
            self._products.add(product)

    def product_label(self, product: str | None) -> str:
        """``product`` if it is enrolled or configured, else ``other``."""
        return product if product in self._products else OTHER

    def sensor_label(self, sensor_id: object) -> str:
        """A configured sensor id, one of the first ``max_sensor_labels`` others seen, or ``other``."""
        if not isinstance(sensor_id, str):
            return OTHER
        with self._lock:
            if sensor_id in self._sensors:
                return sensor_id
            if self._extra_sensors > 0 and sensor_id != OTHER:
                self._extra_sensors -= 1
                self._sensors.add(sensor_id)
                return sensor_id
        return OTHER

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _disk(path: Path) -> tuple[float, float]:
    """(free, total) bytes of the file system holding ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return float("nan"), float("nan")
    return float(usage.free), float(usage.total)
