"""An example scorer from another package: distance to the nearest good point.

Fit: the good parts' voxel centroids, each part centred on its centroid, pooled into one
reference cloud. Score: every point's distance to the nearest reference point (after centring
the part the same way); the object score is the ``quantile`` of the point scores. It knows
nothing of pose, so it only suits parts that arrive in one pose; its job is to show that a scorer
outside the inspectd repository plugs into ``enroll``, ``eval`` and the daemon through the
``inspectd.scorers`` entry-point group (see this package's pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.base import Scorer, ScoreResult
from workers.components.knn import knn
from workers.params import ScorerParams, fit_field, infer_field
from workers.preprocess import PreparedCloud


class NearestPointParams(ScorerParams):
    max_reference: int = fit_field(50_000, "At most this many reference points are kept (an even stride).", ge=1)
    quantile: float = infer_field(0.99, "Quantile of the point scores that is the object score.", gt=0, le=1)


class NearestPointScorer(Scorer):
    """Distance of each centred point to the nearest centred good point."""

    name = "example-nearest"
    version = "0.1.0"
    Params = NearestPointParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.reference: np.ndarray | None = None

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        ref = np.concatenate([c.points - c.points.mean(axis=0) for c in clouds]).astype(np.float32)
        step = max(1, len(ref) // self.max_reference)
        self.reference = ref[::step]

    def score(self, cloud: PreparedCloud) -> ScoreResult:
        if self.reference is None:
            raise RuntimeError("example-nearest is not fitted")
        if len(cloud.points) == 0:
            return ScoreResult(0.0, np.zeros(0, dtype=np.float32))
        dist, _ = knn(self.reference, cloud.points - cloud.points.mean(axis=0), 1)
        points = dist[:, 0].astype(np.float32)
        return ScoreResult(float(np.quantile(points, self.quantile)), points)

    def tensors(self) -> dict[str, np.ndarray]:
        if self.reference is None:
            raise RuntimeError("example-nearest is not fitted: nothing to save")
        return {"reference": self.reference}

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> NearestPointScorer:
        scorer = cls(**params)
        ref = np.asarray(tensors["reference"], dtype=np.float32)
        if ref.ndim != 2 or ref.shape[1] != 3:
            raise ValueError(f"reference must be N×3, got {ref.shape}")
        scorer.reference = ref
        return scorer
