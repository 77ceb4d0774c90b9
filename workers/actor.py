"""The scoring worker that runs inside a Ray actor: it holds every product's model.

The class is plain Python so it can be tested in-process; the daemon wraps it with
``ray.remote``. Its models come from a *source*: in the daemon a ``ModelRegistry`` actor
(``workers.model_registry``) holding each product's current revision as bytes in Ray's object
store, so an actor on any node of a cluster loads them with no shared filesystem; in-process
(tests, tools) a models folder, read the same way (``model_store.read_bundle``). At
construction (also when Ray restarts a dead actor with the original arguments) it loads each
product's current revision from its source, so a restarted actor serves the same models as the
others, products enrolled live included. ``reload`` swaps one product's model, which is how a
product changes model without a restart, and loads or drops its shadow model
(``workers.model_versions``), which scores every frame after the live one without deciding
(``workers.shadow``). ``score`` returns plain data (no custom classes) so Ray moves results
cheaply.

Frames reach it one of two ways (docs/design/daemon-path.md), read in place in shared memory
either way, read-only, never copied into the actor: on the daemon's node through ``serve``, a
loop that runs for the actor's life and takes calls from the daemon's slots in /dev/shm
(``workers.handover``), writing the maps back there; elsewhere through ``score_shared``, a Ray
call with a reference to frames the daemon put into Ray's object store.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import zmq

from sensors.frame import Frame
from workers.backends import resolve_backend
from workers.handover import Slot, read_frames, write_reply
from workers.model_store import (
    CURRENT,
    ZERO_SHOT_MODEL,
    ProductModel,
    enrolled_products,
    has_model,
    load_bundle,
    read_bundle,
)
from workers.model_versions import read_shadow
from workers.preprocess import PreparedCloud
from workers.score_frame import FrameScore, score_frame, score_frames
from workers.shadow import score_shadow

log = logging.getLogger("inspectd.worker")


def lower_priority(nice: int) -> None:
    """Raise the niceness of every thread of this process to at least ``nice``.

    Linux keeps niceness per thread, and ``os.nice`` changes only the calling one, while an actor
    scores on Ray's and torch's threads too. Raising niceness needs no privilege."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tasks = Path(f"/proc/{os.getpid()}/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # the thread ended meanwhile
            pass


HEAP_MMAP_THRESHOLD = 32 * 2**20
"""glibc's largest mmap threshold (64-bit): a block under it comes from the heap."""
HEAP_TRIM_THRESHOLD = 128 * 2**20
"""Free heap an actor keeps rather than return to the kernel: a 1920×1200 frame's temporaries."""


