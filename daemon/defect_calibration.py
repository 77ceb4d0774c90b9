"""Calibration that also uses operator-confirmed defects: a threshold that trades false rejects
against escapes, with both rates measured.

Good parts alone give a threshold at a target false-reject rate (``daemon.decision``) and say
nothing about the parts that matter most: defective ones that pass (escapes). With confirmed
defects (``workers.confirmed``, from the label store), scored by the model being calibrated,
``calibrate_with_defects`` chooses the threshold by a cost rule:

* the good-only calibration comes first, with all its refusals; its threshold ``t0`` is the
  lowest allowed: a threshold below it would break the target FRR;
* over ``GRID`` thresholds from ``t0`` up (to 3 good-part standard deviations past the highest
  defect score, on the fitted scale), take the t that minimizes the expected cost per part
  ``(1 − π) · FRR(t) + π · R · escape(t)``, with ``FRR(t)`` from the good-part fit (log-normal or
  normal, as the good-only calibration), ``π`` the line's defect rate (``defect_rate``) and ``R``
  the cost of one escape in false rejects (``escape_cost``); on a tie the lowest t;
* ``escape(t)`` is smoothed: each confirmed defect's score is taken as measured with the noise of
  good parts (the good fit's standard deviation σ on the fitted scale), so
  ``escape(t) = mean_i Φ((f(t) − f(d_i)) / σ)``. The raw share of defects below t is a step
  function; with a handful of defects it would put the threshold just under the next defect
  score, where the smallest change of a score makes it escape;
* the record reports the FRR at t (fitted, with its interval given n) and the escape rate at t
  (k of n confirmed defects, Clopper–Pearson 95 % interval), and the escape rate at ``t0`` for
  comparison.

So the threshold only rises above ``t0`` when escapes are cheap against false rejects (a high R
keeps it at t0 and makes the escapes visible). Both rates are measured at the threshold itself;
the review band (``decision.review_band``) sends a part just below t to review, which only
catches more. Caveat written in the record: confirmed defects are those the line found, so
their escape rate is a lower bound of the true one for kinds nobody has seen yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy.special import ndtr

from daemon.decision import calibrate_threshold, clopper_pearson, frr_interval

_N = NormalDist()
GRID = 400
"""Thresholds the cost rule tries between the FRR-only threshold and the highest defect score."""


@dataclass(frozen=True)
class EscapeCost:
    """The cost rule's weights: ``escape_cost`` R (one escape costs R false rejects) and the line's
    ``defect_rate`` π (share of defective parts)."""

    escape_cost: float = 10.0
    defect_rate: float = 0.01

    def __post_init__(self) -> None:
        if not self.escape_cost > 0 or not 0.0 < self.defect_rate < 1.0:
            raise ValueError(f"escape cost must be > 0 and defect rate in (0, 1), got {self.escape_cost}, {self.defect_rate}")


def _escapes(defects: np.ndarray, t: float) -> int:
    return int((defects < t).sum())


def calibrate_with_defects(
    good_scores: Sequence[float],
    defect_scores: Sequence[float],
    target_frr: float,
    domain: str = "nonnegative",
    cost: EscapeCost | None = None,
    part_ids: Sequence[str] | None = None,
    defect_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The calibration record of ``daemon.decision.calibrate_threshold``, with the threshold chosen
    by the cost rule (module doc) when there are confirmed-defect scores, and a ``defects`` entry
    with the escape rates. Without defect scores it is the good-only record unchanged.

    A defect score that is not finite (a scan the model could not score) counts as caught: such a
    part is failed by the decision stage."""
    record = calibrate_threshold(good_scores, target_frr, domain, part_ids)
    d = np.asarray(defect_scores, np.float64).reshape(-1)
    if d.size == 0:
        return record
    cost = cost or EscapeCost()
    d = np.where(np.isfinite(d), d, np.inf)
    s = np.asarray(record["good_scores"], np.float64)
    fitted = np.log(s) if domain == "nonnegative" else s
    mu, sigma = float(fitted.mean()), float(fitted.std(ddof=1))

    def z_of(t: float) -> float:
        f = np.log(t) if domain == "nonnegative" else t
        return (f - mu) / sigma

    t0 = float(record["threshold"])
    f0 = np.log(t0) if domain == "nonnegative" else t0
    finite = d[np.isfinite(d)]
    fd = (np.log(np.maximum(finite, 1e-300)) if domain == "nonnegative" else finite)
    top = max(f0, float(fd.max()) + 3.0 * sigma) if fd.size else f0
    grid = np.linspace(f0, top, GRID) if top > f0 else np.array([f0])
    frr = 1.0 - ndtr((grid - mu) / sigma)
    esc = ndtr((grid[:, None] - fd[None, :]) / sigma).sum(axis=1) / d.size  # non-finite scores never escape
    pi, r = cost.defect_rate, cost.escape_cost
    costs = (1.0 - pi) * frr + pi * r * esc
    best = int(np.argmin(costs))  # argmin takes the first of equal costs: the lowest threshold
    t = float(np.exp(grid[best]) if domain == "nonnegative" else grid[best]) if best else t0
    z_eff = z_of(t)
    lo, hi = frr_interval(len(s), z_eff)
    rejects = int((s > t).sum())
    k, k0 = _escapes(d, t), _escapes(d, t0)
    escaped = [defect_ids[i] if defect_ids else f"#{i}" for i in np.flatnonzero(d < t)]
    record.update({
        "threshold": t,
        "method": record["method"] + f"; then min cost (1-π)·FRR + π·R·escape over t ≥ that (R={r:g}, π={pi:g})",
        "threshold_normalized": (t - record["normalization"]["center"]) / record["normalization"]["scale"],
        "expected_frr": 1.0 - _N.cdf(z_eff),
        "expected_frr_ci95": [lo, hi],
        "empirical_frr": rejects / len(s),
        "empirical_frr_ci95": list(clopper_pearson(rejects, len(s))),
        "defects": {
            "n_confirmed": int(d.size),
            "escape_cost": r,
            "defect_rate": pi,
            "scores": [float(x) for x in d],
            "escapes": k,
            "escape_rate": k / d.size,
            "escape_rate_ci95": list(clopper_pearson(k, int(d.size))),
            "escaped": escaped[:20],
            "frr_only_threshold": t0,
            "frr_only_escape_rate": k0 / d.size,
            "frr_only_escape_rate_ci95": list(clopper_pearson(k0, int(d.size))),
            "expected_escape_rate": float(esc[best]),
            "expected_cost_per_part": float(costs[best]),
            "note": "confirmed defects are the ones the line found: their escape rate is a lower bound for "
                    "defect kinds not among them",
        },
    })
    return record


def describe_defects(record: dict[str, Any]) -> str:
    """One CLI line on the escape side of a calibration record ('' when it has no defects)."""
    d = record.get("defects")
    if not d:
        return ""
    lo, hi = d["escape_rate_ci95"]
    lo0, hi0 = d["frr_only_escape_rate_ci95"]
    return (f"escape rate {d['escape_rate']:.1%} (95% CI {lo:.1%}–{hi:.1%}, {d['escapes']} of {d['n_confirmed']} "
            f"confirmed defects pass); at the FRR-only threshold {d['frr_only_threshold']:.5g}: "
            f"{d['frr_only_escape_rate']:.1%} ({lo0:.1%}–{hi0:.1%}); cost rule R={d['escape_cost']:g}, "
            f"π={d['defect_rate']:g}")
