"""Score a frame with a product's shadow model: the object score only, never a verdict.

The actor calls this after the live model has scored the frame, in the same call, so the
live verdict waits for it: the cost is the shadow model's preprocessing and scoring (no
anomaly map is built for it, and none travels back). A shadow that fails returns the
error's name and message instead of a score; the daemon records it, and the live result is
untouched.
"""

from __future__ import annotations

import time
from typing import Any

from sensors.frame import Frame
from workers.model_store import ProductModel
from workers.preprocess import prepare
from workers.score_frame import preprocess_device


def score_shadow(model: ProductModel, frame: Frame) -> dict[str, Any]:
    """The shadow model's object score for ``frame`` with what the daemon needs to decide as
    it would have (threshold, normalization, ``registration_failed``), or an ``error``."""
    calibration = model.calibration or {}
    out: dict[str, Any] = {
        "model_version": model.model_version,
        "model_revision": model.revision,
        "threshold": calibration.get("threshold"),
        "normalization": calibration.get("normalization"),
    }
    t0 = time.perf_counter()
    try:
        cloud = prepare(frame, model.preprocess, preprocess_device(model.scorer))
        result = model.scorer.score(cloud)
        fields = result.verdict_fields() if hasattr(result, "verdict_fields") else {}
        out["object_score"] = float(result.object_score)
        out["registration_failed"] = bool(fields.get("registration_failed", False))
        out["error"] = None
    except Exception as e:  # a shadow never fails the frame: the failure is recorded instead
        out["object_score"] = None
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    out["seconds"] = time.perf_counter() - t0
    return out
