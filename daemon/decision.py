"""The decision stage: an object score becomes pass, review or fail; and the calibration behind it.

Calibration (``calibrate_threshold``) sets the threshold t from scores of good parts the scorer
was not fitted on, at a target false-reject rate (FRR). It first refuses inputs that would
give a threshold that silently switches inspection off (``CalibrationRefused``, whose message
says what to do): scores outside the scorer's declared domain, near-zero scores (parts the
scorer was fitted on), an implausible spread, too few parts for the target FRR. It then fits
the good scores (log-normal for non-negative scores, normal for real-valued ones) and takes
the (1 - FRR) quantile, never below the largest good score while fewer than 1/FRR parts
were seen (no reject is expected among them). The record carries the good-part
normalization (``workers.normalization``) and the expected FRR with a 95 % interval given n.

The review band is defined on the normalized scale, so it works for any score domain: with
m the good-part median and b the band, ``review_low = t - b(t - m)`` and
``fail_from = t + b(t - m)``. Rules and figures: docs/decision.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy.stats import beta, t

from workers.normalization import ScoreNormalizer

VERDICTS = ("pass", "review", "fail", "error")
SCORE_DOMAINS = ("nonnegative", "real")

MIN_PARTS = 3
"""No calibration below this many parts, whatever the target FRR."""
FRR_TOLERANCE = 5.0
"""Part-count rule: one standard error of the fitted quantile may raise the FRR at most this much."""
MAX_MEDIAN_RATIO = 20.0
"""Non-negative scores: a good part scoring more than this × the median is not plausible."""
NEAR_ZERO_RATIO = 0.01
"""Non-negative scores: below this × the median a part looks like one the scorer was fitted on."""
MAX_LOO_Z = 10.0
"""Real-valued scores: a good score further than this many standard deviations of the other
good scores from their median (leave-one-out, so the outlier does not hide in its own spread)."""
LOO_FALSE_REFUSAL = 1e-3
"""Chance that a calibration on normally distributed good scores is refused as implausible. With
few parts the spread of the others is itself uncertain, so the bound widens (``loo_z_bound``)."""

_N = NormalDist()


class CalibrationRefused(ValueError):
    """The good-part scores cannot give a trustworthy threshold; the message says what to do."""


@dataclass(frozen=True)
class Thresholds:
    """Threshold t, relative review band b and the good-part median m (0 for legacy thresholds)."""

    threshold: float
    review_band: float
    center: float = 0.0

    @property
    def _half_width(self) -> float:
        return self.review_band * abs(self.threshold - self.center)

    @property
    def review_low(self) -> float:
        return self.threshold - self._half_width

    @property
    def fail_from(self) -> float:
        return self.threshold + self._half_width


def decide(score: float, t: Thresholds) -> str:
    """pass / review / fail for one object score (NaN fails: a score that cannot be trusted)."""
    if not np.isfinite(score) or score >= t.fail_from:
        return "fail"
    if score >= t.review_low:
        return "review"
    return "pass"


def quantile_se(n: int, z: float) -> float:
    """Standard error, in fitted standard deviations, of the mean + z·sd quantile estimated
    from n normal samples (delta method: var(mean) = 1/n, var(sd) ≈ 1/(2(n-1)))."""
    return math.sqrt(1.0 / n + z * z / (2.0 * (n - 1)))


def min_parts(target_frr: float) -> int:
    """The fewest good parts that can calibrate at ``target_frr``: the smallest n (at least
    ``MIN_PARTS``) for which the fitted threshold, one standard error too low, still keeps the
    FRR within ``FRR_TOLERANCE`` × target. 4 parts at 5 %, 9 at 1 %, 23 at 0.1 %."""
    z = _N.inv_cdf(1.0 - target_frr)
    limit = min(0.99, FRR_TOLERANCE * target_frr)
    n = MIN_PARTS
    while 1.0 - _N.cdf(z - quantile_se(n, z)) > limit and n < 1_000_000:
        n += 1
    return n


def frr_interval(n: int, z: float, level: float = 0.95) -> tuple[float, float]:
    """Interval of the FRR a threshold fitted at z (fitted standard deviations) has, given n parts."""
    k = _N.inv_cdf(0.5 + level / 2.0) * quantile_se(n, z)
    return 1.0 - _N.cdf(z + k), 1.0 - _N.cdf(z - k)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k rejects observed among n parts."""
    a = (1.0 - level) / 2.0
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def _named(idx: np.ndarray, part_ids: Sequence[str] | None, scores: np.ndarray) -> str:
    shown = [f"{part_ids[i] if part_ids else f'#{i}'} ({scores[i]:.4g})" for i in idx[:5]]
    return ", ".join(shown) + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")


