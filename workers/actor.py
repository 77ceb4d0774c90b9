"""The scoring worker that runs inside a Ray actor: it holds every product's model.

The class is plain Python so it can be tested in-process; the daemon wraps it with
``ray.remote``. At construction (also when Ray restarts a dead actor with the original
arguments) it scans ``models_dir`` and loads each product's ``current`` revision, the one the
daemon has switched to (``workers.model_store``), so a restarted actor serves the same models
as the others, products enrolled live included. ``reload`` swaps one product's model, which
is how a product changes model without a restart. ``score`` returns plain data (no custom
classes) so Ray moves results cheaply.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensors.frame import Frame
from workers.backends import resolve_backend
from workers.model_store import (
    CURRENT,
    ZERO_SHOT_MODEL,
    ProductModel,
    enrolled_products,
    has_model,
    load_product_model,
)
from workers.preprocess import PreparedCloud
from workers.score_frame import score_frame

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


class ScoringWorker:
    """Scores frames of every enrolled product in ``models_dir``; a product without a model of
    its own is scored by the cold-start model (``_zeroshot``) when there is one."""

    def __init__(self, models_dir: str, threads: int = 1, backend: str = "auto", nice: int = 0) -> None:
        self.nice = nice
        lower_priority(nice)  # before torch starts its thread pool, which then inherits it
        torch.set_num_threads(threads)
        self.models_dir = models_dir
        self.requested_backend = backend
        self.backends: dict[str, str] = {}
        self.models: dict[str, ProductModel] = {}
        self.failed: dict[str, str] = {}
        """Products whose model did not load at start: their frames get an error, never another model."""
        names = enrolled_products(models_dir) + ([ZERO_SHOT_MODEL] if has_model(models_dir, ZERO_SHOT_MODEL) else [])
        for product in names:
            try:
                self.reload(product)
            except Exception as e:  # one broken artifact must not crash-loop the actor
                log.error("cannot load %s: %s", product, e)
                self.failed[product] = f"{type(e).__name__}: {e}"
        self.pid = os.getpid()
        self._warm_up()
        lower_priority(nice)  # threads started since (Ray's, torch's) too

    def _warm_up(self) -> None:
        """Score a small synthetic cloud once per model, so the first real part does not pay
        for lazy library initialization (thread pools, kernels)."""
        rng = np.random.default_rng(0)
        pts = rng.uniform(0, 20, size=(500, 3)).astype(np.float32)
        cloud = PreparedCloud(points=pts, source_flat=np.arange(500), voxel_of_source=np.arange(500))
        for product, model in self.models.items():
            try:
                model.scorer.score(cloud)
            except Exception as e:  # a warm-up failure is not fatal: the real frames will tell
                log.warning("warm-up of %s failed: %s", product, e)

    def reload(self, product: str) -> dict[str, str]:
        """(Re)load one product's ``current`` revision; returns its ``model_version`` and
        ``model_revision``. A model that fails to load leaves the old one in place."""
        model = load_product_model(self.models_dir, product, CURRENT)
        backend = resolve_backend(self.requested_backend, model.scorer.backends)
        model.scorer.use_backend(backend, Path(self.models_dir) / ".engine-cache")
        self.models[product] = model
        self.backends[product] = backend
        self.failed.pop(product, None)
        log.info("loaded %s: %s %s (revision %s) on %s", product, model.meta["scorer"], model.model_version,
                 model.revision, backend)
        return {"model_version": model.model_version, "model_revision": model.revision}

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "backend": "+".join(sorted(set(self.backends.values()))) or "none",
            "products": {p: f"{m.model_version}@{m.revision}" for p, m in self.models.items()},
        }

    def score_batch(self, frames: list[Frame]) -> list[dict[str, Any] | BaseException]:
        """Score several frames in one call; a frame that fails gives its exception, not the batch's."""
        out: list[dict[str, Any] | BaseException] = []
        for frame in frames:
            try:
                out.append(self.score(frame))
            except Exception as e:
                out.append(e)
        return out

    def score(self, frame: Frame) -> dict[str, Any]:
        """Score one frame of an enrolled product: object score, anomaly map, stage timings."""
        started = time.time()
        if frame.meta.product in self.failed:
            raise RuntimeError(f"the model of {frame.meta.product!r} failed to load: {self.failed[frame.meta.product]}")
        model = self.models.get(frame.meta.product)
        zero_shot = model is None
        if zero_shot:
            model = self.models.get(ZERO_SHOT_MODEL)
        if model is None:
            raise KeyError(f"product {frame.meta.product!r} has no model and there is no cold-start model")
        result = score_frame(model.scorer, frame, model.preprocess)
        return {
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
