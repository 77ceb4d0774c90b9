"""Shadow models on the daemon's side: the verdict a shadow would have given, and the report
that compares it with the live model.

The actor scores each frame of a product with a shadow model after the live one
(``workers.shadow``). ``judge_shadow`` applies the decision stage to the shadow's score with
the shadow's own calibration, exactly as the live verdict was decided, counts the comparison
in the metrics and returns the row the emitter writes to the ``shadow_scores`` table, next to
the live verdict's row. The live verdict is never changed. ``shadow_report`` is what
``GET /v1/shadow?product=P`` answers (docs/model-updates.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from daemon.decision import Thresholds, decide
from daemon.metrics import DaemonMetrics
from daemon.resultlog import LogReader

MAX_DISAGREEMENTS = 1000
"""The most disagreements one report lists (newest first)."""
DISTRIBUTION_ROWS = 5000
"""Score distributions in the report are taken over the newest this many rows."""


def normalized(score: float | None, normalization: dict[str, Any] | None) -> float | None:
    """``score`` in good-part standard deviations above the good-part median, when calibrated."""
    if score is None or not normalization or not np.isfinite(score):
        return None
    return (score - normalization["center"]) / normalization["scale"]


def judge_shadow(
    shadow: dict[str, Any],
    live: dict[str, Any],
    thresholds: Callable[[dict[str, Any]], Thresholds | None],
    metrics: DaemonMetrics,
) -> dict[str, Any]:
    """The shadow row for the live verdict header ``live``: the shadow's would-be verdict (its own
    threshold; ``review`` without one or when it could not register the part; ``error`` when it
    failed to score), counted in ``inspectd_shadow_*``. ``verdict_id`` is filled in by the emitter."""
    product = live["product"]
    label = metrics.product_label(product)
    score = shadow.get("object_score")
    if shadow.get("error") is not None or score is None:
        verdict = "error"
        metrics.shadow_errors.labels(product=label).inc()
    else:
        t = thresholds({"threshold": shadow.get("threshold"), "normalization": shadow.get("normalization")})
        verdict = decide(float(score), t) if t is not None else "review"
        if shadow.get("registration_failed"):
            verdict = "review"
        agree = "yes" if verdict == live["verdict"] else "no"
        metrics.shadow_agreement.labels(product=label, agree=agree).inc()
        for model, value in (("live", live.get("score_normalized")),
                             ("shadow", normalized(float(score), shadow.get("normalization")))):
            if value is not None and np.isfinite(value):
                metrics.shadow_score.labels(product=label, model=model).observe(value)
    return {
        "product": product,
        "part_id": live.get("part_id"),
        "live_version": live.get("model_version"),
        "live_revision": live.get("model_revision"),
        "live_score": live.get("score"),
        "live_verdict": live["verdict"],
        "shadow_version": shadow.get("model_version"),
        "shadow_revision": shadow.get("model_revision"),
        "shadow_score": score,
        "shadow_verdict": verdict,
        "shadow_error": shadow.get("error"),
        "shadow_seconds": shadow.get("seconds"),
    }


def _summary(values: list[float]) -> dict[str, float | int | None]:
    """n, mean and the 5th, 50th, 95th percentiles of finite ``values`` (None when empty)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"n": 0, "mean": None, "p05": None, "p50": None, "p95": None}
    p05, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"n": int(len(v)), "mean": float(v.mean()), "p05": float(p05), "p50": float(p50), "p95": float(p95)}


def shadow_report(
    reader: LogReader, product: str, live: dict[str, str | None], shadow: dict[str, str | None], limit: int = 100
) -> dict[str, Any]:
    """Agreement of the shadow with the live model since the shadow was loaded beside the
    revision serving now: ``n`` frames compared, ``agreement`` (share of equal verdicts, None
    before the first), ``shadow_errors``, score distributions and the newest disagreements."""
    pair = (product, str(shadow["revision"]), str(live["revision"]))
    counts = reader.shadow_counts(*pair)
    rows = reader.shadow_rows(*pair, limit=DISTRIBUTION_ROWS)
    scored = [r for r in rows if r["shadow_error"] is None]
    disagreements = reader.shadow_rows(*pair, disagreeing=True, limit=max(1, min(limit, MAX_DISAGREEMENTS)))
    return {
        "product": product,
        "live_version": live["version"],
        "live_revision": live["revision"],
        "shadow_version": shadow["version"],
        "shadow_revision": shadow["revision"],
        "n": counts["compared"],
        "agreement": counts["agreed"] / counts["compared"] if counts["compared"] else None,
        "shadow_errors": counts["errors"],
        "scores": {"live": _summary([r["live_score"] for r in scored]),
                   "shadow": _summary([r["shadow_score"] for r in scored])},
        "disagreements": [
            {k: r[k] for k in ("part_id", "live_score", "shadow_score", "live_verdict", "shadow_verdict", "verdict_id")}
            for r in disagreements
        ],
    }
