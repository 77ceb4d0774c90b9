"""Threshold calibration, its refusals, the normalization and the pass / review / fail decision."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.decision import (
    CalibrationRefused,
    Thresholds,
    calibrate_threshold,
    clopper_pearson,
    decide,
    min_parts,
    thresholds_from,
)
from workers.normalization import ScoreNormalizer

HEALTHY = [0.30, 0.35, 0.32, 0.31, 0.33, 0.34, 0.29, 0.36, 0.31]


def test_decide_bands() -> None:
    t = Thresholds(threshold=1.0, review_band=0.1)
    assert decide(0.5, t) == "pass"
    assert decide(0.95, t) == "review"
    assert decide(1.05, t) == "review"
    assert decide(1.1, t) == "fail"
    assert decide(float("nan"), t) == "fail"


def test_review_band_works_for_negative_scores() -> None:
    """The band is placed relative to the good-part median, so it keeps its order below 0."""
    t = Thresholds(threshold=-0.5, review_band=0.1, center=-2.0)
    assert t.review_low < t.threshold < t.fail_from
    assert decide(-2.0, t) == "pass" and decide(-0.5, t) == "review" and decide(0.0, t) == "fail"


def test_calibration_hits_target_frr_on_lognormal_scores() -> None:
    rng = np.random.default_rng(0)
    cal = calibrate_threshold(rng.lognormal(0.0, 0.3, size=200), target_frr=0.05)
    fresh = rng.lognormal(0.0, 0.3, size=20000)
    frr = (fresh >= cal["threshold"]).mean()
    assert 0.02 < frr < 0.08


def test_calibration_of_real_valued_scores_hits_target_frr() -> None:
    """A scorer whose scores may be negative (IMRNet's standardized scores) gets a normal fit."""
    rng = np.random.default_rng(1)
    cal = calibrate_threshold(rng.normal(-1.0, 0.5, size=300), target_frr=0.05, domain="real")
    frr = (rng.normal(-1.0, 0.5, size=20000) >= cal["threshold"]).mean()
    assert 0.02 < frr < 0.08 and cal["score_domain"] == "real"


def test_healthy_calibration_reports_frr_with_interval() -> None:
    cal = calibrate_threshold(HEALTHY, target_frr=0.01)
    assert 0.36 <= cal["threshold"] < 0.45  # above every good part, not far above
    assert cal["empirical_frr"] == 0.0 and cal["n_good"] == 9 and cal["min_parts"] == 9
    lo, hi = cal["expected_frr_ci95"]
    assert lo < cal["expected_frr"] <= 0.01 + 1e-9 < hi < 0.5
    norm = ScoreNormalizer.from_dict(cal["normalization"])
    assert norm.center == pytest.approx(0.32) and cal["threshold_normalized"] == pytest.approx(norm.normalize(cal["threshold"]))


def test_calibration_never_fails_its_own_good_parts() -> None:
    scores = [0.1, 0.12, 0.11, 0.5]
    cal = calibrate_threshold(scores, target_frr=0.2)  # 4 parts × 0.2 < 1 reject expected
    assert cal["threshold"] >= 0.5 and cal["empirical_frr"] == 0.0


@pytest.mark.parametrize(
    ("scores", "domain", "message"),
    [
        ([0.30, 0.35, 0.32, 0.001, 0.33, 0.34, 0.29, 0.36, 0.31], "nonnegative", "fitted on"),  # a training part
        ([0.30, 0.35, 0.32, 0.0, 0.33, 0.34, 0.29, 0.36, 0.31], "nonnegative", "near-zero"),
        ([0.0] * 9, "nonnegative", "median good score is 0"),
        ([0.2, -0.1, 0.3, 0.25, 0.2, 0.3, 0.22, 0.27, 0.24], "nonnegative", "non-negative"),
        ([0.30, 0.35, 0.32, 9.0, 0.33, 0.34, 0.29, 0.36, 0.31], "nonnegative", "× the median"),  # a defective part
        ([-1.0, -0.9, -1.1, -1.05, -0.95, 25.0, -1.0, -0.98, -1.02], "real", "standard deviations of the other"),
        ([0.3] * 9, "nonnegative", "all equal"),
        ([0.30, 0.35, float("nan"), 0.31, 0.33, 0.34, 0.29, 0.36, 0.31], "nonnegative", "non-finite"),
        ([0.30, 0.35, 0.32, 0.31], "nonnegative", "at least 9"),  # too few for 1 %
    ],
)
def test_degenerate_calibrations_are_refused(scores: list[float], domain: str, message: str) -> None:
    with pytest.raises(CalibrationRefused, match=message):
        calibrate_threshold(scores, 0.01, domain=domain)


@pytest.mark.parametrize("n", [3, 4, 6])
def test_normal_good_scores_on_few_parts_are_rarely_refused(n: int) -> None:
    """With few parts the others' spread is uncertain: good normal scores must still calibrate
    (a fixed 10-sigma bound refused about one 3-part calibration in five)."""
    rng = np.random.default_rng(n)
    refused = 0
    for _ in range(2000):
        try:
            calibrate_threshold(list(rng.normal(size=n)), 0.4, domain="real")
        except CalibrationRefused:
            refused += 1
    assert refused <= 10  # 0.1 % expected (LOO_FALSE_REFUSAL); 0.5 % allowed for the draw


def test_refusal_names_the_part_and_what_to_do() -> None:
    ids = [f"p{i}" for i in range(9)]
    scores = list(HEALTHY)
    scores[4] = 1e-5
    with pytest.raises(CalibrationRefused, match=r"p4 .*calibrate on other good parts"):
        calibrate_threshold(scores, 0.01, part_ids=ids)


def test_min_parts_grows_as_the_target_shrinks() -> None:
    assert min_parts(0.05) == 4 and min_parts(0.01) == 9 and min_parts(0.001) == 23
    assert all(min_parts(a) >= min_parts(b) for a, b in [(0.001, 0.01), (0.01, 0.05), (0.05, 0.2)])


def test_clopper_pearson_zero_rejects() -> None:
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))


def test_thresholds_from_calibration_and_override() -> None:
    cal = calibrate_threshold(HEALTHY, 0.01)
    t = thresholds_from(cal, 0.1)
    assert t is not None and t.center == pytest.approx(0.32) and t.threshold == cal["threshold"]
    assert thresholds_from(cal, 0.1, override=0.5).threshold == 0.5  # type: ignore[union-attr]
    assert thresholds_from(None, 0.1) is None
    legacy = thresholds_from({"threshold": 1.0}, 0.1)  # no normalization: the old relative band
    assert legacy is not None and (legacy.review_low, legacy.fail_from) == pytest.approx((0.9, 1.1))


def test_normalizer_round_trip_vectorized() -> None:
    norm = ScoreNormalizer.fit([1.0, 2.0, 3.0, 4.0, 5.0])
    x = np.array([0.0, 3.0, np.nan])
    z = norm.normalize(x)
    assert z[1] == 0.0 and np.isnan(z[2]) and np.allclose(norm.denormalize(z[:2]), x[:2])
    assert ScoreNormalizer.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="all equal"):
        ScoreNormalizer.fit([2.0, 2.0, 2.0])
