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

Every message that arrives gets exactly one verdict: each path above ends in ``_emit``.

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

import numpy as np
import ray
import zmq

from daemon.api import ServiceApi
from daemon.audit import AuditLog
from daemon.config import Config, held_frames, pub_hwm
from daemon.decision import Thresholds, decide, thresholds_from
from daemon.delivery import Delivery, Republish, peek_protocol
from daemon.emitter import Emitter
from daemon.http_api import HttpApi
from daemon.lanes import ERRORS, SCORED, EmitLanes
from daemon.maps import MapRetention
from daemon.metrics import DaemonMetrics
from daemon.pool import LARGE, ActorDied, ActorPool, Job
from daemon.resultlog import LogReader, ResultLog
from daemon.review.api import ReviewApi
from daemon.review.feed import Feed
from daemon.security import (
    enforce_safe_defaults,
    ray_init_kwargs,
    secure_sockets,
)
from daemon.shadow import judge_shadow
from sensors.frame import Frame, FrameError
from sensors.wire import decode_frame, max_part_bytes, salvage_header
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
IDENTITY_FIELDS = ("sensor_id", "product", "part_id", "seq", "capture_time", "truth")


def identity(meta: Any) -> dict[str, Any]:
    """The frame fields every verdict echoes, and the frame's protocol version."""
    return {**{k: getattr(meta, k) for k in IDENTITY_FIELDS}, "protocol": meta.protocol}


VERSION = "0.1.0"
_STOP = object()