def hold_freed_heap() -> bool:
    """Let freed frame-sized blocks stay in this process's heap for the next frame.

    In a Ray worker glibc handed a frame's temporaries (tens of MB each) back to the kernel
    after every frame, so the next frame faulted its pages in again: 4,000–18,000 page faults
    and ~15 % more time per 1920×1200 frame's preprocessing than in a plain process, where
    glibc's dynamic thresholds had settled (docs/design/daemon-path.md). Fixed thresholds make
    both alike. False where the C library has no ``mallopt`` (not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mmap_set = bool(mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD))
    return mmap_set and bool(mallopt(m_trim_threshold, HEAP_TRIM_THRESHOLD))


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ScoringWorker:
    """Scores frames of every product its model source serves; a product without a model of
    its own is scored by the cold-start model (``_zeroshot``) when there is one.

    ``models``: a models folder (in-process use) or a ``ModelRegistry`` actor handle (the daemon).
    ``cache_dir``: where engines built at load time are kept (default: ``<models>/.engine-cache``
    for a folder, else a temporary folder of this node)."""

    def __init__(self, models: Any, threads: int = 1, backend: str = "auto", nice: int = 0,
                 cache_dir: str | None = None) -> None:
        self.nice = nice
        hold_freed_heap()
        lower_priority(nice)  # before torch starts its thread pool, which then inherits it
        torch.set_num_threads(threads)
        self.source = models
        self.cache_dir = self._cache_dir(models, cache_dir)
        self.requested_backend = backend
        self.backends: dict[str, str] = {}
        self.models: dict[str, ProductModel] = {}
        self.failed: dict[str, str] = {}
        """Products whose model did not load at start: their frames get an error, never another model."""
        self.shadows: dict[str, ProductModel] = {}
        """Each product's shadow model, scored after the live one on every frame, never deciding."""
        self.node_id = node_id()
        for product in self._products():
            try:
                self.reload(product)
            except Exception as e:  # one broken artifact must not crash-loop the actor
                log.error("cannot load %s: %s", product, e)
                self.failed[product] = f"{type(e).__name__}: {e}"
        self.pid = os.getpid()
        self._warm_up()
        lower_priority(nice)  # threads started since (Ray's, torch's) too

    @staticmethod
    def _cache_dir(models: Any, cache_dir: str | None) -> Path:
        if isinstance(models, (str, Path)):
            return Path(models) / ".engine-cache"
        if cache_dir is not None and Path(cache_dir).parent.is_dir():
            return Path(cache_dir)
        return Path(tempfile.gettempdir()) / "inspectd-engine-cache"

    def _products(self) -> list[str]:
        """Products the source serves (the cold-start model included)."""
        if isinstance(self.source, (str, Path)):
            zero = [ZERO_SHOT_MODEL] if has_model(self.source, ZERO_SHOT_MODEL) else []
            return enrolled_products(self.source) + zero
        import ray

        return ray.get(self.source.products.remote())

    def _bundle(self, product: str, shadow: bool = False) -> dict[str, Any] | None:
        """The product's current revision as bytes (``model_store.read_bundle``), or with
        ``shadow`` its shadow revision (None when it has none), from the source."""
        if isinstance(self.source, (str, Path)):
            if not shadow:
                return read_bundle(self.source, product, CURRENT)
            revision = read_shadow(self.source, product)
            return None if revision is None else read_bundle(self.source, product, revision=revision)
        import ray

        ref = ray.get(self.source.get.remote(product, shadow))
        if ref is None:
            if shadow:
                return None
            raise FileNotFoundError(f"no model for {product!r} is published")
        return ray.get(ref[0])

    def _warm_up(self) -> None:
        """Score a small synthetic cloud once per model, so the first real part does not pay
        for lazy library initialization (thread pools, kernels)."""
        rng = np.random.default_rng(0)
        pts = rng.uniform(0, 20, size=(500, 3)).astype(np.float32)
        cloud = PreparedCloud(points=pts, source_flat=np.arange(500), voxel_of_source=np.arange(500))
        for product, model in [*self.models.items(), *self.shadows.items()]:
            try:
                model.scorer.score(cloud)
            except Exception as e:  # a warm-up failure is not fatal: the real frames will tell
                log.warning("warm-up of %s failed: %s", product, e)

    def reload(self, product: str) -> dict[str, Any]:
        """(Re)load one product's current revision from the source (kept when already loaded:
        revisions never change), then its shadow revision, or drop the shadow when none is served.
        Returns ``model_version``, ``model_revision``, ``shadow_revision``, ``shadow_error`` and
        this actor's ``node_id``. A live model that fails to load leaves the old one in place; a
        shadow that fails is dropped and named in ``shadow_error``, the live model untouched."""
        bundle = self._bundle(product)
        loaded = self.models.get(product)
        if loaded is None or loaded.revision != bundle["revision"]:
            model = self._load(bundle)
            self.models[product] = model
            self.backends[product] = self._backend_of(model)
            self.failed.pop(product, None)
            log.info("loaded %s: %s %s (revision %s) on %s", product, model.meta["scorer"], model.model_version,
                     model.revision, self.backends[product])
        shadow_error = self._reload_shadow(product)
        model, shadow = self.models[product], self.shadows.get(product)
        return {"model_version": model.model_version, "model_revision": model.revision,
                "shadow_revision": shadow.revision if shadow else None, "shadow_error": shadow_error,
                "node_id": self.node_id}

    def _load(self, bundle: dict[str, Any]) -> ProductModel:
        """Load a bundle on the backend this actor uses."""
        model = load_bundle(bundle)
        model.scorer.use_backend(self._backend_of(model), self.cache_dir)
        return model

    def _backend_of(self, model: ProductModel) -> str:
        return resolve_backend(self.requested_backend, model.scorer.backends)

    def _reload_shadow(self, product: str) -> str | None:
        """Follow the source's shadow revision; returns why the shadow could not be loaded, if it could not."""
        try:
            bundle = self._bundle(product, shadow=True)
        except Exception as e:  # a shadow that cannot even be read never touches the live model
            self.shadows.pop(product, None)
            return f"{type(e).__name__}: {e}"[:500]
        held = self.shadows.get(product)
        if bundle is None:
            self.shadows.pop(product, None)
            return None
        if held is not None and held.revision == bundle["revision"]:
            return None
        try:
            self.shadows[product] = self._load(bundle)
        except Exception as e:  # a broken shadow never touches the live model
            self.shadows.pop(product, None)
            log.error("cannot load the shadow revision %s of %s: %s", bundle["revision"], product, e)
            return f"{type(e).__name__}: {e}"[:500]
        log.info("shadow of %s: revision %s (%s)", product, bundle["revision"], self.shadows[product].model_version)
        return None

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "node_id": self.node_id,
            "backend": "+".join(sorted(set(self.backends.values()))) or "none",
            "products": {p: f"{m.model_version}@{m.revision}" for p, m in self.models.items()},
            "shadows": {p: f"{m.model_version}@{m.revision}" for p, m in self.shadows.items()},
        }

    def touch(self, shared: list[Any]) -> int:
        """Read one byte of every page of the arrays the references in ``shared[0]`` hold, so this
        process has that part of Ray's object store mapped before frames arrive there
        (``daemon.pool.ActorPool.warm_store``). Returns the bytes read."""
        import ray

        blocks = ray.get(shared[0])
        for b in blocks:
            b[::4096].sum()
        return sum(b.nbytes for b in blocks)

    def score_shared(self, shared: list[Any]) -> list[dict[str, Any] | BaseException]:
        """``score_batch`` for the frames of ``shared[0]``, a reference to a list of frames in
        Ray's object store (nested in a list so that Ray hands over the reference, not the
        frames). Fetching it maps the frames' arrays from shared memory without a copy; each
        result's ``timings`` get that as ``deserialize``, and ``finished_at`` (wall clock) when
        the call returns, from which the daemon times the way back."""
        started = time.time()
        t0 = time.perf_counter()
        frames = ray.get(shared[0])
        deserialize = time.perf_counter() - t0
        out = self.score_batch(frames, started)
        finished = time.time()
        for r in out:
            if isinstance(r, dict):
                r["timings"]["deserialize"] = deserialize
                r["finished_at"] = finished
        return out

    @ray.method(concurrency_group="handover")
    def serve(self, requests: str, replies: str, slots_dir: str) -> int:
        """Score the calls the daemon hands over through shared memory (``workers.handover``)
        until it sends ``stop`` or goes away; returns the calls served.

        Runs for the actor's life in its own concurrency group, so ``info``, ``reload`` and
        ``score_shared`` still answer. ``requests``: the daemon's PUSH endpoint for this actor;
        ``replies``: its PULL endpoint; ``slots_dir``: the daemon's slot files. Each request
        names its frame slot and each frame's map slot, and where the arrays sit; the reply
        carries the results as JSON, their maps written into the map slots, and the same
        timings as ``score_shared`` (``deserialize``: mapping the frames; a slot file is mapped,
        and its pages read once, the first time a request names it)."""
        lower_priority(self.nice)  # this group's thread started after __init__
        ctx = zmq.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.connect(requests)
        push.connect(replies)
        slots: dict[str, Slot] = {}
        served = 0
        try:
            while True:
                request = json.loads(pull.recv())
                if request.get("stop"):
                    return served
                push.send_multipart([str(request["call"]).encode(), self._serve_one(request, slots, Path(slots_dir))])
                served += 1
        finally:
            pull.close(0)
            push.close(0)
            ctx.term()

    def _serve_one(self, request: dict[str, Any], slots: dict[str, Slot], slots_dir: Path) -> bytes:
        """One handed-over call: its reply. A call that cannot be read or answered gets each of
        its frames' error, and the loop goes on."""
        started = time.time()
        t0 = time.perf_counter()
        descs = request["frames"]
        try:
            names = [request["frame_slot"], *(d["map"]["slot"] for d in descs)]
            for name in names:  # mapped, and its pages read, the first time a request names it
                if name not in slots:
                    slots[name] = Slot(slots_dir / name)
            map_slots = [slots[name].array for name in names[1:]]
            frames, maps = read_frames(slots[names[0]].array, map_slots, descs)
            deserialize = time.perf_counter() - t0
            out = self.score_batch(frames, started, maps)
            finished = time.time()
            for r in out:
                if isinstance(r, dict):
                    r["timings"]["deserialize"] = deserialize
                    r["finished_at"] = finished
            return write_reply(map_slots, descs, out)
        except Exception as e:
            log.exception("handed-over call %s failed", request.get("call"))
            return write_reply([None] * len(descs), descs, [e] * len(descs))

    def score_batch(self, frames: list[Frame], started: float | None = None,
                    maps: list[np.ndarray] | None = None) -> list[dict[str, Any] | BaseException]:
        """Score several frames in one call; a frame that fails gives its exception, not the batch's.
        ``started``: when the call began (wall clock; default now), reported as ``started_at``;
        ``maps``: where to write each frame's anomaly map (``workers.score_frame.map_back``).

        Frames of one model are scored together (``workers.score_frame.score_frames``) where
        the scorer's batching was measured to pay on its device (``Scorer.batches``); elsewhere,
        and for a single frame, one by one."""
        started = time.time() if started is None else started
        out: list[dict[str, Any] | BaseException | None] = [None] * len(frames)
        groups: dict[str, list[int]] = {}
        for i, frame in enumerate(frames):
            try:
                model, _ = self._model_for(frame)
            except Exception as e:
                out[i] = e
                continue
            groups.setdefault(model.product, []).append(i)
        for members in groups.values():
            model, zero_shot = self._model_for(frames[members[0]])
            if len(members) > 1 and model.scorer.batches:
                results: list[Any] = score_frames(model.scorer, [frames[i] for i in members], model.preprocess,
                                                  None if maps is None else [maps[i] for i in members])
                for i, r in zip(members, results, strict=True):
                    out[i] = r if isinstance(r, Exception) else self._reply(model, r, zero_shot, started, frames[i])
                continue
            for i in members:
                try:
                    out[i] = self.score(frames[i], started, None if maps is None else maps[i])
                except Exception as e:
                    out[i] = e
        return [r for r in out if r is not None]

    def _model_for(self, frame: Frame) -> tuple[ProductModel, bool]:
        """The model that scores ``frame`` and whether it is the cold-start model."""
        if frame.meta.product in self.failed:
            raise RuntimeError(f"the model of {frame.meta.product!r} failed to load: {self.failed[frame.meta.product]}")
        model = self.models.get(frame.meta.product)
        if model is not None:
            return model, False
        model = self.models.get(ZERO_SHOT_MODEL)
        if model is None:
            raise KeyError(f"product {frame.meta.product!r} has no model and there is no cold-start model")
        return model, True

    def score(self, frame: Frame, started: float | None = None, out: np.ndarray | None = None) -> dict[str, Any]:
        """Score one frame of an enrolled product: object score, anomaly map, stage timings.
        ``started``: when the call began (wall clock; default now), reported as ``started_at``;
        ``out``: where to write the anomaly map."""
        started = time.time() if started is None else started
        model, zero_shot = self._model_for(frame)
        return self._reply(model, score_frame(model.scorer, frame, model.preprocess, out=out), zero_shot, started,
                           frame)

    def _reply(self, model: ProductModel, result: FrameScore, zero_shot: bool, started: float,
               frame: Frame) -> dict[str, Any]:
        """What the daemon gets for one frame: plain data only, so Ray moves it cheaply. The
        product's shadow model, if any, scores the frame here, after the live one."""
        shadow_model = None if zero_shot else self.shadows.get(frame.meta.product)
        shadow = score_shadow(shadow_model, frame) if shadow_model is not None else None
        if shadow is not None:  # what the shadow adds to this verdict's latency
            result.timings["shadow"] = shadow["seconds"]
        return {
            "shadow": shadow,
            "object_score": result.object_score,
            "anomaly_map": result.anomaly_map,
            "timings": result.timings,
            "scorer": model.meta["scorer"],
            "model_version": model.model_version,
            "model_revision": model.revision,
            "backend": self.backends[model.product],
            "threshold": (model.calibration or {}).get("threshold"),
            "normalization": (model.calibration or {}).get("normalization"),
            "zero_shot": zero_shot,
            "n_scored_points": result.n_scored_points,
            "verdict_fields": result.verdict_fields,
            "worker_pid": self.pid,
            "started_at": started,
        }
