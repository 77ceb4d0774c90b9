"""Pin the evaluation metrics (workers.metrics) on small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.metrics import aupro, auroc, gt_regions, p_auroc, pro_curve, roc_curve, trapezoid

# ------------------------------------------------------------------------------------ AUROC


def _pairwise_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auroc_perfect_inverted_tied() -> None:
    y = np.array([0, 0, 0, 1, 1])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), y) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), y) == 0.0
    assert auroc(np.full(5, 0.4), y) == 0.5


def test_auroc_ties_by_hand() -> None:
    # pairs (pos, neg): (.4,.1)=1 (.4,.4)=.5 (.8,.1)=1 (.8,.4)=1 -> 3.5 / 4
    assert auroc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)


def test_auroc_matches_pairwise_and_roc_trapezoid() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 300).astype(float)  # many ties
    y = rng.integers(0, 2, 300)
    a = auroc(s, y)
    assert a == pytest.approx(_pairwise_auc(s, y), abs=1e-12)
    fpr, tpr, thr = roc_curve(s, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(a, abs=1e-12)
    assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_auroc_random_scores_near_half() -> None:
    rng = np.random.default_rng(1234)
    assert auroc(rng.random(20000), rng.integers(0, 2, 20000)) == pytest.approx(0.5, abs=0.02)


def test_auroc_one_class_is_nan() -> None:
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_roc_curve_by_hand() -> None:
    fpr, tpr, thr = roc_curve(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_p_auroc_pools_pixels_and_nan_is_min() -> None:
    m1 = np.array([[0.9, 0.1], [0.2, np.nan]])
    g1 = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    m2 = np.array([0.8, 0.3, 0.05])
    g2 = np.array([1, 0, 0], dtype=np.uint8)
    assert p_auroc([m1, m2], [g1, g2]) == 1.0
    # (the NaN normal pixel of m1 became the minimum, 0.05, still below the positives)
    # a NaN anomalous pixel becomes the minimum finite score 0.5: ties one normal, below the other
    assert p_auroc([np.array([np.nan, 0.5, 0.7])], [np.array([1, 0, 0])]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="shape"):
        p_auroc([m1], [g2])


# ------------------------------------------------------------------------------------ AUPRO


def _tiny() -> tuple[np.ndarray, np.ndarray]:
    """4×4: region A = (0,0),(0,1) (size 2), region B = (3,3) (size 1), 13 normal pixels."""
    m = np.full((4, 4), 0.1)
    g = np.zeros((4, 4), dtype=np.uint8)
    g[0, 0] = g[0, 1] = g[3, 3] = 1
    m[0, 0], m[0, 1], m[3, 3] = 0.9, 0.5, 0.7  # anomalous pixels
    m[2, 0], m[1, 3] = 0.8, 0.6  # two normal pixels scoring high
    return m, g


def test_pro_curve_tiny_by_hand() -> None:
    m, g = _tiny()
    fpr, pro, thr = pro_curve([m], [g])
    # t=.9: A half -> PRO (1/2+0)/2; t=.8: +1 FP; t=.7: B -> (1/2+1)/2; t=.6: +1 FP; t=.5: A full
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1, -np.inf])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 13, 1 / 13, 2 / 13, 2 / 13, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 0.75, 1, 1, 1])


def test_aupro_tiny_by_hand_and_fpr_limit() -> None:
    m, g = _tiny()
    # area to 0.3: .25*(1/13) + .75*(1/13) + 1*(0.3 - 2/13) = 0.3 - 1/13
    assert aupro([m], [g]) == pytest.approx((0.3 - 1 / 13) / 0.3)
    assert aupro([m], [g], fpr_limit=1.0) == pytest.approx(12 / 13)
    assert aupro([m], [g], fpr_limit=2 / 13) == pytest.approx(0.5)  # limit on a curve point
    assert aupro([m], [g], fpr_limit=0.5 / 13) == pytest.approx(0.25)  # interpolated inside a step
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro([m], [g], fpr_limit=bad)


def test_aupro_perfect_inverted_tied() -> None:
    m, g = _tiny()
    perfect = g.astype(float)
    assert aupro([perfect], [g]) == 1.0
    assert aupro([perfect], [g], fpr_limit=0.01) == 1.0
    assert aupro([1.0 - perfect], [g]) == 0.0
    # all tied: one threshold -> curve (0,0)-(1,1); area to .3 = .3²/2 -> normalized .15
    assert aupro([np.full((4, 4), 0.3)], [g]) == pytest.approx(0.15)


def test_aupro_ties_between_normal_and_region_by_hand() -> None:
    m, g = _tiny()
    m[2, 0] = 0.9  # the first FP now ties with half of region A
    # curve: (0,0) (1/13,.25) (1/13,.75) (2/13,.75) (2/13,1) (1,1)
    area = 0.5 * 0.25 / 13 + 0.75 / 13 + (0.3 - 2 / 13)
    assert aupro([m], [g]) == pytest.approx(area / 0.3)


def test_aupro_regions_across_maps_by_hand() -> None:
    m1, g1 = _tiny()  # regions A (2 px), B (1 px), 13 normals
    m2 = np.zeros((4, 4))
    g2 = np.zeros((4, 4), dtype=np.uint8)
    g2[1:3, 1:3] = 1  # region C: 4 px, 12 normals
    m2[1, 1], m2[1, 2] = 0.95, 0.65  # C: 1/4 at .95, 2/4 at .65, rest at 0
    m2[0, 0] = 0.55  # one more FP
    fpr, pro, thr = pro_curve([m1, m2], [g1, g2])
    at = {float(t): (f, p) for t, f, p in zip(thr, fpr, pro, strict=True)}
    n_ok = 25
    assert at[0.95] == pytest.approx((0, (0 + 0 + 0.25) / 3))
    assert at[0.7] == pytest.approx((1 / n_ok, (0.5 + 1 + 0.25) / 3))
    assert at[0.65] == pytest.approx((1 / n_ok, (0.5 + 1 + 0.5) / 3))
    assert at[0.55] == pytest.approx((3 / n_ok, (0.5 + 1 + 0.5) / 3))
    assert at[0.5] == pytest.approx((3 / n_ok, (1 + 1 + 0.5) / 3))
    assert at[0.1] == pytest.approx((14 / n_ok, (1 + 1 + 0.5) / 3))
    # by hand: PRO .25 on FPR [0, 1/25], 2/3 on [1/25, 3/25], 2.5/3 from 3/25 on (next point 14/25)
    area = 0.25 / 25 + 2 * (2 / 3) / 25 + (0.3 - 3 / 25) * 2.5 / 3
    assert aupro([m1, m2], [g1, g2]) == pytest.approx(area / 0.3)


def test_aupro_8_connectivity() -> None:
    g = np.zeros((4, 4), dtype=np.uint8)
    g[0, 0] = g[1, 1] = 1  # diagonal neighbours: one region
    g[3, 3] = 1
    assert gt_regions(g)[1] == 2
    m = np.zeros((4, 4))
    m[0, 0] = 1.0  # hits half of the diagonal region, none of the other
    fpr, pro, _ = pro_curve([m], [g])
    assert pro[1] == pytest.approx(0.25) and fpr[1] == 0.0


def test_aupro_empty_masks() -> None:
    m, g = _tiny()
    extra = np.zeros((4, 4))
    extra[2, 2] = 0.95  # an empty-mask sample adds 16 normals, one of them above everything
    area = (0.25 + 0.75) / 29 + (0.3 - 3 / 29)
    assert aupro([m, extra], [g, np.zeros((4, 4), np.uint8)]) == pytest.approx(area / 0.3)
    assert math.isnan(aupro([extra], [np.zeros((4, 4), np.uint8)]))
    assert math.isnan(aupro([], []))


def test_aupro_nan_scores_are_minimum() -> None:
    m, g = _tiny()
    m[0, 1] = np.nan  # second pixel of A: no measurement -> ties with the 11 normals at 0.1
    y = 0.75 + 0.25 * (0.3 - 2 / 13) / (1 - 2 / 13)
    area = 0.25 / 13 + 0.75 / 13 + 0.5 * (0.75 + y) * (0.3 - 2 / 13)
    assert aupro([m], [g]) == pytest.approx(area / 0.3)


def test_explicit_regions_override() -> None:
    m, g = _tiny()
    regions = g.astype(int)  # A and B declared one region of 3 px
    fpr, pro, _ = pro_curve([m], [g], regions=[regions])
    np.testing.assert_allclose(pro[1:-1], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    with pytest.raises(ValueError, match="disagree"):
        pro_curve([m], [g], regions=[np.zeros((4, 4), int)])


def _two_blob_cloud() -> tuple[np.ndarray, np.ndarray]:
    """A 10×10 grid of spacing 1 on z=0; blob 1 = 2×2 corner, blob 2 = 3×3 opposite corner."""
    ii, jj = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel(), np.zeros(100)], axis=1).astype(np.float32)
    mask = np.zeros(100, dtype=np.uint8)
    mask[((ii < 2) & (jj < 2)).ravel()] = 1
    mask[((ii >= 7) & (jj >= 7)).ravel()] = 1
    return pts, mask


def test_point_cloud_regions_two_blobs() -> None:
    pts, mask = _two_blob_cloud()
    rng = np.random.default_rng(3)
    perm = rng.permutation(100)  # point order must not matter
    lab, n = gt_regions(mask[perm], pts[perm])
    assert n == 2
    assert sorted(np.bincount(lab)[1:].tolist()) == [4, 9]
    assert gt_regions(mask, pts, radius=20.0)[1] == 1  # a huge radius merges them
    assert gt_regions(mask, pts, radius=0.5)[1] == 13  # below the spacing: every point alone


def test_point_cloud_aupro() -> None:
    pts, mask = _two_blob_cloud()
    assert aupro([mask.astype(float)], [mask], points=[pts]) == 1.0
    s = mask.astype(float)
    small_blob = np.flatnonzero(mask)[:4]  # the 2×2 blob comes first in grid order
    s[small_blob] = 0.0  # miss the small blob entirely: PRO caps at 1/2 until all normals
    fpr, pro, _ = pro_curve([s], [mask], points=[pts])
    np.testing.assert_allclose(pro, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1, 1])
    # to 0.3: PRO interpolated from .5 (FPR 0) towards 1 (FPR 1) -> .65 at the limit
    assert aupro([s], [mask], points=[pts]) == pytest.approx(0.5 * (0.5 + 0.65))
    with pytest.raises(ValueError, match="points"):
        aupro([s], [mask])  # 1-D maps need points


def test_trapezoid_matches_mvtec_semantics() -> None:
    x = np.array([0.0, 0.2, 0.4, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    assert trapezoid(x, y) == pytest.approx(0.1 + 0.2 + 0.6)
    assert trapezoid(x, y, x_max=0.1) == pytest.approx(0.5 * 0.5 * 0.1)  # interpolated y=.5
    assert trapezoid(x, y, x_max=0.4) == pytest.approx(0.3)
