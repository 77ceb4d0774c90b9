"""workers.geometry against the libraries it replaces on the device: scipy's cKDTree, open3d's
hybrid search, normals, FPFH and RANSAC, the numpy voxel grid; and the scorers wired to it.
CPU tensors here; the CUDA tests run where a GPU is present."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import torch
from scipy.spatial import cKDTree
from test_patchcore import BUMP, box_cloud
from test_preprocess import box_on_plane

from workers import geometry
from workers.imrnet.sampling import fps, geometry_rates, local_geometry
from workers.patchcore import PatchCoreFPFHScorer, fpfh_features
from workers.preprocess import PreprocessParams, prepare, voxel_downsample
from workers.score_frame import score_frame

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FPFH_TOL_F64 = 1e-9
"""Max abs FPFH difference to open3d, same points and normals, float64 (measured 4e-13)."""
FPFH_TOL_F32 = 1e-2
"""Same, float32 (the GPU dtype; measured 9e-5 on values up to ~200)."""


@pytest.fixture(scope="module")
def box() -> np.ndarray:
    return box_cloud(0).points.astype(np.float64)


def sphere(n: int = 3000, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return 10.0 * v / np.linalg.norm(v, axis=1, keepdims=True) + np.array([3.0, -2.0, 40.0])


def open3d_normals(pts: np.ndarray, radius: float, max_nn: int) -> np.ndarray:
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    n = np.asarray(pcd.normals).copy()
    n[np.einsum("ij,ij->i", n, pts - pts.mean(axis=0)) < 0] *= -1.0  # patchcore's orientation
    return n


def test_knn_equals_ckdtree(box: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    query = box[rng.choice(len(box), 500, replace=False)] + rng.normal(0, 0.3, (500, 3))
    d_ref, i_ref = cKDTree(box).query(query, k=8)
    ref_t, q_t = torch.from_numpy(box), torch.from_numpy(query)
    for chunk in (1 << 22, 1 << 12):  # brute force, then the exact grid path
        d, i = geometry.knn(ref_t, q_t, 8, chunk_elements=chunk)
        np.testing.assert_array_equal(i.numpy(), i_ref)
        np.testing.assert_allclose(d.numpy(), d_ref, rtol=0, atol=1e-12)
    d, i = geometry.knn(ref_t, ref_t, 16, chunk_elements=1 << 12)  # self queries: self first
    assert (i[:, 0] == torch.arange(len(box))).all() and (d[:, 0] == 0).all()


@pytest.mark.parametrize(("radius", "max_nn"), [(2.0, 30), (5.0, 100), (1.2, 4)])
def test_hybrid_search_equals_open3d(box: np.ndarray, radius: float, max_nn: int) -> None:
    tree = o3d.geometry.KDTreeFlann(o3d.geometry.PointCloud(o3d.utility.Vector3dVector(box)))
    d2, idx = geometry.hybrid_search(torch.from_numpy(box), torch.from_numpy(box), radius, max_nn)
    assert idx.shape[1] <= max_nn
    for i in range(len(box)):
        _, o_idx, o_d2 = tree.search_hybrid_vector_3d(box[i], radius, max_nn)
        mine = idx[i][idx[i] >= 0]
        assert set(mine.tolist()) == set(o_idx), i
        np.testing.assert_allclose(np.sort(d2[i][: len(mine)].numpy()), np.sort(np.asarray(o_d2)), atol=1e-9)


def test_normals_match_open3d_and_point_away_from_the_centroid() -> None:
    pts = sphere()
    mine = geometry.estimate_normals(torch.from_numpy(pts), 2.5, 30).numpy()
    ref = open3d_normals(pts, 2.5, 30)
    cos = np.einsum("ij,ij->i", mine, ref)
    assert cos.min() > 0.99, f"min cos to open3d {cos.min():.6f}"
    radial = (pts - pts.mean(axis=0)) / np.linalg.norm(pts - pts.mean(axis=0), axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", mine, radial).min() > 0.95
    few = np.array([[0.0, 0, 0], [1, 0, 0], [50, 0, 0]])  # < 3 neighbours each: open3d's (0, 0, 1)
    lonely = geometry.estimate_normals(torch.from_numpy(few), 2.0, 30, orient="none").numpy()
    o3d_few = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(few))
    o3d_few.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=2.0, max_nn=30))
    np.testing.assert_array_equal(lonely, np.asarray(o3d_few.normals))


def test_fpfh_matches_open3d_on_the_same_points_and_normals(box: np.ndarray) -> None:
    normals = open3d_normals(box, 2.0, 30)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(box))
    pcd.normals = o3d.utility.Vector3dVector(normals)
    ref = np.asarray(o3d.pipelines.registration.compute_fpfh_feature(
        pcd, o3d.geometry.KDTreeSearchParamHybrid(radius=5.0, max_nn=100)).data).T
    f64 = geometry.fpfh(torch.from_numpy(box), torch.from_numpy(normals), 5.0, 100).numpy()
    diff64 = float(np.abs(f64 - ref).max())
    assert diff64 < FPFH_TOL_F64, f"float64 FPFH max abs diff {diff64:.3g} (tolerance {FPFH_TOL_F64})"
    f32 = geometry.fpfh(torch.from_numpy(box).float(), torch.from_numpy(normals).float(), 5.0, 100).numpy()
    diff32 = float(np.abs(f32 - ref).max())
    assert diff32 < FPFH_TOL_F32, f"float32 FPFH max abs diff {diff32:.3g} (tolerance {FPFH_TOL_F32})"
    # a point without neighbours gets zeros, as in open3d
    lone = np.vstack([box, [[500.0, 500.0, 500.0]]])
    n = np.vstack([normals, [[0.0, 0.0, 1.0]]])
    assert (geometry.fpfh(torch.from_numpy(lone), torch.from_numpy(n), 5.0, 100)[-1] == 0).all()


def test_end_to_end_fpfh_torch_vs_open3d(box: np.ndarray) -> None:
    """Own normals on each side: identical except where a last-bit normal difference moves a pair
    across open3d's source/target swap (see workers.patchcore); few rows, by a pair's weight."""
    ref = fpfh_features(box, 1.0)
    mine = fpfh_features(torch.from_numpy(box), 1.0, impl="torch").float().numpy()
    rows = np.abs(mine - ref).max(axis=1)
    assert (rows > 1e-3).mean() < 0.05, f"{(rows > 1e-3).mean():.2%} rows differ (max {rows.max():.3g})"
    assert rows.max() < 10.0, f"max abs diff {rows.max():.3g}"


def test_voxel_downsample_equals_the_numpy_version() -> None:
    rng = np.random.default_rng(0)
    pts = (rng.uniform(-20, 80, (50000, 3))).astype(np.float32)
    cells = np.floor((pts - pts.min(axis=0)) / 1.5).astype(np.int64)  # the numpy version it replaced
    dims = cells.max(axis=0) + 1
    _, inv_ref = np.unique((cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2], return_inverse=True)
    cnt = np.bincount(inv_ref).astype(np.float64)
    cent_ref = (np.stack([np.bincount(inv_ref, weights=pts[:, k]) for k in range(3)], 1) / cnt[:, None]).astype(
        np.float32)
    cent, inv = geometry.voxel_downsample(torch.from_numpy(pts), 1.5)
    np.testing.assert_array_equal(inv.numpy(), inv_ref)
    np.testing.assert_allclose(cent.numpy(), cent_ref, rtol=0, atol=1e-6)
    cent_np, inv_np = voxel_downsample(pts, 1.5)
    np.testing.assert_array_equal(inv_np, inv_ref)
    assert isinstance(cent_np, np.ndarray) and cent_np.dtype == np.float32


def test_cell_ranks_are_the_sorted_unique_inverse() -> None:
    """Counted (a key range near the key count) or sorted (a wide range): the same ranks."""
    g = torch.Generator().manual_seed(0)
    for n_keys in (1000, 1 << 30):
        key = torch.randint(0, n_keys, (5000,), generator=g)
        want = torch.unique(key, sorted=True, return_inverse=True)[1]
        assert torch.equal(geometry.cell_ranks(key, n_keys), want)


def test_ransac_finds_a_known_plane() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(-50, 50, (6000, 2))
    z = 0.1 * xy[:, 0] - 0.2 * xy[:, 1] + 5.0 + rng.normal(0, 0.05, 6000)
    outliers = rng.uniform(-50, 50, (3000, 3)) + np.array([0, 0, 30.0])
    pts = torch.from_numpy(np.vstack([np.column_stack([xy, z]), outliers]))
    plane, inliers = geometry.ransac_plane(pts, 0.3, 100, seed=0)
    truth = np.array([0.1, -0.2, -1.0, 5.0]) / np.linalg.norm([0.1, -0.2, -1.0])
    p = plane.numpy() * np.sign(plane[2].item() * truth[2])
    np.testing.assert_allclose(p, truth, atol=2e-3)
    assert inliers[:6000].float().mean() > 0.99 and inliers[6000:].float().mean() < 0.02


def test_prepare_on_a_device_matches_the_cpu_path() -> None:
    f = box_on_plane()
    pp = PreprocessParams(voxel_size=1.0)
    host, dev = prepare(f, pp), prepare(f, pp, device="cpu")
    np.testing.assert_array_equal(dev.source_flat, host.source_flat)
    np.testing.assert_array_equal(dev.voxel_of_source, host.voxel_of_source)
    np.testing.assert_allclose(dev.points, host.points, atol=1e-6)
    assert dev.device_points is not None and torch.equal(dev.device_points.cpu(), torch.from_numpy(dev.points))


def test_fps_torch_equals_numpy_and_sampling_runs_on_tensors() -> None:
    pts = torch.from_numpy(sphere(2000)).float().reshape(2, 1000, 3)
    valid = torch.rand(2, 1000, generator=torch.Generator().manual_seed(0)) < 0.5
    start = torch.nonzero(valid[:, :])[[0, -1], 1]
    a = geometry.farthest_point_sample(pts, 64, start, valid, impl="torch")
    b = geometry.farthest_point_sample(pts, 64, start, valid, impl="numpy")
    assert torch.equal(a, b) and bool(valid.gather(1, a).all())
    assert fps(pts[0], 32).shape == (32,)
    # local geometry / rates: tensors in, tensors out, same values as the numpy path
    cloud = sphere(1500)
    n_np, c_np, i_np, d_np = local_geometry(cloud, 16)
    n_t, c_t, i_t, d_t = local_geometry(torch.from_numpy(cloud), 16)
    assert isinstance(n_t, torch.Tensor)
    np.testing.assert_array_equal(i_t.numpy(), i_np)
    np.testing.assert_allclose(d_t.numpy(), d_np, atol=1e-12)
    assert np.abs(np.einsum("ij,ij->i", n_t.numpy(), n_np)).min() > 1 - 1e-9
    np.testing.assert_allclose(c_t.numpy(), c_np, atol=1e-9)
    np.testing.assert_allclose(geometry_rates(torch.from_numpy(cloud)).numpy(), geometry_rates(cloud), atol=1e-5)


PATCHCORE_SCORE_RTOL = 1e-3
"""Object scores, torch (float64) vs open3d FPFH at test time on one fitted bank (measured: equal)."""
PATCHCORE_POINT_TOL = 0.005
"""Max point-score difference as a fraction of the highest score (measured 0.0013; 1-2 % of the
points differ at all, by the FPFH swap flips described in workers.patchcore)."""
CUDA_SCORE_RTOL = 0.01
"""Object score, float32 FPFH on the GPU vs open3d."""


def test_patchcore_scores_with_torch_features_agree_with_open3d() -> None:
    scorer = PatchCoreFPFHScorer(fpfh_impl="open3d")
    scorer.fit([box_cloud(seed) for seed in range(2)])
    for cloud in (box_cloud(100), box_cloud(200, bump=BUMP)):
        scorer.fpfh_impl = "open3d"
        ref = scorer.score(cloud)
        scorer.fpfh_impl = "torch"
        mine = scorer.score(cloud)
        rel = abs(mine.object_score - ref.object_score) / ref.object_score
        pdiff = np.abs(mine.point_scores - ref.point_scores)
        assert rel < PATCHCORE_SCORE_RTOL, f"object score {mine.object_score:.4f} vs {ref.object_score:.4f}"
        assert np.median(pdiff) < 1e-6 and pdiff.max() < PATCHCORE_POINT_TOL * ref.point_scores.max(), (
            f"point scores: median diff {np.median(pdiff):.3g}, max {pdiff.max():.3g}")


def test_score_frame_preprocesses_on_the_scorer_device() -> None:
    f = box_on_plane()
    pp = PreprocessParams(voxel_size=1.0)
    scorer = PatchCoreFPFHScorer(fpfh_impl="torch", score_smoothing_k=0)
    scorer.fit([prepare(f, pp)])
    host = score_frame(scorer, f, pp)
    dev = score_frame(scorer, f, pp, device="cpu")
    np.testing.assert_allclose(dev.anomaly_map, host.anomaly_map, atol=1e-4, equal_nan=True)
    dense = score_frame(scorer, f, pp, dense=True, device="cpu")
    assert np.isfinite(dense.anomaly_map).all()


@cuda
def test_cuda_geometry_matches_cpu(box: np.ndarray) -> None:
    """Normals and kNN on the box; FPFH on a sphere. The box's axis-aligned normals put pair
    angles exactly on FPFH's bin edges (atan2 of a signed zero is +π or −π), so one device can
    bin a pair one way and the other the other way (seen on an H200: one pair of 74, 100/74);
    a curved surface has no such exact values, and there the two devices must agree."""
    t = torch.from_numpy(box)
    n_cpu = geometry.estimate_normals(t, 2.0, 30)
    n_gpu = geometry.estimate_normals(t.cuda(), 2.0, 30).cpu()
    assert (n_cpu * n_gpu).sum(dim=1).min() > 0.99
    d, i = geometry.knn(t.cuda(), t.cuda(), 8)
    assert torch.equal(i.cpu(), torch.from_numpy(cKDTree(box).query(box, k=8)[1]))
    s = torch.from_numpy(sphere())
    n_s = geometry.estimate_normals(s, 2.0, 30)
    f_cpu = geometry.fpfh(s, n_s, 5.0, 100)
    f_gpu = geometry.fpfh(s.cuda(), n_s.cuda(), 5.0, 100).cpu()
    assert float((f_cpu - f_gpu).abs().max()) < FPFH_TOL_F64


@cuda
def test_cuda_patchcore_scores_a_frame_on_the_device() -> None:
    f = box_on_plane()
    pp = PreprocessParams(voxel_size=1.0)
    scorer = PatchCoreFPFHScorer()
    scorer.fit([prepare(f, pp)])
    host = score_frame(scorer, f, pp)
    scorer.use_backend("torch-cuda")
    assert scorer.feature_impl == "torch"
    dev = score_frame(scorer, f, pp)
    assert dev.object_score == pytest.approx(host.object_score, rel=CUDA_SCORE_RTOL)
