"""The inspection service's threads: ingest, dispatch (with the decision stage) and the emitter's loop.

``ServiceLoops`` is a part of ``InspectionService`` (``daemon.service``), kept in its own module
so each file reads on its own: the service builds the queues, the pool, the sockets and the
emitter, then runs ``_ingest_loop``, ``_dispatch_loop`` and ``_emit_loop`` in their threads.
Every path through them ends in a verdict: a scored one (``SCORED`` lane) or an error
(``_emit_error``, ``ERRORS`` lane).
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from typing import Any

import numpy as np
import zmq

from daemon.decision import decide
from daemon.delivery import Republish, peek_protocol
from daemon.lanes import ERRORS, SCORED
from daemon.pool import LARGE, ActorDied, Job
from daemon.shadow import judge_shadow
from sensors.frame import Frame, FrameError
from sensors.wire import decode_frame, salvage_header

log = logging.getLogger("inspectd.service")
POLL_S = 0.05
"""The longest the dispatch thread sleeps: results and queued frames wake it at once, this
only paces its deadline checks and gauges."""
STOP = object()
"""Put on the emitter's lanes to end its loop once everything before it is out."""
IDENTITY_FIELDS = ("sensor_id", "product", "part_id", "seq", "capture_time", "truth")


def identity(meta: Any) -> dict[str, Any]:
    """The frame fields every verdict echoes, and the frame's protocol version."""
    return {**{k: getattr(meta, k) for k in IDENTITY_FIELDS}, "protocol": meta.protocol}


class ServiceLoops:
    """The service's thread loops; they use its config, queues, pool, delivery, metrics and lanes."""

    def _ingest_loop(self) -> None:
        """Read, decode and queue frames. A decoded frame's arrays are views on its received
        ZeroMQ buffers (``recv_multipart(copy=False)``, ``sensors.wire``), which the frame keeps
        alive until its verdict is out: their number is bounded, as the frames are, by the
        bounded queue, the calls in flight and the emitter's bounded lanes
        (``daemon.config.held_frames``)."""
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
            if self.pool is not None:
                self.pool.notify()  # dispatch takes it now, not at its next poll
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
        calls_seen = dict(pool.calls)
        while True:
            pool.rearm()  # from here on, a frame queued or a result in ends the poll below at once
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
            self._finish_all(pool.poll(timeout=POLL_S), retry)
            if pool.restarts != restarts_seen:
                self.metrics.actor_restarts.inc(pool.restarts - restarts_seen)
                restarts_seen = pool.restarts
            for way, n in pool.calls.items():
                if n != calls_seen[way]:
                    self.metrics.handover_calls.labels(way=way).inc(n - calls_seen[way])
                    calls_seen[way] = n
            self._update_actor_gauge()

    def _finish_all(self, results: list[tuple[Job, Any]], retry: deque[Job]) -> None:
        """Decide each finished job (a method of its own, so that no local of the dispatch loop
        holds the last result's map: a map on a hand-over slot frees the slot when dropped)."""
        for job, outcome in results:
            try:
                self._finish(job, outcome, retry)
            except Exception as e:  # a bug in the decision stage must not strand the frame
                log.exception("decision failed for %s", job.frame.meta.part_id)
                ident = identity(job.frame.meta)
                self._emit_error(ident, "internal_error", repr(e), job.received_at, job.timings, job.received_mono)

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
        mono0 = time.monotonic()
        timings = {**outcome["timings"], **job.timings}  # the daemon's own stages win a name clash
        # hops between processes, on the wall clock (one host's, or synchronized nodes')
        timings["actor_wait"] = max(0.0, outcome["started_at"] - job.dispatched_at)
        timings["return"] = max(0.0, outcome["collected_at"] - outcome["finished_at"])
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
        self.emitter.run(STOP, beat=lambda: self.beats.__setitem__("emitter", time.monotonic()))
