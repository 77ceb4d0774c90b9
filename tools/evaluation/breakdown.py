"""Per-defect-kind and per-magnitude figures of an ``inspectd eval``, with bootstrap 95 % intervals.

Why: a benchmark mean without its uncertainty cannot tell two scorers apart, and a mean over all
defects hides the kinds a scorer misses. This module takes the per-sample results of an eval
and gives, for every group of defective test samples (all of them, one defect kind, one
magnitude bin, one kind in one bin), the I-AUROC of that group against the class's good test
parts, per class and as the mean over classes, with a bootstrap 95 % percentile interval on the
mean; and the same interval for the P-AUROC mean.

Bootstrap (``B`` replicates, seeded): within every class, the good and the defective test
samples of the group are resampled with replacement, separately (so each replicate has both
labels), the class's AUROC recomputed, and the replicate's value is the mean over classes. It
is vectorized: an I-AUROC replicate is ``w_good · C · w_def / (n_good n_def)`` with ``C`` the
pairwise comparison matrix (1 where the defective sample scores higher, ½ on ties) and ``w``
the resampling counts. A P-AUROC replicate resamples whole samples: every sample's pixel / point
scores are histogrammed once into ``PIXEL_BINS`` class-wide quantile bins (anomalous and normal
separately), a replicate sums the histograms with its counts and integrates the ROC from them
(ties within a bin count ½). The point value printed is the exact metric; only the interval
comes from the binned statistic. AUPRO is given per class and as a mean, without interval.

Magnitude bins: ``tools.synth.writer`` records a severity in [0, 1] per defective sample (its place in
its kind's range, from subtle to gross) and a bin: ``subtle`` [0, ⅓), ``moderate`` [⅓, ⅔),
``gross`` [⅔, 1]. Samples of a dataset without that record have no bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAGNITUDE_BINS", "PixelHistograms", "SampleResult", "breakdown", "pixel_histograms", "p_auroc_interval",
           "severity_bin"]

MAGNITUDE_BINS = ("subtle", "moderate", "gross")
BOOTSTRAP = 2000
PIXEL_BINS = 512
CONFIDENCE = 0.95


@dataclass
class SampleResult:
    """What the breakdown needs of one scored (or failed) test sample."""

    cls: str
    name: str
    defect: str
    label: int
    object_score: float
    magnitude_bin: str | None = None
    failed: bool = False


@dataclass
class PixelHistograms:
    """Per-sample histograms of one class's pixel / point scores: (n_samples, PIXEL_BINS) each."""

    positive: np.ndarray
    negative: np.ndarray
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def severity_bin(severity: float | None) -> str | None:
    """``subtle`` / ``moderate`` / ``gross`` for a severity in [0, 1]; None for None."""
    if severity is None:
        return None
    return MAGNITUDE_BINS[min(int(float(severity) * 3.0), 2)]


def _interval(values: np.ndarray) -> list[float | None]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [None, None]
    a = (1.0 - CONFIDENCE) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return [round(float(lo), 4), round(float(hi), 4)]


def _auroc_replicates(good: np.ndarray, bad: np.ndarray, rng: np.random.Generator, b: int) -> tuple[float, np.ndarray]:
    """Exact AUROC of ``bad`` vs ``good`` scores and ``b`` stratified bootstrap replicates of it."""
    c = (bad[None, :] > good[:, None]).astype(np.float64) + 0.5 * (bad[None, :] == good[:, None])
    ng, nd = len(good), len(bad)
    value = float(c.mean())
    wg = rng.multinomial(ng, np.full(ng, 1.0 / ng), size=b).astype(np.float64)
    wd = rng.multinomial(nd, np.full(nd, 1.0 / nd), size=b).astype(np.float64)
    reps = np.einsum("bi,ij,bj->b", wg, c, wd) / (ng * nd)
    return value, reps


