"""Score a whole frame: preprocess, run the scorer, map its scores back to the frame.

This is the one path from a ``Frame`` to an anomaly map, used by the daemon's Ray actors, by
``inspectd calibrate`` and by ``inspectd eval``, so what is measured is what is served.

The anomaly map has the frame's layout: H×W for an organized frame, N for a cloud. Pixels
without a measurement are NaN; measured points the preprocessing set aside as background
score 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sensors.frame import Frame
from workers.preprocess import PreparedCloud, PreprocessParams, prepare
from workers.scorer import Scorer


@dataclass
class FrameScore:
    object_score: float
    anomaly_map: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    n_scored_points: int = 0


def map_back(cloud: PreparedCloud, point_scores: np.ndarray, frame: Frame) -> np.ndarray:
    """Per-voxel scores → an anomaly map over every pixel / point of ``frame``."""
    full = np.zeros(frame.n_points, dtype=np.float32)
    full[~frame.valid_mask().reshape(-1)] = np.nan
    full[cloud.source_flat] = point_scores[cloud.voxel_of_source]
    return full.reshape(frame.points.shape[:-1])


def score_frame(scorer: Scorer, frame: Frame, params: PreprocessParams) -> FrameScore:
    """Preprocess ``frame``, score it, and map the per-point scores back to the frame."""
    t0 = time.perf_counter()
    cloud = prepare(frame, params)
    t1 = time.perf_counter()
    result = scorer.score(cloud)
    t2 = time.perf_counter()
    amap = map_back(cloud, result.point_scores, frame)
    t3 = time.perf_counter()
    timings = {"preprocess": t1 - t0, "score": t2 - t1, "map_back": t3 - t2, **result.timings}
    return FrameScore(float(result.object_score), amap, timings, len(cloud.points))
