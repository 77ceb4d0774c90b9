"""Score normalization by the good-part distribution: one scale for every scorer and product.

Raw scores live in each scorer's own domain (memory-bank distances are non-negative, IMRNet's
standardized scores can be negative), so a fixed number means nothing across scorers. A
``ScoreNormalizer`` is fitted on the scores of good parts (the calibration parts) and maps a
raw score ``s`` to ``(s - center) / scale``: the good-part median goes to 0 and one standard
deviation of good parts is 1 (the median is robust; the standard deviation is stable with the
handful of parts a line has, where the MAD of 4 scores can be near 0 by chance; calibration
refuses outliers before fitting). It is affine with a positive scale, so the order of
scores (and any decision made on them) is unchanged; it applies to object scores and to
per-point anomaly maps alike (vectorized). The decision stage (``daemon.decision``) and any
scorer that fuses several score sources use it; see docs/decision.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ScoreNormalizer:
    """``normalize(s) = (s - center) / scale``; ``center`` and ``scale`` come from good parts."""

    center: float
    scale: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.center) and np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"normalizer needs a finite center and a positive scale, got {self.center}, {self.scale}")

    @classmethod
    def fit(cls, good_scores: Sequence[float] | np.ndarray) -> ScoreNormalizer:
        """Median and standard deviation (ddof=1) of good-part scores.

        Raises ValueError when the scores have no spread at all: nothing can be normalized.
        """
        s = np.asarray(good_scores, dtype=np.float64).reshape(-1)
        if len(s) < 2 or not np.isfinite(s).all():
            raise ValueError("a normalizer needs at least 2 finite good-part scores")
        center = float(np.median(s))
        scale = float(s.std(ddof=1))
        if not scale > 1e-12 * max(1.0, abs(center)):
            raise ValueError("the good-part scores are all equal: no spread to normalize by")
        return cls(center, scale)

    def normalize(self, scores: float | np.ndarray) -> Any:
        """Raw → normalized: a float for a float, a float64 array for an array (NaN stays NaN)."""
        if isinstance(scores, np.ndarray):
            return (scores.astype(np.float64) - self.center) / self.scale
        return (float(scores) - self.center) / self.scale

    def denormalize(self, z: float | np.ndarray) -> Any:
        """Normalized → raw (the inverse of ``normalize``)."""
        if isinstance(z, np.ndarray):
            return z.astype(np.float64) * self.scale + self.center
        return float(z) * self.scale + self.center

    def to_dict(self) -> dict[str, float]:
        return {"center": self.center, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreNormalizer:
        return cls(float(d["center"]), float(d["scale"]))
