"""Score a whole frame: preprocess, run the scorer, map its scores back to the frame.

This is the one path from a ``Frame`` to an anomaly map, used by the daemon's Ray actors, by
``inspectd calibrate`` and by ``inspectd eval``, so what is measured is what is served.

The anomaly map has the frame's layout: H×W for an organized frame, N for a cloud. As served
(``dense=False``), pixels without a measurement are NaN and measured points the preprocessing
set aside as background score 0, so an operator sees the part and nothing else.

``dense=True`` is the map the MVTec 3D-AD evaluation needs: every pixel of the image is scored,
and the ground truth also covers pixels the scorer never saw (a hole through the part shows the
table, which plane removal drops; a crack or a steep flank leaves unmeasured pixels). Methods on
that benchmark produce dense maps by interpolating patch scores over the image; we give each
pixel the scorer did not score the score of the nearest scored pixel (Euclidean distance in the
image grid, ``scipy.ndimage.distance_transform_edt``). ``inspectd eval`` uses it for organized
data; the object score is the same either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from sensors.frame import Frame
from workers.preprocess import PreparedCloud, PreprocessParams, prepare
from workers.scorer import Scorer


@dataclass
class FrameScore:
    object_score: float
    anomaly_map: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    n_scored_points: int = 0


def map_back(cloud: PreparedCloud, point_scores: np.ndarray, frame: Frame, dense: bool = False) -> np.ndarray:
    """Per-voxel scores → an anomaly map over every pixel / point of ``frame``.

    ``dense`` (organized frames only): fill the unscored pixels from the nearest scored pixel.
    """
    full = np.zeros(frame.n_points, dtype=np.float32)
    full[~frame.valid_mask().reshape(-1)] = np.nan
    full[cloud.source_flat] = point_scores[cloud.voxel_of_source]
    amap = full.reshape(frame.points.shape[:-1])
    if dense and frame.organized and len(cloud.source_flat):
        unscored = np.ones(frame.n_points, dtype=bool)
        unscored[cloud.source_flat] = False
        _, (rows, cols) = ndimage.distance_transform_edt(unscored.reshape(amap.shape), return_indices=True)
        amap = amap[rows, cols]
    return amap


def score_frame(scorer: Scorer, frame: Frame, params: PreprocessParams, dense: bool = False) -> FrameScore:
    """Preprocess ``frame``, score it, and map the per-point scores back to the frame
    (``dense``: see :func:`map_back`)."""
    t0 = time.perf_counter()
    cloud = prepare(frame, params)
    t1 = time.perf_counter()
    result = scorer.score(cloud)
    t2 = time.perf_counter()
    amap = map_back(cloud, result.point_scores, frame, dense)
    t3 = time.perf_counter()
    timings = {"preprocess": t1 - t0, "score": t2 - t1, "map_back": t3 - t2, **result.timings}
    return FrameScore(float(result.object_score), amap, timings, len(cloud.points))
