"""Scoring a batch of frames together gives what scoring them one by one gives, frame by frame,
and a frame that fails fails alone. Real scorers and simulated parts; speed is measured by
``inspectd bench --batch`` (bench/results/batching-2core.md), never asserted here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_patchcore import BUMP, box_cloud

from sensors.frame import Frame
from sensors.simulated import simulated_parts
from workers.actor import ScoringWorker
from workers.patchcore import PatchCoreFPFHScorer

from conftest import PRODUCT


def float32_distance_tolerance(scores: np.ndarray) -> float:
    """Absolute tolerance between two exact bank searches that sum ``‖b‖² − 2ab + ‖a‖²`` in other
    float32 blocks (a batch and a single part are searched in blocks of other shapes): the
    rounding of that sum is a share of the feature norms, not of the distance, so a near-zero
    distance differs by up to ~1e-3 of the map's largest score while the object score agrees to
    1e-5."""
    return 1e-3 * float(np.nanmax(np.abs(scores)))


def test_patchcore_score_many_equals_score() -> None:
    scorer = PatchCoreFPFHScorer()
    scorer.fit([box_cloud(seed) for seed in range(3)])
    clouds = [box_cloud(100), box_cloud(101, bump=BUMP), box_cloud(102)]
    batch = scorer.score_many(clouds)
    for cloud, together in zip(clouds, batch, strict=True):
        alone = scorer.score(cloud)
        assert together.object_score == pytest.approx(alone.object_score, rel=1e-5)
        np.testing.assert_allclose(together.point_scores, alone.point_scores, rtol=1e-5,
                                   atol=float32_distance_tolerance(alone.point_scores))
    assert not scorer.batches  # measured not to pay on the CPU: the worker scores part by part there


def test_worker_batch_matches_single_frames_and_isolates_failures(
        enrolled_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PatchCoreFPFHScorer, "batch_devices", ("cpu",))  # take the batched path on this CPU
    worker = ScoringWorker(str(enrolled_models))
    assert worker.models[PRODUCT].scorer.batches
    frames: list[Frame] = list(simulated_parts([PRODUCT], 3, 0.0, seed=7, good_only=True))
    stranger = replace(frames[0], meta=replace(frames[0].meta, product="no-such-product"))
    empty = replace(frames[1], points=np.full_like(frames[1].points, np.nan))  # nothing to score
    batch = worker.score_batch([frames[0], stranger, frames[1], empty, frames[2]])
    assert isinstance(batch[1], KeyError) and isinstance(batch[3], Exception)
    for frame, together in zip(frames, [batch[0], batch[2], batch[4]], strict=True):
        alone = worker.score(frame)
        assert isinstance(together, dict)
        assert together["object_score"] == pytest.approx(alone["object_score"], rel=1e-5)
        np.testing.assert_allclose(together["anomaly_map"], alone["anomaly_map"], rtol=1e-5,
                                   atol=float32_distance_tolerance(alone["anomaly_map"]))
        assert together["model_revision"] == alone["model_revision"]
