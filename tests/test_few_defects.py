"""Confirmed defects: the label-store reader, the ``fused-defects`` head and the calibration that
trades false rejects against escapes. Without confirmed defects everything is the good-only path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.decision import calibrate_threshold
from daemon.defect_calibration import EscapeCost, calibrate_with_defects, describe_defects
from daemon.enrollment import calibrate, enroll, load_defect_frames
from tests.test_components import l_part
from workers.confirmed import ConfirmedPart, read_confirmed, write_confirmed
from workers.fused import FusedScorer
from workers.fused_defects import FusedDefectsScorer
from workers.preprocess import PreparedCloud, PreprocessParams, voxel_downsample
from workers.registry import load_scorer

FUSED = {"patchcore": {"coreset_ratio": 0.2}}


def prepared(points: np.ndarray) -> PreparedCloud:
    cent, inverse = voxel_downsample(points.astype(np.float32), 1.0)
    return PreparedCloud(points=cent, source_flat=np.arange(len(points)), voxel_of_source=inverse)


def with_blob(points: np.ndarray, x: float, y: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A foreign blob (half sphere, radius 2.5 mm) stuck on the plate's top face at (x, y); its mask."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(600, 3))
    v[:, 2] = np.abs(v[:, 2])
    blob = v / np.linalg.norm(v, axis=1, keepdims=True) * 2.5 + np.array([x, y, 6.0])
    keep = ~((np.abs(points[:, 0] - x) < 2.5) & (np.abs(points[:, 1] - y) < 2.5) & (points[:, 2] > 5.5))
    pts = np.concatenate([points[keep], blob])
    return pts, np.r_[np.zeros(keep.sum(), bool), np.ones(len(blob), bool)]


@pytest.fixture(scope="module")
def scorer() -> FusedDefectsScorer:
    s = FusedDefectsScorer(**FUSED)
    s.fit([prepared(l_part(k)) for k in range(4)])
    return s


def test_without_defects_it_is_fused(scorer: FusedDefectsScorer) -> None:
    plain = FusedScorer(**FUSED)
    plain.fit([prepared(l_part(k)) for k in range(4)])
    cloud = prepared(with_blob(l_part(50), 30.0, 10.0, 50)[0])
    a, b = scorer.score(cloud), plain.score(cloud)
    assert len(scorer.defect_bank) == 0
    assert a.object_score == pytest.approx(b.object_score)
    np.testing.assert_allclose(a.point_scores, b.point_scores)


def test_confirmed_defects_raise_a_similar_defect_not_good_parts(scorer: FusedDefectsScorer, tmp_path) -> None:
    good = [prepared(l_part(k)) for k in (100, 101, 102)]
    test_defect = prepared(with_blob(l_part(200), 30.0, 12.0, 200)[0])
    before = [scorer.score(c).object_score for c in good], scorer.score(test_defect).object_score
    confirmed = [with_blob(l_part(300 + k), 15.0 + 5 * k, 8.0, 300 + k) for k in range(3)]
    n = scorer.fit_defects([prepared(p) for p, _ in confirmed], [m for _, m in confirmed])
    try:
        assert n > 0 and scorer.defect_bank.shape == (n, 34)
        after = [scorer.score(c).object_score for c in good], scorer.score(test_defect).object_score
        gain_defect = after[1] - before[1]
        gain_good = max(a - b for a, b in zip(after[0], before[0], strict=True))
        assert gain_defect > 0 and gain_defect > 2 * gain_good
        scorer.save(tmp_path / "m", train_hash="x")
        loaded = load_scorer(tmp_path / "m")
        assert isinstance(loaded, FusedDefectsScorer)
        np.testing.assert_array_equal(loaded.defect_bank, scorer.defect_bank)
        assert loaded.score(test_defect).object_score == pytest.approx(after[1], rel=1e-5)
        # the daemon scores batches: the head is on that path too
        assert scorer.score_many([test_defect])[0].object_score == pytest.approx(after[1])
    finally:
        scorer.fit_defects([], [])
    assert len(scorer.defect_bank) == 0


def test_calibration_uses_defects_and_reports_escapes() -> None:
    rng = np.random.default_rng(0)
    good = np.exp(rng.normal(0.0, 0.2, 40))
    plain = calibrate_threshold(good, 0.01)
    assert calibrate_with_defects(good, [], 0.01) == plain  # no confirmed defects: the good-only record
    defects = np.r_[np.full(3, plain["threshold"] * 0.9), np.linspace(2.5, 4.0, 7)]
    strict = calibrate_with_defects(good, defects, 0.01, cost=EscapeCost(escape_cost=100.0, defect_rate=0.01))
    assert strict["threshold"] == plain["threshold"]  # escapes are expensive: never above the FRR threshold
    d = strict["defects"]
    assert d["escapes"] == 3 and d["escape_rate"] == pytest.approx(0.3)
    assert d["escape_rate_ci95"][0] < 0.3 < d["escape_rate_ci95"][1]
    assert "escape rate 30.0%" in describe_defects(strict)
    cheap = calibrate_with_defects(good, defects, 0.01, cost=EscapeCost(escape_cost=0.01, defect_rate=0.01))
    assert cheap["threshold"] > plain["threshold"] and cheap["expected_frr"] < plain["expected_frr"]
    assert cheap["defects"]["escape_rate"] >= d["escape_rate"]
    assert cheap["expected_frr_ci95"][0] <= cheap["expected_frr"] <= cheap["expected_frr_ci95"][1]


def test_label_store_to_enroll_and_calibrate(tmp_path) -> None:
    from sensors.frame import Frame, FrameMeta

    def frame(points: np.ndarray, k: int) -> Frame:
        return Frame(points=points.astype(np.float32),
                     meta=FrameMeta(sensor_id="s", product="lpart", part_id=f"g{k}", seq=k, capture_time=0.0))

    labels = tmp_path / "labels"
    for k in range(4):
        pts, mask = with_blob(l_part(400 + k), 12.0 + 6 * k, 9.0, 400 + k)
        write_confirmed(labels, ConfirmedPart(f"d{k}", "lpart", "defective", "contamination", pts, mask if k else None))
    (labels / "lpart" / "defective" / "d0.json").write_text(json.dumps({"label": "defective", "kind": "contamination"}))
    parts = read_confirmed(labels, "lpart")
    assert [p.part_id for p in parts] == ["d0", "d1", "d2", "d3"] and parts[0].mask is None and parts[1].mask.any()
    frames = load_defect_frames(labels / "lpart" / "defective", "lpart")
    pp = PreprocessParams(remove_plane=False)
    models = tmp_path / "models"
    good = [frame(l_part(k), k) for k in range(4)]
    enroll(models, "lpart", good, "fused-defects", pp, FUSED, progress=False, defects=frames[:2])
    with pytest.raises(ValueError, match="does not learn from confirmed defects"):
        enroll(models, "lpart", good, "fused", pp, FUSED, progress=False, defects=frames[:2])
    held_out = [frame(l_part(k), k) for k in range(10, 14)]
    rec = calibrate(models, "lpart", held_out, 0.05, progress=False, defects=frames[2:])
    assert rec["defects"]["n_confirmed"] == 2 and rec["threshold"] >= max(rec["good_scores"])
    with pytest.raises(ValueError, match="confirmed defects were used to fit the model"):  # would flatter escapes
        calibrate(models, "lpart", held_out, 0.05, progress=False, defects=frames[:1])
    plain = calibrate(models, "lpart", held_out, 0.05, progress=False)
    assert "defects" not in plain


def test_cli_takes_the_defects_options() -> None:
    from daemon.cli import build_parser

    e = build_parser().parse_args(["enroll", "--product", "p", "--good", "g", "--scorer", "fused-defects",
                                   "--defects", "labels"])
    assert e.defects == "labels" and e.scorer == "fused-defects"
    c = build_parser().parse_args(["calibrate", "--product", "p", "--good", "g", "--defects", "labels",
                                   "--escape-cost", "5", "--defect-rate", "0.02"])
    assert (c.defects, c.escape_cost, c.defect_rate) == ("labels", 5.0, 0.02)
    assert build_parser().parse_args(["calibrate", "--product", "p", "--good", "g"]).defects is None
