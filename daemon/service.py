"""The inspection service: ingest → queue → Ray actors → decision → log → publish.

Three threads, each owning what it touches, so no socket is shared:

* ingest: owns the PULL socket. Decodes and validates each message (``sensors.wire``);
  a refused message becomes an error verdict at once. Valid frames go into a bounded queue;
  when it is full, ingest stops reading (ZeroMQ's high-water marks then block the sensors'
  sends: backpressure), and a frame that still finds no room after ``ingest.max_wait_ms`` is
  answered with an ``overloaded`` error verdict.
* dispatch: feeds the actor pool, collects results, retries frames whose actor died, and
  applies the decision stage.
* emitter (``daemon.emitter``): owns the PUB socket and the result log. For each verdict it
  writes the map files, commits the log row, then publishes, in that order; scored verdicts
  go before error verdicts (``daemon.lanes``).

Every message that arrives gets exactly one verdict: each path above ends in ``_emit``. The
threads' loops are in ``daemon.loops``; this module builds the service and runs its life cycle.

Protocol 2 (docs/protocol.md): after the log commit the emitter also publishes an
acknowledgement to the frame's sensor; a resent frame is answered from memory or from the log
(``daemon.delivery``), and ``GET /v1/verdicts`` replays the log to subscribers that were away.

Life cycle: a thread that dies sets ``failed`` and ``inspectd run`` exits 1 (systemd restarts
it; protocol-2 sensors resend). On SIGTERM ingest unbinds its endpoint (no new frames), reads
what is already in the ZeroMQ pipe, and the threads finish in order (ingest, dispatch,
emitter) before the log and Ray close; ``stop`` returns how many frames were left unanswered.

Cold start: a product with no model of its own, listed under ``products:`` or matching
``cold_start.products``, is scored by the cold-start model (``<models_dir>/_zeroshot``); its
verdicts say ``"zero_shot": true`` and are ``review`` unless it matches ``cold_start.pass_fail``.
Any other unknown name is refused with ``unknown_product``. The daemon holds its
recent frames so an operator can mark good ones (``POST /v1/products/<p>/good``, or
``inspectd mark-good``); ``inspectd enroll --notify`` then makes every actor load the new
model (``POST /v1/products/<p>/reload``, which points the product's ``current`` revision at
the new one and ships it to the actors through Ray, ``daemon.pool``, so an actor Ray restarts
later, on any node, loads it too). Frames keep flowing meanwhile:
each verdict uses the model, and that model's threshold, which scored it. A product may also
have a shadow model, scored beside the live one without deciding, then promoted or rolled
back (``daemon.model_updates``, ``daemon.shadow``, docs/model-updates.md).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import ray
import zmq

from daemon.api import ServiceApi
from daemon.audit import AuditLog
from daemon.config import Config, held_frames, pub_hwm
from daemon.decision import Thresholds, thresholds_from
from daemon.delivery import Delivery
from daemon.emitter import Emitter
from daemon.http_api import HttpApi
from daemon.lanes import EmitLanes
from daemon.loops import STOP, ServiceLoops
from daemon.maps import MapRetention
from daemon.metrics import DaemonMetrics
from daemon.pool import ActorPool, Job
from daemon.resultlog import LogReader, ResultLog
from daemon.review.api import ReviewApi
from daemon.review.feed import Feed
from daemon.security import (
    enforce_safe_defaults,
    ray_init_kwargs,
    secure_sockets,
)
from sensors.frame import Frame
from sensors.wire import max_part_bytes
from workers.base import read_meta
from workers.model_store import (
    CURRENT,
    ZERO_SHOT_MODEL,
    check_models_dir,
    enrolled_products,
    has_model,
    read_pointer,
    revision_dir,
)
from workers.model_versions import read_shadow, start_revision
from workers.registry import spec_differences

#: Test-only fault injection (tests/test_crash_recovery.py): "ingest-hang" or "emitter-die".
FAULT_ENV = "INSPECTD_TEST_FAULT_INJECTION"
#: A thread that has not gone round its loop for this long makes /readyz answer 503.
STALL_S = 10.0

log = logging.getLogger("inspectd.service")
VERSION = "0.1.0"


class InspectionService(ServiceApi, ServiceLoops):
    """The daemon: its construction and life cycle here, its threads in ``daemon.loops``, its API in
    ``daemon.api``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = DaemonMetrics(VERSION, cfg.ingest.sensors, cfg.ingest.max_sensor_labels, cfg.products)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.ingest.queue_size)
        self.large_queue: queue.Queue[Job] = queue.Queue(maxsize=max(1, cfg.workers.large_actors))
        self.retry_large: deque[Job] = deque()
        self.out = EmitLanes(scored_size=held_frames(cfg), errors_size=cfg.publish.error_queue)
        self.retention = MapRetention(cfg.storage.maps_dir, cfg.storage.maps_max_mb * 2**20,
                                      cfg.storage.maps_max_age_days * 86400.0)
        self.products: set[str] = set()
        self.cold_start = False
        self.held: OrderedDict[tuple[str, str], Frame] = OrderedDict()
        self.held_lock = threading.Lock()
        self.reload_lock = threading.Lock()
        enforce_safe_defaults(cfg)
        self.audit: AuditLog | None = None
        self.feed = Feed()
        self.review = ReviewApi(cfg, self.metrics, self.held_frame, self.collect_good)
        self.http = HttpApi(cfg.http, self._render_metrics, self.is_live, self.api, audit=lambda: self.audit,
                            feed=self.feed)
        self.ctx = zmq.Context()
        self.pool: ActorPool | None = None
        self.ingest_done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.failed = threading.Event()
        """Set when a daemon thread died: the process must exit non-zero."""
        self.beats: dict[str, float] = {}
        self.closed = False  # ingest has unbound its endpoint (stopping)
        self.taken = 0  # messages read from the PULL socket (ingest thread only)
        self.dropped_copies = 0  # resent copies answered by their original's ack (ingest thread only)
        self.reader: LogReader | None = None
        self.delivery: Delivery | None = None
        self.emitter: Emitter | None = None
        self.fault = os.environ.get(FAULT_ENV, "")

    # ---------------------------------------------------------------- life cycle
    def start(self, ready_timeout: float = 120.0) -> None:
        """Serve metrics, start Ray and the actors, bind the sockets, start the threads."""
        self.audit = AuditLog(self.cfg.storage.results)
        self.http.start()
        log.info("metrics on http://%s:%d/metrics", self.cfg.http.host, self.http.port)
        products = self._load_products()
        if not ray.is_initialized():
            embedded = self.cfg.ray.address is None
            ray.init(
                **ray_init_kwargs(self.cfg),
                num_cpus=self.cfg.ray.num_cpus,
                object_store_memory=self.cfg.ray.object_store_mb * 2**20 if embedded else None,
                logging_level=logging.WARNING,
                # Ray starts its workers 15 nice levels below their parent by default: the scoring
                # actors would then yield the CPU to every other process of the host, the daemon's
                # own threads included (preprocessing a 1920x1200 frame took 2x as long as
                # in-process). The actors run at the daemon's priority; the large-frame lane still
                # lowers its own (workers.large_nice). A cluster's nodes set it at `ray start`.
                # Replies up to 1 MiB (a 400x400 frame's map) come back inline, not through the
                # object store: 0.3-0.9 ms sooner (docs/design/daemon-path.md).
                _system_config={"worker_niceness": 0, "max_direct_call_object_size": 1 << 20} if embedded else None,
            )
        self.pool = ActorPool(self.cfg, products)
        self.pool.shadowed = {p for p in products if read_shadow(self.cfg.storage.models_dir, p)}
        infos = self.pool.wait_ready(ready_timeout)
        if self.cfg.ray.address is None and self.pool.lane is None:  # frames go through the store
            t0 = time.monotonic()
            try:
                warmed = self.pool.warm_store()
                log.info("object store warmed: %d MB in %.1f s", warmed // 2**20, time.monotonic() - t0)
            except Exception as e:  # only the first frames' speed depends on it
                log.warning("could not warm the object store: %s", e)
        self._update_actor_gauge()
        log.info("%d scoring actors ready (%s)", self.pool.size, ", ".join(sorted({i["backend"] for i in infos})))

        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, self.cfg.ingest.receive_hwm)
        self.pull.setsockopt(zmq.MAXMSGSIZE, max_part_bytes(self.cfg.ingest.max_points))
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, pub_hwm(self.cfg))
        self.pub.setsockopt(zmq.LINGER, 2000)
        self.gate = secure_sockets(self.ctx, self.cfg, self.pull, self.pub,
                                   lambda sock, why: self.metrics.connections_refused.labels(socket=sock, reason=why).inc())
        self.pull.bind(self.cfg.ingest.endpoint)
        self.pub.bind(self.cfg.publish.endpoint)
        self.results = ResultLog(self.cfg.storage.results)
        self.reader = LogReader(self.cfg.storage.results)
        self.review.open()
        self.delivery = Delivery(self.reader, self.metrics)
        self.metrics.watch_storage({"maps": self.cfg.storage.maps_dir, "results": self.cfg.storage.results.parent})
        self.emitter = Emitter(self.cfg, self.metrics, self.out, self.results, self.pub, self.retention, self.delivery,
                               self.feed)
        if self.fault:
            log.warning("TEST FAULT INJECTION ACTIVE: %s=%s", FAULT_ENV, self.fault)

        now = time.monotonic()
        for name, target in (("ingest", self._ingest_loop), ("dispatch", self._dispatch_loop), ("emitter", self._emit_loop)):
            self.beats[name] = now
            t = threading.Thread(target=self._supervise, args=(name, target), name=name, daemon=True)
            t.start()
            self.threads.append(t)
        self.ready.set()
        self.metrics.ready.set(1)
        log.info("ready: ingest %s, verdicts %s", self.cfg.ingest.endpoint, self.cfg.publish.endpoint)

    def stop(self, drain_timeout: float | None = None) -> int:
        """Stop taking frames, answer every frame taken (the ZeroMQ pipe's included), then release
        everything in order: sockets, the log (only once the emitter is done), Ray.

        Returns the number of frames taken and left unanswered (0: a clean stop). A thread still
        running at the deadline keeps its resources: the process is about to exit anyway."""
        timeout = self.cfg.shutdown.drain_timeout_s if drain_timeout is None else drain_timeout
        self.ready.clear()
        self.metrics.ready.set(0)
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        running = {t.name for t in self.threads if t.is_alive()}
        left = self.taken - self.dropped_copies - (self.emitter.answered if self.emitter else 0)
        if left or running:
            log.error("stop: %d frame(s) taken and left unanswered after %.0fs (threads still running: %s)",
                      left, timeout, ", ".join(sorted(running)) or "none")
        else:
            log.info("stop: drained, all %d frame(s) taken were answered", self.taken)
        if hasattr(self, "gate"):
            self.gate.stop()
        if "ingest" not in running and hasattr(self, "pull"):
            self.pull.close()
        if "emitter" not in running:
            if hasattr(self, "pub"):
                self.pub.close()  # LINGER: the last verdicts and acks still go out
            if hasattr(self, "results"):
                self.results.close()
        if self.reader is not None and "ingest" not in running:
            self.reader.close()
        if self.pool is not None:
            self.pool.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        if not running:
            self.ctx.term()
        self.http.stop()
        self.review.close()
        if self.audit is not None:
            self.audit.close()
        return max(left, 1 if running else 0)

    def _supervise(self, name: str, target: Any) -> None:
        """Run one daemon thread; if it dies, say so loudly and mark the daemon failed (exit 1)."""
        try:
            target()
        except BaseException:
            log.critical("the %s thread died; the daemon stops and exits 1 so that it is restarted", name, exc_info=True)
            self.metrics.thread_deaths.labels(thread=name).inc()
            self.ready.clear()
            self.metrics.ready.set(0)
            self.failed.set()
        finally:  # let the next thread in the chain finish what it has
            if name == "ingest":
                self.ingest_done.set()
            elif name == "dispatch":
                self.out.put(STOP)

    def is_live(self) -> bool:
        """/readyz: started and not stopping, ingest and the emitter going round their loops,
        no thread dead, at least one scoring actor alive."""
        if not self.ready.is_set() or self.failed.is_set() or not all(t.is_alive() for t in self.threads):
            return False
        now = time.monotonic()
        if any(now - self.beats.get(name, 0.0) > STALL_S for name in ("ingest", "emitter")):
            return False
        return self.pool is not None and sum(self.pool.alive_by_backend().values()) > 0

    def _load_products(self) -> list[str]:
        """Enrolled products, and whether a cold-start model serves the others."""
        models = self.cfg.storage.models_dir
        check_models_dir(models)
        enrolled = enrolled_products(models)
        self.products = set(enrolled)
        for name in enrolled:
            self.metrics.allow_product(name)
        self.cold_start = self.cfg.cold_start.enabled and has_model(models, ZERO_SHOT_MODEL)
        for product in enrolled + ([ZERO_SHOT_MODEL] if has_model(models, ZERO_SHOT_MODEL) else []):
            start_revision(models, product)  # the newest, unless rolled back from; restarted actors load it too
        for name, pc in self.cfg.products.items():
            if name not in enrolled:
                log.warning("product %s is configured but not enrolled in %s%s", name, models,
                            ": cold start" if self.cold_start else ": its frames are refused")
                continue
            served = read_meta(revision_dir(models, name, read_pointer(models, name, CURRENT)))
            if diffs := spec_differences(pc.scorer, served):
                log.warning("product %s is served by a model fitted otherwise than products.%s.scorer says (%s): "
                            "re-enroll it with `inspectd enroll --product %s`", name, name, "; ".join(diffs), name)
        log.info("products: %s; cold start %s", ", ".join(enrolled) or "(none)", "on" if self.cold_start else "off")
        return enrolled

    def thresholds_for(self, product: str, calibration: dict[str, Any] | None) -> Thresholds | None:
        """The config's override, else the threshold calibrated with the model that scored; the
        review band is placed with that calibration's good-part median (``daemon.decision``)."""
        pc = self.cfg.products.get(product)
        band = pc.review_band if pc and pc.review_band is not None else self.cfg.decision.review_band
        return thresholds_from(calibration, band, pc.threshold if pc else None)

    def routes_to_cold_start(self, product: str) -> bool:
        """Whether a product without a model may be scored by the cold-start model: it is listed
        under ``products:`` or matches ``cold_start.products``."""
        return self.cold_start and (
            product in self.cfg.products or any(fnmatch.fnmatchcase(product, p) for p in self.cfg.cold_start.products)
        )

    def cold_start_decides(self, product: str) -> bool:
        """Whether a cold-start product opted in to pass / fail (else its verdicts are review)."""
        return any(fnmatch.fnmatchcase(product, p) for p in self.cfg.cold_start.pass_fail)
