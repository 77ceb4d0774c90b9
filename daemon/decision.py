"""The decision stage: an object score becomes pass, review or fail.

Calibration (``calibrate_threshold``) sets the threshold t from scores of good parts at a
target false-reject rate. With the handful of good parts a line has at enrollment, an
empirical 99th percentile is just the maximum, so we fit a log-normal to the good scores
(scores are positive distances, right-skewed) and take its (1 - target_frr) quantile, never
below the largest good score seen: the calibration parts themselves all pass or go to review.

A review band of relative width b around t sends borderline parts to a person:
``score < t(1-b)`` passes, ``score >= t(1+b)`` fails, anything between is ``review``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

VERDICTS = ("pass", "review", "fail", "error")


@dataclass(frozen=True)
class Thresholds:
    threshold: float
    review_band: float

    @property
    def review_low(self) -> float:
        return self.threshold * (1.0 - self.review_band)

    @property
    def fail_from(self) -> float:
        return self.threshold * (1.0 + self.review_band)


def decide(score: float, t: Thresholds) -> str:
    """pass / review / fail for one object score (NaN fails: a score that cannot be trusted)."""
    if not np.isfinite(score) or score >= t.fail_from:
        return "fail"
    if score >= t.review_low:
        return "review"
    return "pass"


def calibrate_threshold(good_scores: Sequence[float], target_frr: float) -> dict[str, Any]:
    """Threshold at ``target_frr`` from good-part scores; returns the calibration record."""
    s = np.asarray(good_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        raise ValueError(f"calibration needs at least 2 good parts with finite scores, got {len(s)}")
    logs = np.log(np.maximum(s, 1e-12))
    mu, sigma = float(logs.mean()), float(logs.std(ddof=1))
    z = NormalDist().inv_cdf(1.0 - target_frr)
    threshold = max(float(np.exp(mu + z * sigma)), float(s.max()))
    return {
        "threshold": threshold,
        "target_frr": target_frr,
        "method": "lognormal-quantile, at least max(good)",
        "n_good": int(len(s)),
        "good_scores": [float(x) for x in s],
        "empirical_frr": float((s > threshold).mean()),
    }
