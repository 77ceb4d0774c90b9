"""The 3D anomaly-detection metrics of the field: image AUROC, pixel/point AUROC and AUPRO.

Why our own: the numbers we report must be comparable with published MVTec 3D-AD, Real3D-AD and
Anomaly-ShapeNet results, so AUPRO follows the MVTec 3D-AD evaluation script (``compute_pro`` +
``trapezoid``) step by step, and nothing pulls in sklearn. Everything is exact (a sweep over all
distinct scores, sort-based and vectorized), not an approximation on a threshold grid.

Conventions shared by all functions:

* higher score = more anomalous; a sample/pixel is predicted anomalous at threshold ``t`` when
  ``score >= t``.
* labels/masks: non-zero = anomalous.
* NaN scores (a pixel without a measurement) are replaced by the smallest finite score of the
  call (over all maps), i.e. such a pixel is predicted anomalous only at the lowest threshold,
  where everything is. If every score is NaN they all become 0.
* when a metric is undefined (only one class present) the result is NaN, not an exception, so
  a per-class table can still be printed.

Ground-truth regions for AUPRO (see :func:`gt_regions`):

* organized maps (2-D, H×W): 8-connected components of the mask (``scipy.ndimage.label`` with a
  3×3 structure), exactly as MVTec 3D-AD;
* point clouds (1-D maps of N points, ``points`` given): the connected components of the graph
  whose vertices are the anomalous points and whose edges join two anomalous points at most
  ``radius`` apart (default per sample: 2.5 × the median nearest-neighbour spacing of that
  sample's finite points); built with ``scipy.spatial.cKDTree`` and
  ``scipy.sparse.csgraph.connected_components``. An anomalous point with non-finite coordinates
  is a region of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = ["auroc", "roc_curve", "p_auroc", "aupro", "pro_curve", "gt_regions", "trapezoid"]

ArrayList = Sequence[np.ndarray] | np.ndarray


def _nan_to_min(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s)
    nan = np.isnan(s)
    if nan.any():
        s = s.copy()
        finite = s[~nan]
        s[nan] = finite.min() if finite.size else 0.0
    return s


def _scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores).reshape(-1)
    if s.dtype != np.float32:  # float32 stays float32 (faster sort); all else -> float64
        s = s.astype(np.float64)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    return _nan_to_min(s), y != 0


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact area under the ROC curve (ties by the trapezoid rule, i.e. the Mann–Whitney U
    statistic with average ranks, normalized). NaN when only one class is present."""
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s)
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], ss.size]
    avg_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(ss.size)
    ranks[order] = np.repeat(avg_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score: ``(fpr, tpr, thresholds)``, thresholds decreasing.

    The first point is (0, 0) at threshold +inf; the last is (1, 1) at the smallest score.
    FPR (TPR) is NaN throughout when there are no negatives (positives).
    """
    s, y = _scores_labels(scores, labels)
    order = np.argsort(-s)
    ss, ys = s[order], y[order]
    last = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True]) if ss.size else np.zeros(0, dtype=np.intp)
    tps = np.cumsum(ys)[last].astype(np.float64)
    fps = (last + 1) - tps
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps] / n_pos if n_pos else np.full(last.size + 1, np.nan)
        fpr = np.r_[0.0, fps] / n_neg if n_neg else np.full(last.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, ss[last]]


def _as_list(maps: ArrayList, what: str) -> list[np.ndarray]:
    if isinstance(maps, np.ndarray):
        if maps.ndim == 0:
            raise ValueError(f"{what} must be a sequence of per-sample arrays")
        return list(maps)
    return [np.asarray(m) for m in maps]


def p_auroc(score_maps: ArrayList, gt_masks: ArrayList) -> float:
    """Pixel- (point-) level AUROC over all pixels of all samples pooled. NaN scores → minimum."""
    sm, gm = _as_list(score_maps, "score_maps"), _as_list(gt_masks, "gt_masks")
    if len(sm) != len(gm):
        raise ValueError(f"{len(sm)} score maps but {len(gm)} gt masks")
    for i, (s, g) in enumerate(zip(sm, gm, strict=True)):
        if np.shape(s) != np.shape(g):
            raise ValueError(f"sample {i}: score map shape {np.shape(s)} != gt mask shape {np.shape(g)}")
    if not sm:
        return float("nan")
    return auroc(np.concatenate([np.ravel(s) for s in sm]), np.concatenate([np.ravel(g) for g in gm]))


def gt_regions(mask: np.ndarray, points: np.ndarray | None = None, radius: float | None = None) -> tuple[np.ndarray, int]:
    """Label the ground-truth regions of one sample: ``(labels, n)``, labels 0 = normal, 1..n.

    2-D mask without ``points``: 8-connected components. With ``points`` (N×3 or H×W×3, one
    per mask element): components of the radius graph over anomalous points, see the module
    docstring; ``radius`` defaults to 2.5 × the median nearest-neighbour spacing of the
    sample's finite points.
    """
    m = np.asarray(mask) != 0
    if points is None:
        if m.ndim != 2:
            raise ValueError(
                f"a {m.ndim}-D mask needs the sample's points (point-cloud regions) or explicit regions"
            )
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        return lab.astype(np.int64), int(n)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    flat = m.reshape(-1)
    if pts.shape[0] != flat.size:
        raise ValueError(f"{pts.shape[0]} points but the mask has {flat.size} elements")
    labels = np.zeros(flat.size, dtype=np.int64)
    anom = np.flatnonzero(flat)
    if anom.size == 0:
        return labels.reshape(m.shape), 0
    finite = np.isfinite(pts).all(axis=1)
    if radius is None:
        good = pts[finite]
        if good.shape[0] >= 2:
            d, _ = cKDTree(good).query(good, k=2)
            radius = 2.5 * float(np.median(d[:, 1]))
        else:
            radius = 0.0
    a_fin = anom[finite[anom]]
    a_inf = anom[~finite[anom]]
    n = 0
    if a_fin.size:
        pairs = cKDTree(pts[a_fin]).query_pairs(float(radius), output_type="ndarray")
        graph = coo_matrix(
            (np.ones(pairs.shape[0], dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(a_fin.size, a_fin.size)
        )
        n, comp = connected_components(graph, directed=False)
        labels[a_fin] = comp + 1
    labels[a_inf] = n + 1 + np.arange(a_inf.size)
    return labels.reshape(m.shape), int(n + a_inf.size)


def _region_ids(
    gm: list[np.ndarray],
    regions: ArrayList | None,
    points: Sequence[np.ndarray | None] | None,
    radius: float | None,
) -> tuple[np.ndarray, int]:
    """Global region id per pixel over all samples (0 = normal) and the number of regions."""
    ids, total = [], 0
    reg_list = None if regions is None else _as_list(regions, "regions")
    if reg_list is not None and len(reg_list) != len(gm):
        raise ValueError(f"{len(reg_list)} region maps but {len(gm)} gt masks")
    if points is not None and len(points) != len(gm):
        raise ValueError(f"{len(points)} point arrays but {len(gm)} gt masks")
    for i, g in enumerate(gm):
        if reg_list is not None:
            r = np.asarray(reg_list[i]).reshape(-1)
            if r.size != g.size:
                raise ValueError(f"sample {i}: region map has {r.size} elements, gt mask {g.size}")
            if r.size and r.min() < 0:
                raise ValueError(f"sample {i}: region ids must be >= 0")
            if np.any((r > 0) != (g.reshape(-1) != 0)):
                raise ValueError(f"sample {i}: regions (> 0) and gt mask (!= 0) disagree")
            uniq, inv = np.unique(r, return_inverse=True)  # relabel to 0..n (0 stays 0 if present)
            n = int((uniq > 0).sum())
            lab = inv.reshape(-1) + (0 if uniq[0] <= 0 else 1)
        else:
            try:
                lab, n = gt_regions(g, None if points is None else points[i], radius)
            except ValueError as exc:
                raise ValueError(f"sample {i}: {exc}") from None
            lab = lab.reshape(-1)
        ids.append(np.where(lab > 0, lab + total, 0))
        total += n
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), total


def pro_curve(
    score_maps: ArrayList,
    gt_masks: ArrayList,
    regions: ArrayList | None = None,
    *,
    points: Sequence[np.ndarray | None] | None = None,
    radius: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PRO curve of MVTec 3D-AD: ``(fpr, pro, thresholds)`` at every distinct score.

    At threshold ``t`` (pixels with ``score >= t`` predicted anomalous), PRO is the mean over
    all ground-truth regions of all samples of the fraction of the region's pixels predicted
    anomalous, and FPR the fraction of all normal pixels (all samples) predicted anomalous.
    As in MVTec's ``compute_pro`` the curve is framed by (0, 0) (threshold +inf) and (1, 1)
    (threshold -inf) and clipped to <= 1 (computed in float64; MVTec casts FPR to float32).
    ``regions``: optional per-sample integer maps (0 = normal, >0 = region id) replacing the
    computed components; they must agree with the masks. Returns empty arrays when there is no
    region or no normal pixel.

    One sort of all pixels (descending); walking it, a region-k pixel adds 1/|k| to the PRO sum
    (so the running sum per region is its hit count / size) and a normal pixel adds 1 to the FP
    count; the cumulative sums are read at the last pixel of each group of equal scores.
    """
    sm, gm = _as_list(score_maps, "score_maps"), _as_list(gt_masks, "gt_masks")
    if len(sm) != len(gm):
        raise ValueError(f"{len(sm)} score maps but {len(gm)} gt masks")
    for i, (s, g) in enumerate(zip(sm, gm, strict=True)):
        if np.shape(s) != np.shape(g):
            raise ValueError(f"sample {i}: score map shape {np.shape(s)} != gt mask shape {np.shape(g)}")
    rid, n_regions = _region_ids(gm, regions, points, radius)
    empty = np.zeros(0)
    n_ok = int((rid == 0).sum())
    if n_regions == 0 or n_ok == 0:
        return empty, empty, empty
    scores = np.concatenate([np.ravel(s) for s in sm])
    if scores.dtype != np.float32:  # float32 maps are sorted as such (half the memory, faster)
        scores = scores.astype(np.float64)
    scores = _nan_to_min(scores)
    # how much the PRO sum grows when a pixel of region k becomes predicted anomalous: 1/|k|
    sizes = np.bincount(rid, minlength=n_regions + 1).astype(np.float64)
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / sizes[1:]
    order = np.argsort(scores)[::-1]  # descending; order inside a tie group does not matter
    s_sorted = scores[order]
    rid_sorted = rid[order]
    keep = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last pixel of each group of equal scores
    fpr = np.minimum(np.cumsum(rid_sorted == 0)[keep] / n_ok, 1.0)
    pro = np.minimum(np.cumsum(weight[rid_sorted])[keep] / n_regions, 1.0)
    thresholds = np.r_[np.inf, s_sorted[keep].astype(np.float64), -np.inf]
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0], thresholds


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under ``y(x)`` (x sorted ascending) up to ``x_max``, as MVTec's ``trapezoid``.

    If ``x_max`` is not one of the x values, the last segment is cut at ``x_max`` with ``y``
    linearly interpolated between its neighbours.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            ins = int(np.searchsorted(x, x_max, side="right"))  # = bisect.bisect_right
            if not 0 < ins < len(x):
                raise ValueError(f"x_max {x_max} is outside the curve's x range")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        mask = x <= x_max
        x, y = x[mask], y[mask]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(
    score_maps: ArrayList,
    gt_masks: ArrayList,
    fpr_limit: float = 0.3,
    regions: ArrayList | None = None,
    *,
    points: Sequence[np.ndarray | None] | None = None,
    radius: float | None = None,
) -> float:
    """Normalized area under the PRO curve up to ``fpr_limit`` (MVTec 3D-AD's AU-PRO).

    ``score_maps`` / ``gt_masks``: one array per test sample (shapes may differ between
    samples), H×W for organized scans, N for point clouds (then pass ``points``, one N×3 array
    per sample). Regions and NaN handling: see the module docstring; samples with an empty
    mask contribute normal pixels only. The PRO curve (:func:`pro_curve`) is integrated from 0
    to ``fpr_limit`` by the trapezoid rule with linear interpolation at the limit, then divided
    by ``fpr_limit``. NaN if no sample has an anomalous pixel (or no pixel is normal).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(score_maps, gt_masks, regions, points=points, radius=radius)
    if fpr.size == 0:
        return float("nan")
    return trapezoid(fpr, pro, x_max=fpr_limit) / fpr_limit
