"""PatchCore-FPFH on synthetic boxes: real open3d, real torch, no mocks."""

from __future__ import annotations

import numpy as np
import pytest

from workers.base import hash_training_data, read_meta
from workers.patchcore import PatchCoreFPFHScorer, greedy_coreset
from workers.preprocess import PreparedCloud, voxel_downsample
from workers.registry import load_scorer

SIZE = (24.0, 18.0, 12.0)
BUMP = (12.0, 9.0, 6.0, 2.0)  # centre x, centre y on the top face, diameter, height (mm)


def box_cloud(seed: int, bump: tuple[float, float, float, float] | None = None) -> PreparedCloud:
    """A randomly sampled, slightly noisy box surface (mm), optionally with a Gaussian bump on top."""
    rng = np.random.default_rng(seed)
    a, b, c = SIZE
    faces = [(a * b, 2, c), (a * b, 2, 0.0), (a * c, 1, b), (a * c, 1, 0.0), (b * c, 0, a), (b * c, 0, 0.0)]
    parts = []
    for area, axis, value in faces:
        p = rng.uniform(0.0, 1.0, (int(area * 5), 3)) * np.array(SIZE)
        p[:, axis] = value
        parts.append(p)
    pts = np.concatenate(parts)
    if bump is not None:
        cx, cy, diameter, height = bump
        top = pts[:, 2] == c
        r2 = (pts[top, 0] - cx) ** 2 + (pts[top, 1] - cy) ** 2
        pts[top, 2] += height * np.exp(-r2 / (2 * (diameter / 4) ** 2))
    pts += rng.normal(0.0, 0.05, pts.shape)
    centroids, _ = voxel_downsample(pts.astype(np.float32), 1.0)
    n = len(centroids)
    return PreparedCloud(points=centroids, source_flat=np.arange(n), voxel_of_source=np.arange(n))


def in_defect(points: np.ndarray) -> np.ndarray:
    cx, cy, diameter, _ = BUMP
    return ((points[:, 0] - cx) ** 2 + (points[:, 1] - cy) ** 2 < diameter**2 / 4) & (
        points[:, 2] > SIZE[2] - 0.5
    )


@pytest.fixture(scope="module")
def train() -> list[PreparedCloud]:
    return [box_cloud(seed) for seed in range(4)]


@pytest.fixture(scope="module")
def fitted(train: list[PreparedCloud]) -> PatchCoreFPFHScorer:
    scorer = PatchCoreFPFHScorer()
    scorer.fit(train)
    return scorer


def test_defect_scores_above_good_parts(fitted: PatchCoreFPFHScorer) -> None:
    good = [fitted.score(box_cloud(seed)) for seed in range(100, 104)]
    bad_cloud = box_cloud(200, bump=BUMP)
    bad = fitted.score(bad_cloud)
    assert bad.object_score > max(r.object_score for r in good)
    assert bad.point_scores.shape == (len(bad_cloud.points),)
    assert bad.point_scores.dtype == np.float32
    inside = in_defect(bad_cloud.points)
    assert inside.sum() >= 10
    assert bad.point_scores[inside].mean() > 2 * bad.point_scores[~inside].mean()
    assert in_defect(bad_cloud.points[[int(np.argmax(bad.point_scores))]])[0]
    assert set(bad.timings) >= {"features", "search"}
    assert all(r.object_score > 0 for r in good)


def test_save_load_round_trip(fitted: PatchCoreFPFHScorer, train: list[PreparedCloud], tmp_path) -> None:
    cloud = box_cloud(300, bump=BUMP)
    before = fitted.score(cloud)
    fitted.save(tmp_path / "art", train_hash=hash_training_data(train))
    assert read_meta(tmp_path / "art")["scorer"] == "patchcore-fpfh"
    loaded = load_scorer(tmp_path / "art")
    assert isinstance(loaded, PatchCoreFPFHScorer)
    assert loaded.params() == fitted.params()
    np.testing.assert_array_equal(loaded.tensors()["memory_bank"], fitted.tensors()["memory_bank"])
    after = loaded.score(cloud)
    assert after.object_score == before.object_score
    np.testing.assert_array_equal(after.point_scores, before.point_scores)


def test_coreset_size_obeys_ratio_and_max(fitted: PatchCoreFPFHScorer, train: list[PreparedCloud]) -> None:
    n_total = sum(len(fitted.features(c)) for c in train)
    assert fitted.memory_bank_size == int(0.1 * n_total)
    bank = fitted.tensors()["memory_bank"]
    assert bank.dtype == np.float32 and bank.shape[1] == 33
    capped = PatchCoreFPFHScorer(coreset_ratio=0.5, coreset_max=300)
    capped.fit(train[:2])
    assert capped.memory_bank_size == 300
    full = PatchCoreFPFHScorer(coreset_ratio=1.0)
    full.fit(train[:1])
    assert full.memory_bank_size == len(train[0].points)


@pytest.mark.parametrize("projection_dim", [128, 8])
def test_greedy_coreset_covers_every_cluster(projection_dim: int) -> None:
    rng = np.random.default_rng(0)
    dim, sizes = 40, [2000, 500, 50, 5, 1]
    centres = rng.normal(0.0, 20.0, (len(sizes), dim))
    feats = np.concatenate([c + rng.normal(0.0, 0.1, (n, dim)) for c, n in zip(centres, sizes, strict=True)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    idx = greedy_coreset(feats.astype(np.float32), n_select=len(sizes), projection_dim=projection_dim, seed=3)
    assert len(idx) == len(sizes) == len(np.unique(idx))
    assert set(labels[idx]) == set(range(len(sizes)))


def test_greedy_coreset_stops_when_all_covered() -> None:
    feats = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    idx = greedy_coreset(feats, n_select=20)
    assert len(idx) == 3
    assert {int(i) // 10 for i in idx} == {0, 1, 2}


def test_edge_cases(fitted: PatchCoreFPFHScorer) -> None:
    with pytest.raises(ValueError, match="at least one"):
        PatchCoreFPFHScorer().fit([])
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCoreFPFHScorer().score(box_cloud(0))
    tiny = PreparedCloud(
        points=np.zeros((5, 3), np.float32), source_flat=np.arange(5), voxel_of_source=np.arange(5)
    )
    with pytest.raises(ValueError, match="at least"):
        fitted.score(tiny)
    with pytest.raises(ValueError, match="at least"):
        PatchCoreFPFHScorer().fit([tiny])
