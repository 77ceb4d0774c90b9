"""The scoring worker that runs inside a Ray actor: it holds every product's model.

The class is plain Python so it can be tested in-process; the daemon wraps it with
``ray.remote``. Models are loaded once at start (and again after Ray restarts a dead actor)
and swapped per product by ``reload``, which is how a product changes scorer without a
restart. ``score`` returns plain data (no custom classes) so Ray moves results cheaply.
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
from workers.frame_scoring import score_frame
from workers.model_store import (
    ZERO_SHOT_MODEL,
    ProductModel,
    enrolled_products,
    load_product_model,
    product_dir,
)
from workers.preprocess import PreparedCloud

log = logging.getLogger("inspectd.worker")


class ScoringWorker:
    """Scores frames of every enrolled product in ``models_dir``; a product without a model of
    its own is scored by the cold-start model (``_zeroshot``) when there is one."""

    def __init__(
        self, models_dir: str, products: list[str] | None = None, threads: int = 1, backend: str = "auto"
    ) -> None:
        torch.set_num_threads(threads)
        self.models_dir = models_dir
        self.requested_backend = backend
        self.backends: dict[str, str] = {}
        self.models: dict[str, ProductModel] = {}
        for product in products if products is not None else enrolled_products(models_dir):
            self.reload(product)
        if (product_dir(models_dir, ZERO_SHOT_MODEL) / "meta.json").is_file():
            self.reload(ZERO_SHOT_MODEL)
        self.pid = os.getpid()
        self._warm_up()

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

    def reload(self, product: str) -> str:
        """(Re)load one product's model from disk; returns its model version."""
        model = load_product_model(self.models_dir, product)
        backend = resolve_backend(self.requested_backend, model.scorer.backends)
        model.scorer.use_backend(backend, Path(self.models_dir) / ".engine-cache")
        self.models[product] = model
        self.backends[product] = backend
        log.info("loaded %s: %s %s on %s", product, model.meta["scorer"], model.model_version, backend)
        return model.model_version

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "backend": "+".join(sorted(set(self.backends.values()))) or "none",
            "products": {p: m.model_version for p, m in self.models.items()},
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
            "backend": self.backends[model.product],
            "threshold": (model.calibration or {}).get("threshold"),
            "zero_shot": zero_shot,
            "n_scored_points": result.n_scored_points,
            "worker_pid": self.pid,
            "started_at": started,
        }
