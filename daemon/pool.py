"""The pool of Ray actors that score frames, sized to the cluster, restarted when they die.

Each actor is a ``workers.actor.ScoringWorker`` holding every product's model. The models reach
the actors through Ray, not a filesystem: the pool reads each product's ``current`` revision,
``ray.put``s its bytes and publishes the reference in a ``ModelRegistry`` actor kept on the
daemon's node; actors load from there, so they may run on any node of a cluster (they are
spread over the nodes, ``SPREAD``). Ray restarts a
dead actor (``max_restarts=-1``); its in-flight frames come back here as failures and the
service retries them (``workers.retries``) before answering with an error verdict, so a crash
costs latency, never a verdict. A death is counted once per actor incarnation.

Two lanes: frames above ``workers.large_points`` go to their own actors
(``workers.large_actors``), one at a time, at a lower CPU priority (``workers.large_nice``), so
a large cloud never holds up normal parts. Every
call has a deadline (``WorkersConfig.deadline_s`` summed over its frames, on the monotonic
clock); a call past it is answered ``scoring_timeout`` and its actor is recycled (killed and
restarted by Ray), which frees the CPU the runaway frame held. A frame of a product with a
shadow model (``shadowed``) is scored twice in its call, so its deadline counts twice.

The hand-over (docs/design/daemon-path.md): ``submit`` copies a call's frames once, into the
actor's slot in shared memory (``daemon.shm_lane``: the actor's ``serve`` loop, started here for
every actor on the daemon's node, reads them in place and writes the maps back there), or, for
an actor on another node, ``workers.handover: object_store``, or while its loop is not
listening, with one ``ray.put`` into Ray's object store, passing the reference nested in a list
so that the actor fetches it itself (``ScoringWorker.score_shared``). Either way the
ground-truth mask, which never decides, stays behind. Only frames in flight are held: a call's
slot or object is released when its result is collected. Results are watched through their
futures, whose completion, like a new frame at ingest (``notify``), wakes the dispatch thread at
once instead of at its next poll. An actor's ``serve`` call ending (``RayActorError``) is how a
death is noticed when its frames go through shared memory.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import zmq
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from daemon.config import Config, frames_in_flight, held_frames, pub_hwm
from daemon.shm_lane import SharedMemoryLane
from sensors.frame import FrameError
from workers.actor import ScoringWorker
from workers.handover import frame_bytes, map_bytes
from workers.model_registry import ModelRegistry
from workers.model_store import CURRENT, ZERO_SHOT_MODEL, has_model, read_bundle
from workers.model_versions import read_shadow

log = logging.getLogger("inspectd.pool")


@dataclass
class Job:
    """One frame on its way through the daemon."""

    frame: Any
    received_at: float
    """Wall-clock timestamp of receipt (echoed in the verdict)."""
    timings: dict[str, float] = field(default_factory=dict)
    received_mono: float = 0.0
    """Monotonic time of receipt: every duration is measured on this clock."""
    enqueued_at: float = 0.0
    """Monotonic time the job entered the queue."""
    dispatched_at: float = 0.0
    """Wall-clock time of dispatch, compared with the actor's own wall-clock start (another process)."""
    attempts: int = 0


class ActorDied(Exception):
    """The actor scoring a job died before answering."""


@dataclass
class Call:
    """One call in flight: its actor, jobs, deadline, the result's future, and what holds its
    frames until the result is collected: the object in the object store (``shared``, a
    ``score_shared`` call) or the hand-over's slot (``handover``, the call's id there)."""

    actor: int
    jobs: list[Job]
    deadline: float
    shared: ray.ObjectRef | None
    future: Future
    handover: int | None = None


def for_actor(frame: Any) -> Any:
    """What of a frame travels to the actor: everything but the ground-truth mask, which only
    simulators and datasets send and the daemon never reads to decide."""
    return frame if frame.gt_mask is None else replace(frame, gt_mask=None)


