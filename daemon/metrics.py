"""Every Prometheus metric of the daemon, defined in one place, and the HTTP endpoint.

The HTTP server answers ``/metrics`` (Prometheus text format), ``/healthz`` (the process
answers) and ``/readyz`` (200 once the actors are up and models loaded, 503 before); every
path under ``/v1/`` goes to the service's JSON API callback (docs/protocol.md, "HTTP API").
Metrics live on a private registry per daemon so tests can run several daemons in turn.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
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
        self.ready = Gauge("inspectd_ready", "1 when actors are up and models loaded.", registry=r)
        build = Gauge("inspectd_build_info", "Version of the running daemon.", ["version"], registry=r)
        build.labels(version=version).set(1)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self.stage.labels(stage=stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A small threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(
        self,
        metrics: DaemonMetrics,
        host: str,
        port: int,
        is_ready: Callable[[], bool],
        api: Callable[[str, str, Any], tuple[int, dict[str, Any]]] | None = None,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _api(self, method: str, path: str) -> None:
                body: Any = None
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    try:
                        body = json.loads(self.rfile.read(length))
                    except ValueError:
                        self._send(400, b'{"error": "body is not JSON"}\n', "application/json")
                        return
                code, reply = api(method, path, body) if api else (404, {"error": "no API"})
                self._send(code, json.dumps(reply).encode() + b"\n", "application/json")

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path.startswith("/v1/"):
                    self._api("POST", path)
                else:
                    self._send(404, b"not found\n")

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path.startswith("/v1/"):
                    self._api("GET", self.path)  # the query string too: the service parses it
                elif path == "/metrics":
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok = outer.is_ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.is_ready = is_ready
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