class InspectionService(ServiceApi):
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
            ray.init(
                **ray_init_kwargs(self.cfg),
                num_cpus=self.cfg.ray.num_cpus,
                object_store_memory=self.cfg.ray.object_store_mb * 2**20 if self.cfg.ray.address is None else None,
                logging_level=logging.WARNING,
            )
        self.pool = ActorPool(self.cfg, products)
        self.pool.shadowed = {p for p in products if read_shadow(self.cfg.storage.models_dir, p)}
        infos = self.pool.wait_ready(ready_timeout)
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
                self.out.put(_STOP)

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

    # ---------------------------------------------------------------- threads
    def _ingest_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        max_wait = self.cfg.ingest.max_wait_ms / 1000.0
        while True:
            self.beats["ingest"] = time.monotonic()
            if self.stopping.is_set():
                self._stop_accepting()
            if not poller.poll(200 if self.closed else 100):
                if self.closed:  # the pipe is empty: everything taken is in the queue
                    break
                continue
            parts = self.pull.recv_multipart(copy=False)
            self.taken += 1
            received, mono = time.time(), time.monotonic()
            if self.fault == "ingest-hang" and self.taken == 1:
                self._fault_hang()
            try:
                frame = decode_frame(parts, self.cfg.ingest.max_points)
            except Exception as e:  # FrameError names the reason; anything else is our bug, still answered
                ident = salvage_header(parts)
                if peek_protocol(parts) == 2:
                    ident["protocol"] = 2
                self.metrics.frames_received.labels(sensor_id=self.metrics.sensor_label(ident.get("sensor_id"))).inc()
                reason, detail = (e.reason, e.detail) if isinstance(e, FrameError) else ("internal_error", repr(e))
                self._emit_error(ident, reason, detail, received, mono=mono)
                continue
            m = frame.meta
            self.metrics.frames_received.labels(sensor_id=self.metrics.sensor_label(m.sensor_id)).inc()
            self.metrics.frame_age.observe(max(0.0, received - m.capture_time))
            if not self._accept_new(m):
                continue
            ident = identity(m)
            if m.product not in self.products and not self.routes_to_cold_start(m.product):
                why = " and is not configured for cold start" if self.cold_start else ""
                self._emit_error(ident, "unknown_product", f"product {m.product!r} is not enrolled{why}", received,
                                 mono=mono)
                continue
            job = Job(frame=frame, received_at=received, received_mono=mono)
            if self._too_old(job):
                continue
            job.timings["decode"] = time.monotonic() - mono
            job.enqueued_at = time.monotonic()
            large = self.pool is not None and self.pool.lane_for(frame.n_points) == LARGE
            if large:  # a large frame never waits: it would hold up the normal frames behind it
                try:
                    self.large_queue.put_nowait(job)
                except queue.Full:
                    self._emit_error(ident, "overloaded", "the large-frame queue is full", received, mono=mono)
            elif not self._put(job, max_wait):
                self._emit_error(ident, "overloaded", f"queue full for {max_wait:.1f}s", received, mono=mono)
                continue
            self.metrics.queue_depth.set(self.queue.qsize())

    def _put(self, job: Job, max_wait: float) -> bool:
        """Queue a job, waiting up to ``max_wait`` for room (backpressure) while showing ingest alive."""
        deadline = time.monotonic() + max_wait
        while True:
            try:
                self.queue.put(job, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                return True
            except queue.Full:
                self.beats["ingest"] = time.monotonic()
                if self.stopping.is_set():
                    self._stop_accepting()
                if time.monotonic() >= deadline:
                    return False

    def _accept_new(self, meta: Any) -> bool:
        """Seq bookkeeping for every frame; False for a resent protocol-2 copy, already answered here."""
        assert self.delivery is not None
        self.delivery.track_seq(meta)
        status, original = self.delivery.classify(meta)
        if status == "in_flight":
            self.dropped_copies += 1  # the original's ack answers it
            return False
        if status == "logged":
            assert original is not None
            self.out.put(Republish(original), SCORED)
            return False
        return True

    def _stop_accepting(self) -> None:
        """Close the door: unbind the ingest endpoint (sensors' sends then block, and protocol-2
        sensors resend after the restart); what is already in the socket's pipe is still read."""
        if self.closed:
            return
        self.closed = True
        try:
            self.pull.unbind(self.pull.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as e:
            log.warning("could not unbind %s: %s", self.cfg.ingest.endpoint, e)
        log.info("stop: ingest closed, reading what is left in the ZeroMQ pipe")

    def _fault_hang(self) -> None:
        """Test fault injection: ingest stops reading (but lives) until the daemon is stopped."""
        log.warning("TEST FAULT INJECTION: ingest stops reading")
        self.stopping.wait()

    def _dispatch_loop(self) -> None:
        pool = self.pool
        assert pool is not None
        retry: deque[Job] = deque()
        restarts_seen = 0
        while True:
            while pool.has_capacity():
                batch = self._next_batch(retry)
                if not batch:
                    break
                pool.submit(batch)
            while pool.has_capacity(LARGE) and (job := self._next_large()) is not None:
                pool.submit([job], LARGE)
            self.metrics.queue_depth.set(self.queue.qsize() + self.large_queue.qsize())
            self.metrics.inflight.set(pool.inflight_frames)
            idle = self.queue.empty() and self.large_queue.empty() and not retry and not self.retry_large
            if self.ingest_done.is_set() and idle and not pool.inflight:
                break
            for job, outcome in pool.poll(timeout=0.01):
                try:
                    self._finish(job, outcome, retry)
                except Exception as e:  # a bug in the decision stage must not strand the frame
                    log.exception("decision failed for %s", job.frame.meta.part_id)
                    m = job.frame.meta
                    ident = identity(m)
                    self._emit_error(ident, "internal_error", repr(e), job.received_at, job.timings, job.received_mono)
            if pool.restarts != restarts_seen:
                self.metrics.actor_restarts.inc(pool.restarts - restarts_seen)
                restarts_seen = pool.restarts
            self._update_actor_gauge()

    def _next_batch(self, retry: deque[Job]) -> list[Job]:
        """Jobs for one actor call: retries first, then the queue. Waiting frames are spread over
        the free actors (a batch only forms when there are more frames than free actors), at most
        ``workers.max_batch``. With ``workers.batch_wait_ms`` > 0 (GPU actors, where a full batch
        pays), a partial batch waits that long for more frames, never longer."""
        assert self.pool is not None
        waiting = len(retry) + self.queue.qsize()
        share = -(-waiting // max(1, self.pool.free_slots()))
        wait = self.cfg.workers.batch_wait_ms / 1000.0
        size = self.cfg.workers.max_batch if wait > 0 else max(1, min(self.cfg.workers.max_batch, share))
        batch = [retry.popleft() for _ in range(min(size, len(retry)))]
        deadline = time.monotonic() + wait
        while len(batch) < size:
            try:
                timeout = deadline - time.monotonic()
                job = self.queue.get(timeout=timeout) if batch and timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            job.timings["queue"] = time.monotonic() - job.enqueued_at
            if not self._too_old(job):
                batch.append(job)
        return batch

    def _next_large(self) -> Job | None:
        """The next frame for the large-frame lane: a retry first, then the large queue."""
        while True:
            if self.retry_large:
                return self.retry_large.popleft()
            try:
                job = self.large_queue.get_nowait()
            except queue.Empty:
                return None
            job.timings["queue"] = time.monotonic() - job.enqueued_at
            if not self._too_old(job):
                return job

    def _too_old(self, job: Job) -> bool:
        """Answer ``overloaded`` for a frame older than ``ingest.max_age_ms`` (capture to dequeue).

        The age compares the sensor's capture_time with this host's wall clock: both are
        timestamps, so the sensors' clocks must be synchronized with the daemon's."""
        age = time.time() - job.frame.meta.capture_time
        limit = self.cfg.ingest.max_age_ms / 1000.0
        if age <= limit:
            return False
        detail = f"frame is {age:.1f}s old at dequeue (capture to dequeue), limit {limit:.1f}s"
        self._emit_error(identity(job.frame.meta), "overloaded", detail, job.received_at, job.timings, job.received_mono)
        return True

    def _update_actor_gauge(self) -> None:
        assert self.pool is not None
        for backend, n in self.pool.alive_by_backend().items():
            self.metrics.actors.labels(backend=backend).set(n)

    def _finish(self, job: Job, outcome: dict[str, Any] | BaseException, retry: deque[Job]) -> None:
        m = job.frame.meta
        ident = identity(m)
        if isinstance(outcome, ActorDied):
            if job.attempts <= self.cfg.workers.retries:
                large = self.pool is not None and self.pool.lane_for(job.frame.n_points) == LARGE
                (self.retry_large if large else retry).append(job)
            else:
                self._emit_error(ident, "worker_died", str(outcome), job.received_at, job.timings, job.received_mono)
            return
        if isinstance(outcome, BaseException):
            reason = outcome.reason if isinstance(outcome, FrameError) else "scoring_failed"
            detail = outcome.detail if isinstance(outcome, FrameError) else f"{type(outcome).__name__}: {outcome}"
            self._emit_error(ident, reason, detail, job.received_at, job.timings, job.received_mono)
            return
        t0, mono0 = time.time(), time.monotonic()
        worker_total = sum(outcome["timings"].get(k, 0.0) for k in ("preprocess", "score", "map_back", "shadow"))
        timings = {**outcome["timings"], **job.timings}  # the daemon's own stages win a name clash
        timings["actor_wait"] = max(0.0, outcome["started_at"] - job.dispatched_at)
        timings["transfer"] = max(0.0, (t0 - job.dispatched_at) - timings["actor_wait"] - worker_total)
        score = float(outcome["object_score"])
        cal = {"threshold": outcome["threshold"], "normalization": outcome.get("normalization")}
        t = self.thresholds_for(m.product, cal)
        verdict = decide(score, t) if t is not None else "review"
        if outcome["zero_shot"] and not self.cold_start_decides(m.product):
            verdict = "review"  # the cold-start model is not trusted to pass or fail parts
        fields = outcome.get("verdict_fields") or {}
        if fields.get("registration_failed"):
            verdict = "review"  # the part could not be aligned to its reference: a person decides
        norm = outcome.get("normalization")
        if outcome["zero_shot"]:
            self._hold(job.frame)
            self.metrics.cold_start_verdicts.labels(product=self.metrics.product_label(m.product)).inc()
        timings["decision"] = time.monotonic() - mono0
        header = {
            **ident,
            "verdict": verdict,
            "score": score,
            "threshold": t.threshold if t else None,
            "review_low": t.review_low if t else None,
            "fail_from": t.fail_from if t else None,
            "scorer": outcome["scorer"],
            "model_version": outcome["model_version"],
            "model_revision": outcome.get("model_revision"),
            "score_normalized": (score - norm["center"]) / norm["scale"] if norm else None,
            "backend": outcome["backend"],
            "error": None,
            "received_at": job.received_at,
            "zero_shot": outcome["zero_shot"],
            "worker_pid": outcome["worker_pid"],
            "attempts": job.attempts,
            **fields,
        }
        amap = np.asarray(outcome["anomaly_map"], dtype=np.float32)
        shadow = outcome.get("shadow")
        if shadow is not None:  # scored beside the live model: recorded, never deciding
            shadow = judge_shadow(shadow, header, lambda c: self.thresholds_for(m.product, c), self.metrics)
        self.out.put((header, amap, job.frame, timings, job.received_mono, shadow), SCORED)

    def _hold(self, frame: Frame) -> None:
        """Keep a cold-start frame so an operator can mark it good; the oldest goes first."""
        keep = self.cfg.cold_start.keep_frames
        with self.held_lock:
            self.held[(frame.meta.product, frame.meta.part_id)] = frame
            while len(self.held) > keep:
                self.held.popitem(last=False)

    def _emit_error(
        self,
        ident: dict[str, Any],
        reason: str,
        detail: str,
        received: float,
        timings: dict[str, float] | None = None,
        mono: float | None = None,
    ) -> None:
        """Queue an error verdict in the error lane (behind every scored verdict)."""
        self.metrics.frames_refused.labels(reason=reason).inc()
        header = {
            **ident,
            "verdict": "error",
            "score": None,
            "threshold": None,
            "scorer": None,
            "model_version": None,
            "error": {"reason": reason, "detail": detail},
            "received_at": received,
        }
        self.out.put((header, None, None, dict(timings or {}), mono), ERRORS)

    def _emit_loop(self) -> None:
        """The emitter thread (``daemon.emitter``), beating for /readyz."""
        if self.fault == "emitter-die":
            self.out.get()
            raise RuntimeError("test fault injection: the emitter dies")
        self.emitter.run(_STOP, beat=lambda: self.beats.__setitem__("emitter", time.monotonic()))