def check_part_count(n: int, target_frr: float) -> None:
    """Refuse fewer than ``min_parts(target_frr)`` calibration parts."""
    need = min_parts(target_frr)
    if n < need:
        raise CalibrationRefused(f"{n} good parts are too few for a target false-reject rate of {target_frr:g}: "
                                 f"it needs at least {need}; add good parts the model was not fitted on, "
                                 "or raise --target-frr")


def _leave_one_out_z(s: np.ndarray) -> np.ndarray:
    """|s_i - median(others)| / std(others), for every i (n ≤ a few hundred: an n×n mask is fine)."""
    n = len(s)
    others = np.broadcast_to(s, (n, n))[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    sd = others.std(axis=1, ddof=1)
    dev = np.abs(s - np.median(others, axis=1))
    return np.where(sd > 0, dev / np.where(sd > 0, sd, 1.0), np.where(dev > 0, np.inf, 0.0))


def loo_z_bound(n: int) -> float:
    """The leave-one-out z a good score may reach among ``n``: ``MAX_LOO_Z``, or more where the
    Student-t bound of ``n`` normal scores at ``LOO_FALSE_REFUSAL`` (over all ``n``) is wider.

    ``(s_i - mean(others)) / std(others)`` of normal scores is ``t(n - 2)`` times
    ``sqrt(1 + 1 / (n - 1))``; with 3 parts that is Cauchy-tailed, and a fixed bound of 10 would
    refuse about one good calibration in five. The median of the others, used here, behaves
    alike: 0.08–0.16 % of normal 3- to 6-part calibrations are refused (20 000 draws each)."""
    if n < 3:
        return math.inf
    q = float(t.ppf(1.0 - LOO_FALSE_REFUSAL / (2 * n), df=n - 2)) * math.sqrt(1.0 + 1.0 / (n - 1))
    return max(MAX_LOO_Z, q)


def check_good_scores(s: np.ndarray, target_frr: float, domain: str, part_ids: Sequence[str] | None) -> ScoreNormalizer:
    """Refuse good-part scores that cannot calibrate (``CalibrationRefused``); their normalizer."""
    if domain not in SCORE_DOMAINS:
        raise ValueError(f"unknown score domain {domain!r}; known: {SCORE_DOMAINS}")
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        raise CalibrationRefused(f"non-finite scores for {_named(bad, part_ids, s)}: check these scans "
                                 "(too few valid points?) and remove them from the calibration folder")
    check_part_count(len(s), target_frr)
    med = float(np.median(s))
    if domain == "nonnegative":
        neg = np.flatnonzero(s < 0)
        if len(neg):
            raise CalibrationRefused(f"negative scores for {_named(neg, part_ids, s)}, but this scorer's scores are "
                                     "non-negative: the model or its artifact is broken; re-enroll it")
        if med <= 0:
            raise CalibrationRefused("the median good score is 0: these parts are the ones the model was fitted on "
                                     "(a memory bank scores its own training parts 0); calibrate on other good parts")
        tiny = np.flatnonzero(s < NEAR_ZERO_RATIO * med)
        if len(tiny):
            raise CalibrationRefused(f"near-zero scores for {_named(tiny, part_ids, s)} (below {NEAR_ZERO_RATIO:g} × the "
                                     "median): these look like parts the model was fitted on; calibrate on other good parts")
        if s.max() > MAX_MEDIAN_RATIO * med:
            top = np.flatnonzero(s > MAX_MEDIAN_RATIO * med)
            raise CalibrationRefused(f"implausible spread: {_named(top, part_ids, s)} score more than {MAX_MEDIAN_RATIO:g} × "
                                     f"the median ({med:.4g}); is a defective part among the good ones? remove it")
    try:
        norm = ScoreNormalizer.fit(s)
    except ValueError:
        raise CalibrationRefused("the good scores are all equal: the scorer does not tell these parts apart "
                                 "(the same scan copied? the model's training parts?); use distinct good parts") from None
    if domain == "real":
        bound = loo_z_bound(len(s))
        far = np.flatnonzero(_leave_one_out_z(s) > bound)
        if len(far):
            raise CalibrationRefused(f"implausible spread: {_named(far, part_ids, s)} lie more than {bound:.3g} standard "
                                     f"deviations of the other good parts from their median ({med:.4g}); a very high "
                                     "score is a defective part among the good ones, a very low one a part the model "
                                     "was fitted on: remove it")
    return norm


def calibrate_threshold(
    good_scores: Sequence[float],
    target_frr: float,
    domain: str = "nonnegative",
    part_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Threshold at ``target_frr`` from good-part scores; returns the calibration record.

    Raises ``CalibrationRefused`` for inputs that cannot give a trustworthy threshold.
    """
    if not 0.0 < target_frr < 0.5:
        raise ValueError(f"target false-reject rate must be in (0, 0.5), got {target_frr}")
    s = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    norm = check_good_scores(s, target_frr, domain, part_ids)
    fitted = np.log(s) if domain == "nonnegative" else s
    mu, sigma = float(fitted.mean()), float(fitted.std(ddof=1))
    z = _N.inv_cdf(1.0 - target_frr)
    q = mu + z * sigma
    threshold = float(np.exp(q) if domain == "nonnegative" else q)
    if len(s) * target_frr < 1.0:  # no reject expected among so few parts: each of them passes or reviews
        threshold = max(threshold, float(s.max()))
    t_fit = float(np.log(threshold)) if domain == "nonnegative" else threshold
    z_eff = (t_fit - mu) / sigma if sigma > 0 else z
    rejects = int((s > threshold).sum())
    lo, hi = frr_interval(len(s), z_eff)
    return {
        "threshold": threshold,
        "target_frr": target_frr,
        "method": ("lognormal" if domain == "nonnegative" else "normal") + "-quantile"
        + (", at least max(good)" if len(s) * target_frr < 1.0 else ""),
        "score_domain": domain,
        "n_good": int(len(s)),
        "min_parts": min_parts(target_frr),
        "good_scores": [float(x) for x in s],
        "normalization": norm.to_dict(),
        "threshold_normalized": norm.normalize(threshold),
        "expected_frr": 1.0 - _N.cdf(z_eff),
        "expected_frr_ci95": [lo, hi],
        "empirical_frr": rejects / len(s),
        "empirical_frr_ci95": list(clopper_pearson(rejects, len(s))),
    }


def thresholds_from(calibration: dict[str, Any] | None, review_band: float, override: float | None = None) -> Thresholds | None:
    """The decision thresholds of a calibration record (the config's override wins over its t)."""
    cal = calibration or {}
    t = override if override is not None else cal.get("threshold")
    if t is None:
        return None
    center = float((cal.get("normalization") or {}).get("center", 0.0))
    return Thresholds(float(t), review_band, center)


def describe(record: dict[str, Any]) -> str:
    """One line for the CLI: threshold, expected FRR with its interval, n."""
    lo, hi = record["expected_frr_ci95"]
    return (f"threshold {record['threshold']:.5g} ({record['threshold_normalized']:.3g} good-part SDs above the median); "
            f"expected false-reject rate {record['expected_frr']:.2%} (95% CI {lo:.2%}–{hi:.2%}, n={record['n_good']}, "
            f"target {record['target_frr']:g}, at least {record['min_parts']} parts needed)")
