"""The inspection service: ingest → queue → Ray actors → decision → log → publish.

Three threads, each owning what it touches, so no socket is shared:

* ingest: owns the PULL socket. Decodes and validates each message (``sensors.wire``);
  a refused message becomes an error verdict at once. Valid frames go into a bounded queue;
  when it is full, ingest stops reading (ZeroMQ's high-water marks then block the sensors'
  sends: backpressure), and a frame that still finds no room after ``ingest.max_wait_ms`` is
  answered with an ``overloaded`` error verdict.
* dispatch: feeds the actor pool, collects results, retries frames whose actor died, and
  applies the decision stage.
* emitter: owns the PUB socket and the result log. For each verdict it writes the map files,
  commits the log row, then publishes, in that order.

Every message that arrives gets exactly one verdict: each path above ends in ``_emit``.

Cold start: a product with no model of its own is scored by the cold-start model
(``<models_dir>/_zeroshot``) and its verdicts say ``"zero_shot": true``. The daemon holds its
recent frames so an operator can mark good ones (``POST /v1/products/<p>/good``, or
``inspectd mark-good``); ``inspectd enroll --notify`` then makes every actor load the new
model (``POST /v1/products/<p>/reload``). Frames keep flowing meanwhile: each verdict uses
the model, and that model's threshold, which scored it.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import ray
import zmq

from daemon.audit import AuditLog
from daemon.config import Config
from daemon.decision import Thresholds, decide
from daemon.http_api import HttpApi
from daemon.maps import write_maps
from daemon.metrics import DaemonMetrics
from daemon.pool import ActorDied, ActorPool, Job
from daemon.resultlog import ResultLog
from daemon.security import (
    enforce_safe_defaults,
    inside,
    ray_init_kwargs,
    secure_sockets,
    valid_part_id,
    valid_product,
)
from sensors.frame import Frame, FrameError
from sensors.pointfiles import write_pcd, write_xyz_tiff
from sensors.wire import decode_frame, encode_verdict, salvage_header
from workers.model_store import ZERO_SHOT_MODEL, enrolled_products, product_dir

PRODUCT_ROUTE = re.compile(r"/v1/products/(.+)/(good|reload)\Z", re.DOTALL)

log = logging.getLogger("inspectd.service")
IDENTITY_FIELDS = ("sensor_id", "product", "part_id", "seq", "capture_time", "truth")


def identity(meta: Any) -> dict[str, Any]:
    """The frame fields every verdict echoes."""
    return {k: getattr(meta, k) for k in IDENTITY_FIELDS}

VERSION = "0.1.0"
_STOP = object()


class InspectionService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = DaemonMetrics(VERSION)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=cfg.ingest.queue_size)
        self.out: queue.Queue[Any] = queue.Queue()
        self.products: set[str] = set()
        self.cold_start = False
        self.held: OrderedDict[tuple[str, str], Frame] = OrderedDict()
        self.held_lock = threading.Lock()
        enforce_safe_defaults(cfg)
        self.audit: AuditLog | None = None
        self.http = HttpApi(cfg.http, self.metrics.render, self.ready.is_set, self.api, audit=lambda: self.audit)
        self.ctx = zmq.Context()
        self.pool: ActorPool | None = None
        self.ingest_done = threading.Event()
        self.threads: list[threading.Thread] = []

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
        infos = self.pool.wait_ready(ready_timeout)
        self._update_actor_gauge()
        log.info("%d scoring actors ready (%s)", self.pool.size, ", ".join(sorted({i["backend"] for i in infos})))

        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, self.cfg.ingest.receive_hwm)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 2000)
        self.gate = secure_sockets(self.ctx, self.cfg, self.pull, self.pub,
                                   lambda sock, why: self.metrics.connections_refused.labels(socket=sock, reason=why).inc())
        self.pull.bind(self.cfg.ingest.endpoint)
        self.pub.bind(self.cfg.publish.endpoint)
        self.results = ResultLog(self.cfg.storage.results)

        for name, target in (("ingest", self._ingest_loop), ("dispatch", self._dispatch_loop), ("emitter", self._emit_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        self.ready.set()
        self.metrics.ready.set(1)
        log.info("ready: ingest %s, verdicts %s", self.cfg.ingest.endpoint, self.cfg.publish.endpoint)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop ingest, finish every frame already received, then release everything."""
        self.ready.clear()
        self.metrics.ready.set(0)
        self.stopping.set()
        deadline = time.time() + drain_timeout
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.time()))
        if hasattr(self, "gate"):
            self.gate.stop()
        for sock in ("pull", "pub"):
            if hasattr(self, sock):
                getattr(self, sock).close()
        if hasattr(self, "results"):
            self.results.close()
        if self.pool is not None:
            self.pool.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        self.ctx.term()
        self.http.stop()
        if self.audit is not None:
            self.audit.close()

    def _load_products(self) -> list[str]:
        """Enrolled products, and whether a cold-start model serves the others."""
        models = self.cfg.storage.models_dir
        enrolled = enrolled_products(models)
        self.products = set(enrolled)
        self.cold_start = self.cfg.cold_start.enabled and (product_dir(models, ZERO_SHOT_MODEL) / "meta.json").is_file()
        for name in self.cfg.products:
            if name not in enrolled:
                log.warning("product %s is configured but not enrolled in %s%s", name, models,
                            ": cold start" if self.cold_start else ": its frames are refused")
        log.info("products: %s; cold start %s", ", ".join(enrolled) or "(none)", "on" if self.cold_start else "off")
        return enrolled

    def thresholds_for(self, product: str, calibrated: float | None) -> Thresholds | None:
        """The config's override, else the threshold calibrated with the model that scored."""
        pc = self.cfg.products.get(product)
        band = pc.review_band if pc and pc.review_band is not None else self.cfg.decision.review_band
        thr = pc.threshold if pc and pc.threshold is not None else calibrated
        return Thresholds(float(thr), band) if thr is not None else None

    # ---------------------------------------------------------------- HTTP API
    def api(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        """``GET /v1/products``, ``POST /v1/products/<p>/good`` and ``POST /v1/products/<p>/reload``."""
        path = path.partition("?")[0]
        if method == "GET" and path == "/v1/products":
            with self.held_lock:
                held = sorted({p for p, _ in self.held})
            return 200, {"enrolled": sorted(self.products), "cold_start": self.cold_start, "held_cold_start": held}
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
            return self.mark_good(product, part_id)
        return self.reload(product)

    def mark_good(self, product: str, part_id: str) -> tuple[int, dict[str, Any]]:
        """Write a held frame to ``<collect_dir>/<product>/good/`` for a later ``inspectd enroll``."""
        with self.held_lock:
            frame = self.held.get((product, part_id))
        if frame is None:
            return 404, {"error": f"part {part_id!r} of {product!r} is not held (only the last "
                                  f"{self.cfg.cold_start.keep_frames} cold-start parts are)"}
        folder = inside(self.cfg.cold_start.collect_dir, product, "good")
        folder.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", part_id)
        if frame.organized:
            path = inside(folder, f"{stem}.tiff")
            write_xyz_tiff(path, frame.points)
        else:
            path = inside(folder, f"{stem}.pcd")
            write_pcd(path, frame.points[frame.valid_mask()])
        self.metrics.marked_good.labels(product=product).inc()
        n = sum(1 for _ in folder.iterdir())
        log.info("marked %s/%s good (%d collected)", product, part_id, n)
        return 200, {"saved": str(path), "collected": n}

    def reload(self, product: str) -> tuple[int, dict[str, Any]]:
        """Make every actor load the product's model from disk (enrollment without a restart)."""
        if not (product_dir(self.cfg.storage.models_dir, product) / "meta.json").is_file():
            return 404, {"error": f"no model for {product!r} in {self.cfg.storage.models_dir}"}
        assert self.pool is not None
        try:
            versions = self.pool.reload(product)
        except Exception as e:  # a broken artifact must not take the daemon down
            log.exception("reload of %s failed", product)
            return 500, {"error": f"reload of {product} failed ({type(e).__name__}); the reason is in the daemon's log"}
        self.products.add(product)
        self.metrics.model_reloads.labels(product=product).inc()
        log.info("product %s now served by model %s", product, versions[0])
        return 200, {"product": product, "model_version": versions[0], "actors": len(versions)}

    # ---------------------------------------------------------------- threads
    def _ingest_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        max_wait = self.cfg.ingest.max_wait_ms / 1000.0
        while not self.stopping.is_set():
            if not poller.poll(100):
                continue
            parts = self.pull.recv_multipart(copy=False)
            received = time.time()
            try:
                frame = decode_frame(parts, self.cfg.ingest.max_points)
            except Exception as e:  # FrameError names the reason; anything else is our bug, still answered
                ident = salvage_header(parts)
                self.metrics.frames_received.labels(sensor_id=str(ident.get("sensor_id", "unknown"))).inc()
                reason, detail = (e.reason, e.detail) if isinstance(e, FrameError) else ("internal_error", repr(e))
                self._emit_error(ident, reason, detail, received)
                continue
            m = frame.meta
            self.metrics.frames_received.labels(sensor_id=m.sensor_id).inc()
            ident = identity(m)
            if m.product not in self.products and not self.cold_start:
                self._emit_error(ident, "unknown_product", f"product {m.product!r} is not enrolled", received)
                continue
            job = Job(frame=frame, received_at=received)
            job.timings["decode"] = time.time() - received
            job.enqueued_at = time.time()
            try:
                self.queue.put(job, timeout=max_wait)
            except queue.Full:
                self._emit_error(ident, "overloaded", f"queue full for {max_wait:.1f}s", received)
                continue
            self.metrics.queue_depth.set(self.queue.qsize())
        self.ingest_done.set()

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
            self.metrics.queue_depth.set(self.queue.qsize())
            self.metrics.inflight.set(pool.inflight_frames)
            if self.ingest_done.is_set() and self.queue.empty() and not retry and not pool.inflight:
                break
            for job, outcome in pool.poll(timeout=0.01):
                try:
                    self._finish(job, outcome, retry)
                except Exception as e:  # a bug in the decision stage must not strand the frame
                    log.exception("decision failed for %s", job.frame.meta.part_id)
                    m = job.frame.meta
                    ident = identity(m)
                    self._emit_error(ident, "internal_error", repr(e), job.received_at, job.timings)
            if pool.restarts != restarts_seen:
                self.metrics.actor_restarts.inc(pool.restarts - restarts_seen)
                restarts_seen = pool.restarts
            self._update_actor_gauge()
        self.out.put(_STOP)

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
        deadline = time.time() + wait
        while len(batch) < size:
            try:
                timeout = deadline - time.time()
                job = self.queue.get(timeout=timeout) if batch and timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            job.timings["queue"] = time.time() - job.enqueued_at
            batch.append(job)
        return batch

    def _update_actor_gauge(self) -> None:
        assert self.pool is not None
        for backend, n in self.pool.alive_by_backend().items():
            self.metrics.actors.labels(backend=backend).set(n)

    def _finish(self, job: Job, outcome: dict[str, Any] | BaseException, retry: deque[Job]) -> None:
        m = job.frame.meta
        ident = identity(m)
        if isinstance(outcome, ActorDied):
            if job.attempts <= self.cfg.workers.retries:
                retry.append(job)
            else:
                self._emit_error(ident, "worker_died", str(outcome), job.received_at, job.timings)
            return
        if isinstance(outcome, BaseException):
            reason = outcome.reason if isinstance(outcome, FrameError) else "scoring_failed"
            detail = outcome.detail if isinstance(outcome, FrameError) else f"{type(outcome).__name__}: {outcome}"
            self._emit_error(ident, reason, detail, job.received_at, job.timings)
            return
        t0 = time.time()
        worker_total = sum(outcome["timings"].get(k, 0.0) for k in ("preprocess", "score", "map_back"))
        timings = {**outcome["timings"], **job.timings}  # the daemon's own stages win a name clash
        timings["actor_wait"] = max(0.0, outcome["started_at"] - job.dispatched_at)
        timings["transfer"] = max(0.0, (t0 - job.dispatched_at) - timings["actor_wait"] - worker_total)
        score = float(outcome["object_score"])
        t = self.thresholds_for(m.product, outcome["threshold"])
        verdict = decide(score, t) if t is not None else "review"
        if outcome["zero_shot"]:
            self._hold(job.frame)
            self.metrics.cold_start_verdicts.labels(product=m.product).inc()
        timings["decision"] = time.time() - t0
        header = {
            **ident,
            "verdict": verdict,
            "score": score,
            "threshold": t.threshold if t else None,
            "review_low": t.review_low if t else None,
            "fail_from": t.fail_from if t else None,
            "scorer": outcome["scorer"],
            "model_version": outcome["model_version"],
            "backend": outcome["backend"],
            "error": None,
            "received_at": job.received_at,
            "zero_shot": outcome["zero_shot"],
            "worker_pid": outcome["worker_pid"],
            "attempts": job.attempts,
        }
        self.out.put((header, np.asarray(outcome["anomaly_map"], dtype=np.float32), job.frame, timings))

    def _hold(self, frame: Frame) -> None:
        """Keep a cold-start frame so an operator can mark it good; the oldest goes first."""
        keep = self.cfg.cold_start.keep_frames
        with self.held_lock:
            self.held[(frame.meta.product, frame.meta.part_id)] = frame
            while len(self.held) > keep:
                self.held.popitem(last=False)

    def _emit_error(
        self, ident: dict[str, Any], reason: str, detail: str, received: float, timings: dict[str, float] | None = None
    ) -> None:
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
        self.out.put((header, None, None, dict(timings or {})))

    def _emit_loop(self) -> None:
        policy = self.cfg.storage.maps
        while True:
            item = self.out.get()
            if item is _STOP:
                return
            header, amap, frame, timings = item
            try:
                self._emit(header, amap, frame, timings, policy)
            except Exception:  # the emitter must survive anything: log it, keep serving
                log.exception("failed to emit verdict for %s", header.get("part_id"))

    def _emit(self, header: dict[str, Any], amap: np.ndarray | None, frame: Any, timings: dict[str, float], policy: str) -> None:
        verdict = header["verdict"]
        t0 = time.time()
        header["map_path"] = None
        if amap is not None and (policy == "all" or (policy == "flagged" and verdict != "pass")):
            header["map_path"] = str(
                write_maps(
                    self.cfg.storage.maps_dir, header["product"], str(header["part_id"]), verdict, amap,
                    frame.points.reshape(-1, 3), header["threshold"] or 0.0,
                )
            )
        t1 = time.time()
        timings["maps"] = t1 - t0
        header["decided_at"] = t1
        header["latency_ms"] = (t1 - header["received_at"]) * 1000.0
        header["stage_ms"] = {k: round(v * 1000.0, 3) for k, v in timings.items()}
        header["verdict_id"] = self.results.append(header)
        t2 = time.time()
        self.pub.send_multipart(encode_verdict(header, amap), copy=False)
        t3 = time.time()
        timings.update(log=t2 - t1, publish=t3 - t2)
        product = header.get("product") or "_unknown"
        self.metrics.verdicts.labels(product=product, verdict=verdict).inc()
        self.metrics.latency.labels(product=product).observe(t3 - header["received_at"])
        self.metrics.observe_stages(timings)
