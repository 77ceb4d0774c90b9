"""IMRNet (workers.imrnet): sampling, patches, masking, network, loss, training resume, scorer
round trip, ONNX parity and a tiny fit + score. Real numpy / torch / onnxruntime, tiny sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.imrnet.network import IMRNet, IMRNetConfig, chamfer_l2, gather_patches, mask_count, random_mask
from workers.imrnet.sampling import (
    fps,
    geometry_rates,
    gps_centers,
    gps_split,
    group_patches,
    random_centers,
    salient_mask,
    sample_centers,
)
from workers.imrnet.scorer import IMRNetScorer
from workers.imrnet.training import CloudPool, TrainSettings, pool_from_clouds, train
from workers.preprocess import PreparedCloud, voxel_downsample
from workers.registry import load_scorer

TINY = dict(n_points=512, n_centers=32, group_size=16, dim=32, heads=2, enc_depth=1, dec_depth=3, mlp_ratio=2.0,
            embed_hidden=16)
SIZE = (24.0, 18.0, 12.0)
BUMP = (12.0, 9.0, 6.0, 3.0)  # centre x, centre y on the top face, diameter, height (mm)


def box_cloud(seed: int, bump: tuple[float, float, float, float] | None = None) -> PreparedCloud:
    """A sampled, slightly noisy box surface (mm), voxelized at 1 mm, optionally with a bump on top."""
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


def l_shape(n: int = 1600, seed: int = 0) -> np.ndarray:
    """Two unit squares meeting at a right-angle edge (x = 0): salient points sit along that edge."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, (n, 2))
    floor = np.stack([u[: n // 2, 0], u[: n // 2, 1], np.zeros(n // 2)], 1)
    wall = np.stack([np.zeros(n - n // 2), u[n // 2 :, 1], u[n // 2 :, 0]], 1)
    return np.concatenate([floor, wall]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# sampling (Sec. 4.1)


def test_rates_peak_at_the_edge_and_gps_samples_salient_points_at_twice_the_density() -> None:
    pts = l_shape()
    rates = geometry_rates(pts, k=16)
    dist_to_edge = pts[:, 0] + pts[:, 2]  # one of the two is 0
    assert rates[dist_to_edge < 0.05].mean() > 3 * rates[dist_to_edge > 0.2].mean()

    n, tau = 64, 0.3
    sal = salient_mask(torch.from_numpy(rates), tau).numpy()
    assert sal.sum() == math.floor(tau * len(pts))
    idx = gps_centers(torch.from_numpy(pts), torch.from_numpy(rates), n, tau=tau, density_ratio=2.0,
                      generator=torch.Generator().manual_seed(0)).numpy()
    assert idx.shape == (n,) and len(np.unique(idx)) == n
    n_s = int(sal[idx].sum())
    assert (n_s, n - n_s) == gps_split(n, tau, 2.0)
    density_ratio = (n_s / sal.sum()) / ((n - n_s) / (~sal).sum())
    assert density_ratio == pytest.approx(2.0, rel=0.1)
    # FPS / random baselines: the salient set gets about its share only
    for method in ("fps", "random"):
        j = sample_centers(method, torch.from_numpy(pts), n, generator=torch.Generator().manual_seed(0)).numpy()
        assert len(np.unique(j)) == n
        assert sal[j].sum() < n_s


def test_fps_spreads_points_and_is_seeded() -> None:
    pts = torch.from_numpy(l_shape())
    a = fps(pts, 32, torch.Generator().manual_seed(3))
    b = fps(pts, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(torch.unique(a)) == 32
    r = random_centers(pts, 32, torch.Generator().manual_seed(3))
    def min_gap(i: torch.Tensor) -> float:
        d = torch.cdist(pts[i], pts[i]) + torch.eye(len(i)) * 9
        return float(d.min())
    assert min_gap(a) > min_gap(r)


def test_patch_grouping_shapes_and_centring() -> None:
    pts = torch.rand(3, 512, 3)
    cidx = fps(pts, 32, torch.Generator().manual_seed(0))
    neigh, centers, nb = group_patches(pts, cidx, 16)
    assert neigh.shape == (3, 32, 16, 3) and centers.shape == (3, 32, 3) and nb.shape == (3, 32, 16)
    assert torch.allclose(neigh[:, :, 0], torch.zeros(3, 32, 3))  # the centre is its own nearest point
    assert torch.allclose(neigh + centers.unsqueeze(2), pts[torch.arange(3)[:, None, None], nb])
    small, c1, _ = group_patches(torch.rand(10, 3), torch.arange(4), 16)  # fewer points than k: repeats
    assert small.shape == (4, 16, 3) and c1.shape == (4, 3)


def test_masking_ratio() -> None:
    vis, mask = random_mask(4, 128, 0.4, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 51) and vis.shape == (4, 77)
    for v, m in zip(vis, mask, strict=True):
        assert sorted(torch.cat([v, m]).tolist()) == list(range(128))
    assert mask_count(10, 0.01) == 1 and mask_count(10, 0.99) == 9


# ------------------------------------------------------------------------------------------------
# network and loss (Sec. 4.2)


def test_forward_backward_shapes() -> None:
    cfg = IMRNetConfig(**TINY)
    model = IMRNet(cfg)
    neigh = torch.randn(2, cfg.n_centers, cfg.group_size, 3) * 0.05
    centers = torch.rand(2, cfg.n_centers, 3)
    vis, mask = random_mask(2, cfg.n_centers, 0.4, torch.Generator().manual_seed(0))
    pred, gt = model(neigh, centers, vis, mask)
    assert pred.shape == gt.shape == (2, mask.shape[1], cfg.group_size, 3)
    assert torch.equal(gt, gather_patches(neigh, centers, mask)[0])
    loss = chamfer_l2(pred, gt)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    feats = model.features(neigh, centers)
    assert feats.shape == (2, cfg.n_centers, cfg.feature_dim) and cfg.feature_dim == 3 * cfg.dim


def test_chamfer_zero_for_identical_sets() -> None:
    a = torch.randn(5, 16, 3)
    assert float(chamfer_l2(a, a)) == 0.0
    assert float(chamfer_l2(a, a[:, torch.randperm(16)])) == 0.0
    assert float(chamfer_l2(a, a + 0.1)) > 0.0
    # the L2 Chamfer of two single points is twice their squared distance
    assert float(chamfer_l2(torch.zeros(1, 1, 3), torch.tensor([[[0.0, 3.0, 4.0]]]))) == pytest.approx(50.0)


def _tiny_pool() -> CloudPool:
    return pool_from_clouds([l_shape(512, seed) - 0.5 for seed in range(3)])


def test_training_resume_continues_exactly(tmp_path) -> None:
    pool = _tiny_pool()
    settings = TrainSettings(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, seed=1)
    torch.manual_seed(0)
    full = train(IMRNet(IMRNetConfig(**TINY)), pool, settings, checkpoint=tmp_path / "a.safetensors")["losses"]

    class Stop(Exception):
        pass

    def interrupt(step: int, loss: float) -> None:
        if step == 2:
            raise Stop

    torch.manual_seed(0)
    with pytest.raises(Stop):
        train(IMRNet(IMRNetConfig(**TINY)), pool, settings, checkpoint=tmp_path / "b.safetensors", on_step=interrupt)
    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    resumed = train(IMRNet(IMRNetConfig(**TINY)), pool, settings, checkpoint=tmp_path / "b.safetensors",
                    resume=True)["losses"]
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------------
# scorer (Algorithm 1 + DFC), artifact, ONNX


@pytest.fixture(scope="module")
def fitted() -> IMRNetScorer:
    torch.manual_seed(0)
    # ICP from near the identity: the box is symmetric under half turns, and a global registration
    # may turn the bumped box of test_bump_scores_higher_than_good upside down
    scorer = IMRNetScorer(**TINY, pretrained="none", finetune_steps=60, batch_size=4, finetune_lr=2e-3,
                          finetune_samplings=4, template_samplings=2, aug_rotate_deg=0.0, align="icp")
    scorer.fit([box_cloud(seed) for seed in range(3)])
    return scorer


def test_bump_scores_higher_than_good(fitted: IMRNetScorer) -> None:
    good = [fitted.score(box_cloud(seed)) for seed in (100, 101)]
    bad_cloud = box_cloud(200, bump=BUMP)
    bad = fitted.score(bad_cloud)
    assert bad.point_scores.shape == (len(bad_cloud.points),) and bad.point_scores.dtype == np.float32
    assert bad.object_score > max(g.object_score for g in good)
    cx, cy, diameter, _ = BUMP
    p = bad_cloud.points
    in_bump = ((p[:, 0] - cx) ** 2 + (p[:, 1] - cy) ** 2 < diameter**2 / 4) & (p[:, 2] > SIZE[2] + 0.5)
    assert bad.point_scores[in_bump].mean() > np.median(bad.point_scores)


def test_save_load_round_trip_gives_identical_scores(fitted: IMRNetScorer, tmp_path) -> None:
    cloud = box_cloud(300, bump=BUMP)
    before = fitted.score(cloud)
    again = fitted.score(cloud)
    assert np.array_equal(before.point_scores, again.point_scores)  # seeded: deterministic
    fitted.save(tmp_path / "m", train_hash="x")
    loaded = load_scorer(tmp_path / "m")
    assert isinstance(loaded, IMRNetScorer) and loaded.params() == fitted.params()
    after = loaded.score(cloud)
    assert after.object_score == before.object_score
    assert np.array_equal(after.point_scores, before.point_scores)


def test_small_and_degenerate_clouds_score(fitted: IMRNetScorer) -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 20, size=(200, 3)).astype(np.float32)  # fewer points than n_points
    res = fitted.score(PreparedCloud(points=pts, source_flat=np.arange(200), voxel_of_source=np.arange(200)))
    assert res.point_scores.shape == (200,) and np.isfinite(res.point_scores).all()
    with pytest.raises(ValueError):
        fitted.score(PreparedCloud(points=pts[:3], source_flat=np.arange(3), voxel_of_source=np.arange(3)))


def test_iteration_count_and_mask_cover(fitted: IMRNetScorer) -> None:
    cloud = box_cloud(5)
    normed = fitted._normalize(torch.from_numpy(cloud.points))
    neigh, centers, _ = fitted._patches(normed[:512], torch.Generator().manual_seed(0))
    one = fitted.iterative_reconstruction(neigh, centers, torch.Generator().manual_seed(0), iterations=1)
    three = fitted.iterative_reconstruction(neigh, centers, torch.Generator().manual_seed(0), iterations=3)
    changed_one = (one != neigh).flatten(1).any(dim=1)
    changed_three = (three != neigh).flatten(1).any(dim=1)
    assert int(changed_one.sum()) == mask_count(fitted.config.n_centers, fitted.mask_ratio)
    assert bool(changed_three.all())  # "cover": 3 × 0.4 ≥ 1, every patch restored once


def test_onnx_parity(fitted: IMRNetScorer, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from workers.imrnet.onnx_export import export_onnx, parity

    files = export_onnx(fitted, tmp_path / "onnx")
    diffs = parity(fitted, files)
    print(f"ONNX parity, max abs diff vs torch: {diffs}")
    assert set(diffs) == {"reconstruct", "features"}
    assert max(diffs.values()) < 1e-4


def test_train_cli_pretrains_and_the_scorer_loads_the_weights(tmp_path) -> None:
    import argparse
    import json
    import warnings

    from tools import train as train_cli
    from workers.imrnet.training import load_pretrained

    parser = argparse.ArgumentParser(prog="inspectd")
    train_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "tiny.safetensors"
    sizes = [f"{k}={v}" for k, v in TINY.items()]
    args = parser.parse_args(["train", "--scorer", "imrnet", "--pretrain", "--out", str(out), "--steps", "2",
                              "--instances", "1", "--batch-size", "2", "--state", str(tmp_path / "state.safetensors"),
                              "--no-progress", *[a for s in sizes for a in ("--param", s)]])
    assert args.func(args) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["dtype"] == "float16" and meta["config"]["dim"] == TINY["dim"] and meta["settings"]["steps"] == 2
    assert (tmp_path / "state.safetensors").is_file() and (tmp_path / "state.safetensors.json").is_file()
    model, _ = load_pretrained(out)
    assert model.config.n_centers == TINY["n_centers"]
    scorer = IMRNetScorer(**TINY, pretrained=str(out), finetune_steps=1, finetune_samplings=1, template_samplings=1,
                          batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a size mismatch or a missing file would warn
        scorer.fit([box_cloud(1), box_cloud(2)])
    assert scorer.fit_info["pretrained"] == str(out)


def test_icp_recovers_a_known_pose() -> None:
    from workers.imrnet.align import apply, icp_align, rot_z, rotation_deg

    ref = box_cloud(0).points
    ref = (ref - ref.mean(axis=0)) / 20.0
    pose = rot_z(8.0)
    pose[:3, 3] = [0.03, -0.02, 0.0]
    src = apply(np.linalg.inv(pose), ref)  # the same surface, moved
    est, info = icp_align(torch.from_numpy(src).double(), torch.from_numpy(ref).double())
    assert info["fitness"] > 0.99
    assert rotation_deg(est) == pytest.approx(8.0, abs=0.3)
    assert np.allclose(apply(est.numpy(), src), ref, atol=1e-3)


def test_a_part_in_any_orientation_is_registered_before_scoring(fitted: IMRNetScorer) -> None:
    """align="global" (the default): a part turned far beyond ICP's reach (here 150° about a
    tilted axis) is registered by the shared registration and scores as it does unturned;
    align="icp" (±10° about z) cannot. A good box: it is symmetric under half turns, so every pose
    the registration may pick puts the same surface in place."""
    from scipy.spatial.transform import Rotation

    cloud = box_cloud(400)
    turn = Rotation.from_rotvec(np.radians(150.0) * np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)).as_matrix()
    pts = cloud.points.astype(np.float64)
    turned = PreparedCloud(points=((pts - pts.mean(axis=0)) @ turn.T + pts.mean(axis=0)).astype(np.float32),
                           source_flat=cloud.source_flat, voxel_of_source=cloud.voxel_of_source)
    state = {**fitted.params(), "align": "global"}
    scorer = IMRNetScorer.from_state(state, fitted.tensors())
    upright, rotated = scorer.score(cloud), scorer.score(turned)
    assert rotated.object_score == pytest.approx(upright.object_score, rel=0.1)
    assert abs(fitted.score(turned).object_score - upright.object_score) > 3 * abs(rotated.object_score
                                                                                  - upright.object_score)


@pytest.mark.parametrize("key,value", [("point_score", "knn"), ("test_mask", "random"), ("reference", "none"),
                                       ("sampler", "fps"), ("sampler", "random"), ("iterations", 1),
                                       ("template_regularization", False)])
def test_scoring_variants_run(fitted: IMRNetScorer, key: str, value: object) -> None:
    variant = IMRNetScorer.from_state({**fitted.params(), key: value}, fitted.tensors())
    cloud = box_cloud(7, bump=BUMP)
    res = variant.score(cloud)
    assert res.point_scores.shape == (len(cloud.points),) and np.isfinite(res.point_scores).all()
    assert np.isfinite(res.object_score)


def test_pretrained_weights_serve_other_point_and_centre_counts() -> None:
    """n_points / n_centers size no weight: the shipped weights start a finer or coarser network."""
    from workers.imrnet.fitting import initial_model

    scorer = IMRNetScorer(n_points=4096, n_centers=256)
    model, source = initial_model(scorer)
    assert "pretrained at 2048 points" in source
    assert model.config.n_points == 4096 and model.config.n_centers == 256
    wider = IMRNetScorer(n_points=4096, n_centers=256, group_size=16)  # group_size shapes the head: refused
    with pytest.raises(ValueError, match="other sizes.*--allow-random-init"):
        initial_model(wider)  # no silent random start
    wider.allow_random_init = True
    with pytest.warns(UserWarning, match="other sizes"):
        assert initial_model(wider)[1] == "none (size mismatch)"