def pool_size(cfg: Config) -> int:
    """``workers.actors``, or for ``auto`` what the cluster's resources allow (at least 1)."""
    if cfg.workers.actors != "auto":
        return int(cfg.workers.actors)
    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 1) / cfg.workers.cpus_per_actor)
    if cfg.workers.gpus_per_actor > 0:
        n = min(n, math.floor(res.get("GPU", 0) / cfg.workers.gpus_per_actor))
    return max(1, n)


NORMAL = "normal"
LARGE = "large"


class ActorPool:
    def __init__(self, cfg: Config, products: list[str]) -> None:
        self.cfg = cfg
        self.products = products
        self.max_inflight = cfg.workers.max_inflight_per_actor
        options = {"num_gpus": cfg.workers.gpus_per_actor, "max_restarts": -1, "max_task_retries": 0,
                   "scheduling_strategy": "SPREAD"}
        worker = ray.remote(concurrency_groups={"handover": 1})(ScoringWorker)
        normal = worker.options(num_cpus=cfg.workers.cpus_per_actor, **options)
        large = worker.options(num_cpus=cfg.workers.large_cpus_per_actor, **options)
        n_normal = pool_size(cfg)
        self.size = n_normal + cfg.workers.large_actors
        self.lane_of = [NORMAL] * n_normal + [LARGE] * cfg.workers.large_actors
        self.models_dir = cfg.storage.models_dir.resolve()
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.registry = ray.remote(ModelRegistry).options(num_cpus=0, max_restarts=0, scheduling_strategy=here).remote()
        for product in products + ([ZERO_SHOT_MODEL] if has_model(self.models_dir, ZERO_SHOT_MODEL) else []):
            try:
                self.publish(product)
            except Exception as e:  # its frames are refused; the other products are served
                log.error("cannot read the model of %s: %s", product, e)
        args = (self.registry, cfg.workers.threads_per_actor, cfg.workers.backend)
        cache = str(self.models_dir / ".engine-cache")
        self.actors = [normal.remote(*args, cache_dir=cache) if lane == NORMAL
                       else large.remote(*args, cfg.workers.large_nice, cache_dir=cache) for lane in self.lane_of]
        self.load = [0] * self.size
        self.busy_until = [0.0] * self.size
        self.next_actor = 0
        self.inflight: dict[Any, Call] = {}
        """Calls in flight by their Ray reference, or ``("handover", id)``."""
        self.lane: SharedMemoryLane | None = None
        self.serving: dict[int, Future] = {}
        """Each actor's ``serve`` call (the hand-over's loop), while it runs."""
        self.local_node = ray.get_runtime_context().get_node_id()
        self.wake = threading.Event()
        """Set when a call finishes, a probe answers or a frame is queued (``notify``): ``poll`` returns."""
        self.pids: list[int | None] = [None] * self.size
        self.nodes: list[str | None] = [None] * self.size
        """The Ray node each actor runs on (as of its last start)."""
        self.probes: dict[int, ray.ObjectRef] = {}
        self.backend_of: list[str] = []
        self.restarts = 0
        self.calls = {"shared_memory": 0, "object_store": 0}
        """Calls submitted so far, by how their frames reached the actor."""
        self.shadowed: set[str] = set()
        """Products whose frames the actors also score with a shadow model (twice the deadline)."""

    def publish(self, product: str) -> str:
        """Put the product's ``current`` revision, and its shadow revision if it has one, into
        Ray's object store and serve them from the registry (a restarted actor loads them from
        there); returns the current revision."""
        bundle = read_bundle(self.models_dir, product, CURRENT)
        shadow = read_shadow(self.models_dir, product)
        shadow_ref = None
        if shadow is not None:
            try:
                shadow_ref = [ray.put(read_bundle(self.models_dir, product, revision=shadow))]
            except Exception as e:  # the actors report it (shadow_error); the live model is untouched
                log.error("cannot read the shadow revision %s of %s: %s", shadow, product, e)
                shadow_ref = [ray.put({"product": product, "revision": shadow, "files": {}})]
        ray.get(self.registry.publish.remote(product, [ray.put(bundle)], shadow_ref))
        return bundle["revision"]

    def wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        """Block until every actor has loaded its models; returns their ``info()``."""
        infos = ray.get([a.info.remote() for a in self.actors], timeout=timeout)
        self.pids = [i["pid"] for i in infos]
        self.nodes = [i["node_id"] for i in infos]
        self.backend_of = [i["backend"] for i in infos]
        for i, info in enumerate(infos):
            log.info("actor %d (%s lane) pid %d on node %s", i, self.lane_of[i], info["pid"], info["node_id"])
        if self.cfg.workers.handover == "shared_memory" and self.lane is None:
            w, points = self.cfg.workers, self.cfg.ingest.max_points
            try:
                self.lane = SharedMemoryLane(
                    self.size, self.max_inflight, w.max_batch * frame_bytes(points), map_bytes(points), w.max_batch,
                    max_map_slots=2 * frames_in_flight(self.cfg) + held_frames(self.cfg)
                    + self.cfg.publish.max_subscribers * pub_hwm(self.cfg))
            except (OSError, zmq.ZMQError) as e:  # no /dev/shm (some containers): Ray calls only
                log.warning("no shared-memory hand-over (%s); frames go through Ray's object store", e)
        for i in range(self.size):
            self._serve(i)
        if self.lane is not None:
            log.info("frames reach %d of %d actors through shared memory (%s)", len(self.serving), self.size,
                     self.lane.dir)
        return infos

    def _serve(self, i: int) -> None:
        """Start actor ``i``'s hand-over loop if it runs on this node (elsewhere: Ray calls)."""
        if self.lane is not None and self.nodes[i] == self.local_node:
            ref = self.actors[i].serve.remote(self.lane.request_endpoint(i), self.lane.reply_endpoint, str(self.lane.dir))
            self.serving[i] = self._wake_on(ref)

    def _check_serving(self) -> None:
        """An ended ``serve`` call: its actor died (or its loop failed). Its handed-over calls
        fail as ``ActorDied`` (the service retries them)."""
        for i, future in list(self.serving.items()):
            if not future.done():
                continue
            del self.serving[i]
            try:
                future.result()
                log.warning("actor %d stopped its hand-over loop; its frames go through Ray calls", i)
            except RayActorError:
                self._note_death(i)
            except Exception as e:
                log.error("actor %d's hand-over loop failed (%s); its frames go through Ray calls", i, e)
            assert self.lane is not None
            self.lane.fail_actor(i, ActorDied(f"actor {i} ended its hand-over loop"))

    def warm_store(self, block_bytes: int = 32 * 2**20) -> int:
        """Write most of the embedded object store's free space once, and have every actor read it.

        A process maps the store page by page as objects first land in each part of it: until
        then, a frame put into a fresh part faults each of its pages in (a 1920×1200 frame's put
        took 12.8 ms instead of 4), and an actor reading it does too. On a line that is only the
        first minutes after a start; this makes it none. Only for an embedded Ray, whose actors
        share this node's store (four fifths of what is free, so nothing spills), and only when
        frames go through the store (``workers.handover: object_store``). Returns the bytes
        written."""
        blocks = int(0.8 * ray.available_resources().get("object_store_memory", 0)) // block_bytes
        zeros = np.zeros(block_bytes, np.uint8)
        refs = [ray.put(zeros) for _ in range(blocks)]
        try:
            ray.get([a.touch.remote([refs]) for a in self.actors], timeout=120)
        finally:
            del refs
        return blocks * block_bytes

    def actor_table(self) -> list[dict[str, Any]]:
        """Each actor's lane, pid, Ray node (None while it restarts) and how frames reach it, for
        ``GET /v1/actors``."""
        return [{"actor": i, "lane": self.lane_of[i], "alive": self.pids[i] is not None, "pid": self.pids[i],
                 "node_id": self.nodes[i], "handover": "shared_memory" if i in self.serving else "object_store"}
                for i in range(self.size)]

    def alive_by_backend(self) -> dict[str, int]:
        """Alive actors per inference backend (for the ``inspectd_actors`` gauge)."""
        out = dict.fromkeys(self.backend_of, 0)
        for i in self._alive():
            out[self.backend_of[i]] += 1
        return out

    def _alive(self, lane: str | None = None) -> list[int]:
        """Actors known to be up: a dead one is skipped until its probe answers after the restart."""
        return [i for i in range(self.size) if self.pids[i] is not None and lane in (None, self.lane_of[i])]

    def lane_for(self, n_points: int) -> str:
        """The lane a frame of ``n_points`` is scored in (normal when there are no large actors)."""
        return LARGE if LARGE in self.lane_of and n_points > self.cfg.workers.large_points else NORMAL

    def has_capacity(self, lane: str = NORMAL) -> bool:
        return self.free_slots(lane) > 0

    def free_slots(self, lane: str = NORMAL) -> int:
        """Calls the alive actors of ``lane`` can take now (one at a time in the large lane)."""
        limit = 1 if lane == LARGE else self.max_inflight
        return sum(max(0, limit - self.load[i]) for i in self._alive(lane))

    def notify(self) -> None:
        """Wake the dispatch thread (``poll``): a frame was queued."""
        self.wake.set()

    def rearm(self) -> None:
        """Clear ``wake``: the dispatch thread calls it before it looks at its queues, so a frame
        queued or a result arriving from then on ends its next ``poll`` at once."""
        self.wake.clear()

    def _wake_on(self, ref: ray.ObjectRef) -> Future:
        """The future of ``ref``, which sets ``wake`` when the result (or its failure) is in."""
        future = ref.future()
        future.add_done_callback(lambda _: self.wake.set())
        return future

    def submit(self, jobs: list[Job], lane: str = NORMAL) -> None:
        """Send a batch of jobs to the least-loaded alive actor of ``lane``, in one call: one
        ``ray.put`` of the frames (timed as ``put``), then the call with the reference. Among
        equally loaded actors the turn goes round (``next_actor``), so an idle pool spreads its
        frames over every actor and node instead of sending each to the first."""
        alive = self._alive(lane)
        least = min(self.load[j] for j in alive)
        i = min((j for j in alive if self.load[j] == least), key=lambda j: (j - self.next_actor) % self.size)
        self.next_actor = (i + 1) % self.size
        t0 = time.monotonic()
        handed = None
        if self.lane is not None and i in self.serving:
            handed = self.lane.submit(i, [job.frame for job in jobs])
        shared = None if handed is not None else ray.put([for_actor(job.frame) for job in jobs])
        self.calls["object_store" if handed is None else "shared_memory"] += 1
        put_s = time.monotonic() - t0
        now = time.time()
        for job in jobs:
            job.dispatched_at = now
            job.attempts += 1
            job.timings["put"] = put_s
        # a call queued behind others on the same actor starts its clock when they are due
        start = max(time.monotonic(), self.busy_until[i] if self.load[i] else 0.0)
        deadline = start + sum(self.cfg.workers.deadline_s(job.frame.n_points)
                               * (2 if job.frame.meta.product in self.shadowed else 1) for job in jobs)
        self.busy_until[i] = deadline
        if handed is not None:
            self.inflight[("handover", handed[0])] = Call(i, jobs, deadline, None, handed[1], handed[0])
            handed[1].add_done_callback(lambda _: self.wake.set())
        else:
            ref = self.actors[i].score_shared.remote([shared])  # nested: the actor fetches it itself
            self.inflight[ref] = Call(i, jobs, deadline, shared, self._wake_on(ref))
        self.load[i] += 1

    @property
    def inflight_frames(self) -> int:
        return sum(len(call.jobs) for call in self.inflight.values())

    def poll(self, timeout: float) -> list[tuple[Job, dict[str, Any] | BaseException]]:
        """Finished jobs with their result dict or exception (``ActorDied`` when the actor died);
        waits up to ``timeout`` for one, returning as soon as ``wake`` is set (see ``rearm``).
        Each result's ``collected_at`` (wall clock) is when it was taken here."""
        self._check_probes()
        self._check_serving()
        done = [ref for ref, call in self.inflight.items() if call.future.done()]
        if not done and self.wake.wait(timeout):
            self._check_probes()
            self._check_serving()
            done = [ref for ref, call in self.inflight.items() if call.future.done()]
        out = self._expire(set(done))
        for ref in done:
            call = self.inflight.pop(ref)
            self.load[call.actor] -= 1
            self._release(call)
            try:
                results = call.future.result()
                now = time.time()
                for r in results:
                    if isinstance(r, dict):
                        r["collected_at"] = now
                out.extend(zip(call.jobs, results, strict=True))
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else e
                out.extend((job, cause) for job in call.jobs)
            except RayActorError as e:
                self._note_death(call.actor)
                died = ActorDied(str(e).splitlines()[0] if str(e) else "actor died")
                out.extend((job, died) for job in call.jobs)
            except Exception as e:  # a handed-over call: its actor died (ActorDied), or its reply was unreadable
                out.extend((job, e) for job in call.jobs)
        return out

    def _release(self, call: Call) -> None:
        """Free what held the call's frames: its hand-over slot (its object-store reference
        goes with the ``Call``)."""
        if call.handover is not None and self.lane is not None:
            self.lane.release(call.handover)

    def _expire(self, done: set[ray.ObjectRef]) -> list[tuple[Job, dict[str, Any] | BaseException]]:
        """Answer calls past their deadline with ``scoring_timeout`` and recycle their actors."""
        now = time.monotonic()
        out: list[tuple[Job, dict[str, Any] | BaseException]] = []
        for ref, call in list(self.inflight.items()):
            if ref in done or now < call.deadline:
                continue
            del self.inflight[ref]
            i = call.actor
            self.load[i] -= 1
            self._release(call)
            late = FrameError("scoring_timeout",
                              f"not scored within its deadline ({len(call.jobs)} frame(s) in the call)")
            out.extend((job, late) for job in call.jobs)
            log.warning("actor %d missed a scoring deadline; recycling it", i)
            ray.kill(self.actors[i], no_restart=False)
            self._note_death(i)
        return out

    def _note_death(self, i: int) -> None:
        """Count one restart per incarnation, and probe the actor to learn its new pid."""
        if self.pids[i] is not None:
            self.restarts += 1
            self.pids[i] = None
            log.warning("actor %d died; Ray restarts it", i)
        if i not in self.probes:
            self.probes[i] = self.actors[i].info.remote()
            self._wake_on(self.probes[i])

    def _check_probes(self) -> None:
        if not self.probes:
            return
        ready, _ = ray.wait(list(self.probes.values()), num_returns=len(self.probes), timeout=0)
        for i, ref in list(self.probes.items()):
            if ref in ready:
                del self.probes[i]
                try:
                    info = ray.get(ref)
                except RayActorError:
                    self.probes[i] = self.actors[i].info.remote()
                    self._wake_on(self.probes[i])
                    continue
                self.pids[i], self.nodes[i] = info["pid"], info["node_id"]
                log.info("actor %d restarted: pid %d on node %s", i, info["pid"], info["node_id"])
                if self.lane is not None:  # calls handed to the incarnation that died
                    self.lane.fail_actor(i, ActorDied(f"actor {i} restarted"))
                self._serve(i)

    def reload(self, product: str, timeout: float = 60.0) -> list[dict[str, str]]:
        """Publish a product's ``current`` (and shadow) model and load it in every live actor (hot swap);
        returns what each loaded, and where. An actor that died meanwhile is skipped: Ray's
        restart loads the published model itself."""
        self.publish(product)
        refs = [a.reload.remote(product) for a in self.actors]
        loaded = []
        for ref in refs:
            try:
                loaded.append(ray.get(ref, timeout=timeout))
            except RayActorError:  # dispatch notices the death on its own; nothing shared is touched here
                log.warning("an actor died during the reload of %s; its restart loads the current model", product)
        if not loaded:
            raise RuntimeError("no actor is alive to load the model")
        return loaded

    def shutdown(self) -> None:
        for a in [*self.actors, self.registry]:
            ray.kill(a, no_restart=True)
        if self.lane is not None:
            self.lane.close()
