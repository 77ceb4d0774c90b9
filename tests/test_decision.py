"""Threshold calibration and the pass / review / fail decision."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.decision import Thresholds, calibrate_threshold, decide


def test_decide_bands() -> None:
    t = Thresholds(threshold=1.0, review_band=0.1)
    assert decide(0.5, t) == "pass"
    assert decide(0.95, t) == "review"
    assert decide(1.05, t) == "review"
    assert decide(1.1, t) == "fail"
    assert decide(float("nan"), t) == "fail"


def test_calibration_hits_target_frr_on_lognormal_scores() -> None:
    rng = np.random.default_rng(0)
    cal = calibrate_threshold(rng.lognormal(0.0, 0.3, size=200), target_frr=0.05)
    fresh = rng.lognormal(0.0, 0.3, size=20000)
    frr = (fresh >= cal["threshold"]).mean()
    assert 0.02 < frr < 0.08


def test_calibration_never_fails_its_own_good_parts() -> None:
    scores = [0.1, 0.12, 0.11, 0.5]
    cal = calibrate_threshold(scores, target_frr=0.4)
    assert cal["threshold"] >= 0.5 and cal["empirical_frr"] == 0.0


def test_calibration_needs_two_parts() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        calibrate_threshold([0.3], 0.01)