def _group_stats(results: Sequence[SampleResult], select, rng: np.random.Generator, b: int) -> dict[str, Any]:
    """I-AUROC of the defective samples ``select`` picks against the good ones, per class and mean."""
    per_class: dict[str, float] = {}
    reps: list[np.ndarray] = []
    n_def = 0
    for cls in sorted({r.cls for r in results}):
        rows = [r for r in results if r.cls == cls]
        good = np.array([r.object_score for r in rows if r.label == 0], np.float64)
        bad = np.array([r.object_score for r in rows if r.label == 1 and select(r)], np.float64)
        if len(good) == 0 or len(bad) == 0:
            continue
        value, rep = _auroc_replicates(good, bad, rng, b)
        per_class[cls] = round(value, 4)
        reps.append(rep)
        n_def += len(bad)
    if not reps:
        return {"mean": None, "ci95": [None, None], "per_class": {}, "n_defective": 0}
    mean = float(np.mean(list(per_class.values())))
    return {"mean": round(mean, 4), "ci95": _interval(np.mean(reps, axis=0)), "per_class": per_class,
            "n_defective": n_def}


def breakdown(results: Sequence[SampleResult], b: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """I-AUROC (mean over classes, 95 % interval, per class) of all defects, per kind, per
    magnitude bin and per kind × bin; plus the failed samples. See the module doc."""
    rng = np.random.default_rng(seed)
    kinds = sorted({r.defect for r in results if r.label == 1})
    bins = [m for m in MAGNITUDE_BINS if any(r.magnitude_bin == m for r in results if r.label == 1)]
    out: dict[str, Any] = {
        "bootstrap": {"replicates": b, "seed": seed, "confidence": CONFIDENCE,
                      "method": "stratified resampling of good and defective test samples within each class"},
        "i_auroc": _group_stats(results, lambda r: True, rng, b),
        "per_defect": {k: _group_stats(results, lambda r, k=k: r.defect == k, rng, b) for k in kinds},
        "per_magnitude": {m: _group_stats(results, lambda r, m=m: r.magnitude_bin == m, rng, b) for m in bins},
        "per_defect_magnitude": {
            k: {m: _group_stats(results, lambda r, k=k, m=m: r.defect == k and r.magnitude_bin == m, rng, b)["mean"]
                for m in bins}
            for k in kinds
        } if bins else {},
        "n_failed": sum(r.failed for r in results),
    }
    return out


def pixel_histograms(maps: Sequence[np.ndarray], gts: Sequence[np.ndarray], labels: Sequence[int]) -> PixelHistograms:
    """Histograms of each sample's scores (NaN → the class's lowest score) over class-wide quantile bins."""
    finite = [np.ravel(m)[np.isfinite(np.ravel(m))] for m in maps]
    allv = np.concatenate(finite) if finite else np.zeros(0)
    if allv.size == 0:
        z = np.zeros((len(maps), PIXEL_BINS))
        return PixelHistograms(z, z.copy(), np.asarray(labels))
    sub = allv[:: max(1, allv.size // 200_000)]
    edges = np.unique(np.quantile(sub, np.linspace(0.0, 1.0, PIXEL_BINS + 1)[1:-1]))
    low = float(allv.min())
    pos = np.zeros((len(maps), PIXEL_BINS))
    neg = np.zeros((len(maps), PIXEL_BINS))
    for i, (m, g) in enumerate(zip(maps, gts, strict=True)):
        s = np.nan_to_num(np.ravel(m).astype(np.float64), nan=low)
        idx = np.searchsorted(edges, s, side="right")
        y = np.ravel(g) != 0
        pos[i] = np.bincount(idx[y], minlength=PIXEL_BINS)[:PIXEL_BINS]
        neg[i] = np.bincount(idx[~y], minlength=PIXEL_BINS)[:PIXEL_BINS]
    return PixelHistograms(pos, neg, np.asarray(labels))


def _hist_auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from binned counts (rows = replicates); ties within a bin count ½."""
    below = np.cumsum(neg, axis=-1) - neg
    p, n = pos.sum(axis=-1), neg.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((pos * (below + 0.5 * neg)).sum(axis=-1)) / (p * n)


def p_auroc_interval(hists: dict[str, PixelHistograms], b: int = BOOTSTRAP, seed: int = 1) -> list[float | None]:
    """Bootstrap 95 % interval of the mean over classes of the P-AUROC (samples resampled per class,
    good and defective separately)."""
    rng = np.random.default_rng(seed)
    reps = []
    for h in hists.values():
        w = np.zeros((b, len(h.labels)))
        for lab in (0, 1):
            idx = np.flatnonzero(h.labels == lab)
            if idx.size:
                w[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=b)
        reps.append(_hist_auroc(w @ h.positive, w @ h.negative))
    if not reps:
        return [None, None]
    return _interval(np.nanmean(np.stack(reps), axis=0))
