"""Every Prometheus metric of the daemon, defined in one place.

``daemon/http_api.py`` serves them on ``/metrics`` (Prometheus text format). Metrics live on a
private registry per daemon so tests can run several daemons in turn.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DaemonMetrics:
    """The daemon's metrics on their own registry."""

    def __init__(self, version: str) -> None:
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
            "Frame receipt to verdict published.",
            ["product"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "inspectd_stage_seconds", "Time per pipeline stage.", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.actor_restarts = Counter("inspectd_actor_restarts", "Scoring actors that died and were restarted.", registry=r)
        self.actors = Gauge("inspectd_actors", "Alive scoring actors, by inference backend.", ["backend"], registry=r)
        self.cold_start_verdicts = Counter(
            "inspectd_cold_start_verdicts", "Verdicts given by the cold-start (zero-shot) model.", ["product"], registry=r
        )
        self.marked_good = Counter("inspectd_marked_good", "Parts an operator marked good.", ["product"], registry=r)
        self.model_reloads = Counter("inspectd_model_reloads", "Live model switches.", ["product"], registry=r)
        self.connections_refused = Counter(
            "inspectd_connections_refused",
            "ZeroMQ connections refused at the handshake, by socket (ingest, verdicts) and reason.",
            ["socket", "reason"],
            registry=r,
        )
        self.ready = Gauge("inspectd_ready", "1 when actors are up and models loaded.", registry=r)
        build = Gauge("inspectd_build_info", "Version of the running daemon.", ["version"], registry=r)
        build.labels(version=version).set(1)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
