"""Score a whole frame: preprocess, run the scorer, map its scores back to the frame.

This is the one path from a ``Frame`` to an anomaly map, used by the daemon's Ray actors, by
``inspectd calibrate`` and by ``inspectd eval``, so what is measured is what is served.
``score_frames`` is the same path for a batch of frames of one model: each frame is
preprocessed and mapped back on its own, and the scorer scores the batch together
(``Scorer.score_many``).

The anomaly map has the frame's layout: H×W for an organized frame, N for a cloud. As served
(``dense=False``), pixels without a measurement are NaN and measured points the preprocessing
set aside as background score 0, so an operator sees the part and nothing else.

``dense=True`` is the map the MVTec 3D-AD evaluation needs: every pixel of the image is scored,
and the ground truth also covers pixels the scorer never saw (a hole through the part shows the
table, which plane removal drops; a crack or a steep flank leaves unmeasured pixels). Methods on
that benchmark produce dense maps by interpolating patch scores over the image. Ours: the
*part region* is the set of scored pixels with its enclosed holes filled
(``scipy.ndimage.binary_fill_holes``), grown by ``DENSE_FILL_PX`` pixels (the unmeasured fringe a
structured-light camera leaves along a depth step is a few pixels wide); every unscored pixel of
that region takes the score of the nearest scored pixel (``distance_transform_edt``), and every
pixel outside it, the table and the void, takes the map's floor (``min(0, lowest score)``).
Filling the whole image from the part instead would paint the table with the scores of the
part's silhouette, high-scoring edges, and so turn most of the image into false positives
(on the synthetic MVTec-layout benchmark: AUPRO 0.51 with the whole image filled, 0.59 with
holes only, 0.86 with holes + 3 px, 0.88 with holes + 10 px; sparse maps 0.46).
``inspectd eval`` uses it for organized data; the object score is the same either way.

Device: when the scorer runs on a GPU (a ``device`` attribute that is not the CPU, e.g.
patchcore-fpfh on ``torch-cuda``), preprocessing runs there too (``prepare(..., device=)``), so
the frame is uploaded once and its voxels reach the scorer without a round trip; the scores
come back to the host for :func:`map_back` (an index scatter, and for dense maps scipy's
distance transform).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from sensors.frame import Frame
from workers.base import Scorer
from workers.preprocess import PreparedCloud, PreprocessParams, prepare

DENSE_FILL_PX = 3
"""How far (pixels) a dense organized map extends past the scored pixels (see the module doc)."""


@dataclass
class FrameScore:
    object_score: float
    anomaly_map: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    n_scored_points: int = 0
    verdict_fields: dict[str, Any] = field(default_factory=dict)
    """What the scorer adds to the verdict header (e.g. the template's registration fitness and
    pose, and ``registration_failed``, which the daemon turns into ``review``)."""


def map_back(cloud: PreparedCloud, point_scores: np.ndarray, frame: Frame, dense: bool = False,
             out: np.ndarray | None = None) -> np.ndarray:
    """Per-voxel scores → an anomaly map over every pixel / point of ``frame``.

    ``dense`` (organized frames only): score the unscored pixels of the part region from the
    nearest scored pixel and the rest with the map's floor (see the module doc). ``out``: a
    float32 array of the frame's pixel / point shape to write the map into (an actor's
    hand-over slot), returned unless ``dense`` builds a new one.
    """
    if out is None:
        full = np.zeros(frame.n_points, dtype=np.float32)
    else:
        full = out.reshape(-1)
        full.fill(0.0)
    full[~frame.valid_mask().reshape(-1)] = np.nan
    full[cloud.source_flat] = point_scores[cloud.voxel_of_source]
    amap = full.reshape(frame.points.shape[:-1])
    if dense and frame.organized and len(cloud.source_flat):
        scored = np.zeros(frame.n_points, dtype=bool)
        scored[cloud.source_flat] = True
        scored = scored.reshape(amap.shape)
        region = ndimage.binary_fill_holes(scored) | ndimage.binary_dilation(scored, iterations=DENSE_FILL_PX)
        _, (rows, cols) = ndimage.distance_transform_edt(~scored, return_indices=True)
        floor = min(0.0, float(point_scores.min())) if len(point_scores) else 0.0
        amap = np.where(region, amap[rows, cols], np.float32(floor))
    return amap


def preprocess_device(scorer: Scorer) -> torch.device | None:
    """Where ``score_frame`` preprocesses for ``scorer``: its device when that is not the CPU, else None."""
    device = getattr(scorer, "device", None)
    if isinstance(device, (str, torch.device)) and torch.device(device).type != "cpu":
        return torch.device(device)
    return None


def score_frame(
    scorer: Scorer,
    frame: Frame,
    params: PreprocessParams,
    dense: bool = False,
    device: str | torch.device | None = "auto",
    out: np.ndarray | None = None,
) -> FrameScore:
    """Preprocess ``frame``, score it, and map the per-point scores back to the frame
    (``dense``, ``out``: see :func:`map_back`). ``device``: where to preprocess; ``"auto"``
    follows the scorer (:func:`preprocess_device`), ``None`` forces the CPU path."""
    t0 = time.perf_counter()
    cloud = prepare(frame, params, preprocess_device(scorer) if device == "auto" else device)
    t1 = time.perf_counter()
    result = scorer.score(cloud)
    t2 = time.perf_counter()
    amap = map_back(cloud, result.point_scores, frame, dense, out)
    t3 = time.perf_counter()
    timings = {"preprocess": t1 - t0, "score": t2 - t1, "map_back": t3 - t2, **result.timings}
    fields = result.verdict_fields() if hasattr(result, "verdict_fields") else {}
    return FrameScore(float(result.object_score), amap, timings, len(cloud.points), fields)


def score_frames(
    scorer: Scorer, frames: Sequence[Frame], params: PreprocessParams,
    outs: Sequence[np.ndarray | None] | None = None,
) -> list[FrameScore | Exception]:
    """:func:`score_frame` for a batch of frames of one model, the scorer's work shared
    (``Scorer.score_many``); ``outs``: each frame's ``out`` (:func:`map_back`). A frame that fails gives its exception, not the batch's: a failing
    preprocessing drops that frame from the batch, a failing batch is scored again frame by frame.
    Each frame's ``score`` timing is the batch's scoring time split evenly."""
    device = preprocess_device(scorer)
    out: list[FrameScore | Exception | None] = [None] * len(frames)
    clouds, idx, prep_s = [], [], []
    for i, frame in enumerate(frames):
        t0 = time.perf_counter()
        try:
            clouds.append(prepare(frame, params, device))
        except Exception as e:
            out[i] = e
            continue
        idx.append(i)
        prep_s.append(time.perf_counter() - t0)
    t1 = time.perf_counter()
    try:
        results: list[Any] = scorer.score_many(clouds) if clouds else []
    except Exception:  # find the frame that fails; the others are scored all the same
        results = []
        for cloud in clouds:
            try:
                results.append(scorer.score(cloud))
            except Exception as e:
                results.append(e)
    score_s = (time.perf_counter() - t1) / max(1, len(clouds))
    for i, cloud, result, ps in zip(idx, clouds, results, prep_s, strict=True):
        if isinstance(result, Exception):
            out[i] = result
            continue
        t2 = time.perf_counter()
        amap = map_back(cloud, result.point_scores, frames[i], out=None if outs is None else outs[i])
        timings = {"preprocess": ps, "score": score_s, "map_back": time.perf_counter() - t2, **result.timings}
        fields = result.verdict_fields() if hasattr(result, "verdict_fields") else {}
        out[i] = FrameScore(float(result.object_score), amap, timings, len(cloud.points), fields)
    return [r for r in out if r is not None]
