"""3DzAL (``zeroshot``): unit tests of every stage and a tiny zero-shot fit + score.

Real torch, real open3d, no mocks; organized frames are rendered from analytic height fields
(a part on a table seen from above), small enough for the whole file to run in well under a
minute on 2 CPU cores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from sensors.frame import Frame, FrameMeta
from workers.base import read_meta
from workers.preprocess import PreparedCloud, PreprocessParams, prepare
from workers.registry import load_scorer, scorer_class
from workers.zeroshot import ZeroShotScorer
from workers.zeroshot.patches import (
    GRID,
    extract_patches,
    normalize_patches,
    organized_point_scores,
    resample_to,
)
from workers.zeroshot.pointnet2 import PointNet2, ball_query, farthest_point_sample
from workers.zeroshot.pseudo_anomalies import (
    adding_point_patches,
    attach_points,
    collect_pois,
    ordered_image,
    removing_point_patches,
)
from workers.zeroshot.resnet import (
    ResNet50,
    fused_activation,
    he_init,
    normalize_ordered_xyz,
    top_percent_mask,
)
from workers.zeroshot.scorer import torch_threads
from workers.zeroshot.training import abnormal_probability, perturb, supcon_loss, train_networks

PX = 96
HALF = 30.0  # the image spans ±30 mm
PP = PreprocessParams(remove_plane=True, plane_distance=0.5, voxel_size=1.0, organized="voxel")
"""As the scorer is enrolled (``ZeroShotScorer.preprocess_overrides``)."""


def height(shape: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Height (mm) of a part of class ``shape`` above the table at (x, y); 0 = table."""
    j = 1.0 + rng.uniform(-0.04, 0.04)
    if shape == "dome":
        r2 = x**2 + y**2
        return np.sqrt(np.clip((18 * j) ** 2 - r2, 0, None)) * 0.8
    if shape == "block":
        inside = (np.abs(x) < 16 * j) & (np.abs(y) < 11 * j)
        return np.where(inside, 9.0 * j + 0.05 * x, 0.0)
    if shape == "roll":  # a cylinder lying along x
        inside = np.abs(x) < 20 * j
        return np.where(inside, np.sqrt(np.clip((11 * j) ** 2 - y**2, 0, None)) + 2.0, 0.0) * (np.abs(y) < 11 * j)
    raise ValueError(shape)


def render(shape: str, seed: int, dent: tuple[float, float, float, float] | None = None) -> Frame:
    """An organized frame (PX×PX) of ``shape`` on a table; ``dent`` = (x, y, radius, depth) mm."""
    rng = np.random.default_rng(seed)
    u = np.linspace(-HALF, HALF, PX)
    x, y = np.meshgrid(u, u)
    z = height(shape, x, y, rng)
    gt = np.zeros(z.shape, np.uint8)
    if dent is not None:
        cx, cy, rad, depth = dent
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        bump = depth * np.exp(-d2 / (2 * (rad / 2) ** 2))
        on = z > 0.5
        z = np.where(on, z - bump, z)
        gt = (on & (d2 < rad**2)).astype(np.uint8)
    z = z + rng.normal(0, 0.02, z.shape)
    pts = np.stack([x, y, z], axis=-1).astype(np.float32)
    meta = FrameMeta(sensor_id="test", product=shape, part_id=f"{shape}-{seed}", seq=seed, capture_time=0.0)
    return Frame(points=pts, meta=meta, gt_mask=gt)


def cloud_of(shape: str, seed: int, dent: tuple[float, float, float, float] | None = None) -> PreparedCloud:
    return prepare(render(shape, seed, dent), PP)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread, as the scorer runs (much faster on shared cores for these sizes)."""
    with torch_threads(1):
        yield


SMALL = dict(
    epochs=2, max_train_patches=256, batch_positives=32, poi_max_sources=4, width=16, coreset_ratio=0.5, seed=0
)


# -- ResNet-50 and points of interest ---------------------------------------------------------


def test_resnet50_shapes_and_he_init() -> None:
    net = he_init(ResNet50(), seed=0).eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert 25.4e6 < n_params < 25.7e6  # ResNet-50
    feats = net.forward_features(torch.zeros(1, 3, 224, 224), ("layer1", "layer2", "layer3"))
    assert feats["layer1"].shape == (1, 256, 56, 56)
    assert feats["layer2"].shape == (1, 512, 28, 28)
    assert feats["layer3"].shape == (1, 1024, 14, 14)
    w = net.layer3[0].conv2.weight.detach()  # 256 out channels, 3×3
    expected = math.sqrt(2.0 / (w.shape[0] * 9))  # He, fan_out
    assert abs(float(w.std()) - expected) / expected < 0.02
    assert abs(float(w.mean())) < 0.1 * expected
    assert torch.all(net.layer2[0].bn1.weight == 1) and torch.all(net.layer2[0].bn1.bias == 0)
    again = he_init(ResNet50(), seed=0)
    assert torch.equal(again.conv1.weight, net.conv1.weight)  # seeded


def test_fused_activation_and_top_percent() -> None:
    net = he_init(ResNet50(), seed=1).eval()
    frame = render("block", 0)
    soft = fused_activation(net, normalize_ordered_xyz(frame.points)[None])
    assert soft.shape == (1, PX, PX) and float(soft.min()) >= 0 and float(soft.max()) <= 1
    s = np.random.default_rng(0).random((224, 224))
    cand = np.zeros((224, 224), bool)
    cand[50:150, 20:200] = True
    mask = top_percent_mask(s, cand, 0.001)
    assert mask.sum() == math.ceil(0.001 * cand.sum()) == 18
    assert not (mask & ~cand).any()
    assert s[mask].min() >= s[cand & ~mask].max()
    assert top_percent_mask(s, None, 0.001).sum() == math.ceil(0.001 * 224 * 224)


def test_pois_lie_on_the_part() -> None:
    clouds = [cloud_of("block", 0), cloud_of("dome", 1)]
    pool = collect_pois(clouds, p=0.001, seed=0)
    for c, poi in zip(clouds, pool.poi, strict=True):
        assert 1 <= len(poi) and poi.max() < len(c.points)
    xyz, vox = ordered_image(clouds[0])
    assert xyz.shape == (224, 224, 3) and vox.shape == (224, 224)


# -- pseudo anomalies -------------------------------------------------------------------------


def test_adding_point_patch_grows_points_at_the_anchor() -> None:
    c = cloud_of("dome", 0)
    tree = cKDTree(c.points)
    anchor = int(np.argmax(c.points[:, 2]))  # the top of the dome
    part = np.random.default_rng(0).normal(0, 1.0, (24, 3))
    union = attach_points(c.points, part, c.points[anchor])
    assert len(union) == len(c.points) + 24
    r = 2.5
    near_before = len(tree.query_ball_point(c.points[anchor], r))
    near_after = len(cKDTree(union).query_ball_point(c.points[anchor], r))
    assert near_after > near_before
    assert np.allclose(union[-24:].mean(axis=0), c.points[anchor], atol=1e-4)
    patch = adding_point_patches(c.points, tree, np.array([anchor]), part[None], 64)
    assert patch.shape == (1, 64, 3)
    added = union[-24:]
    hits = (np.linalg.norm(patch[0][:, None] - added[None], axis=-1) < 1e-5).any(axis=1).sum()
    assert 0 < hits < 64  # both normal and pseudo-generated points
    assert hits == 24  # the part sits at the anchor: all of it is in the patch


def test_removing_point_patch_drops_the_ratio() -> None:
    c = cloud_of("block", 0)
    tree = cKDTree(c.points)
    rng = np.random.default_rng(0)
    anchors = rng.integers(0, len(c.points), 5)
    ratios = np.array([0.25, 0.3, 0.4, 0.5, 0.6])
    patch, valid = removing_point_patches(c.points, tree, anchors, ratios, 64, rng)
    assert patch.shape == (5, 64, 3)
    assert np.array_equal(valid.sum(axis=1), 64 - np.round(ratios * 64).astype(int))
    full = resample_to(patch, valid, 64, rng)
    kept = {tuple(p) for p in patch[0][valid[0]]}
    assert full.shape == (5, 64, 3) and all(tuple(p) in kept for p in full[0])
    assert {tuple(p) for p in full[0]} == kept  # every kept point is used


# -- PointNet++, losses, perturbation --------------------------------------------------------


def test_pointnet2_shapes() -> None:
    x = torch.randn(5, 64, 3)
    idx = farthest_point_sample(x, 16)
    assert idx.shape == (5, 16) and all(len(set(r.tolist())) == 16 for r in idx)
    g = ball_query(x, x[torch.arange(5)[:, None], idx], 0.8, 16)
    assert g.shape == (5, 16, 16)
    assert PointNet2(33, width=16)(x).shape == (5, 33)
    assert PointNet2(2, width=16)(x).shape == (5, 2)


def test_contrastive_loss_prefers_identical_positives() -> None:
    torch.manual_seed(0)
    neg = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    same = torch.nn.functional.normalize(torch.ones(4, 8) + torch.arange(8.0) / 8, dim=1)
    spread = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    mask = torch.tensor([True] * 4 + [False] * 4)
    l_same = supcon_loss(torch.cat([same, neg]), mask, 0.07)
    l_spread = supcon_loss(torch.cat([spread, neg]), mask, 0.07)
    assert float(l_same) < float(l_spread)
    # negatives far from the positives lower the loss further
    l_far = supcon_loss(torch.cat([same, -same]), mask, 0.07)
    assert float(l_far) < float(l_same)


@pytest.fixture(scope="module")
def trained_classifier() -> tuple[PointNet2, torch.Tensor, torch.Tensor]:
    """A classifier trained on flat patches (normal) vs. patches with a spike (abnormal)."""
    rng = np.random.default_rng(0)
    flat = np.concatenate([rng.uniform(-1, 1, (256, 64, 2)), rng.normal(0, 0.01, (256, 64, 1))], axis=2)
    spiky = flat.copy()
    spiky[:, :12, 2] += rng.uniform(0.5, 1.0, (256, 1))
    pos, neg = normalize_patches(flat), normalize_patches(spiky)
    from workers.zeroshot.training import TrainConfig

    cfg = TrainConfig(epochs=6, batch_positives=32, width=16, seed=0)
    _, clf, hist = train_networks(pos, torch.zeros(256, 33), neg, cfg, train_encoder=False, train_classifier=True)
    assert clf is not None and hist["accuracy"][-1] > 0.9
    return clf, pos[:64], neg[:64]


def test_perturbation_lowers_the_predicted_class(trained_classifier) -> None:
    clf, pos, neg = trained_classifier
    for x in (pos, neg):
        with torch.no_grad():
            p0 = torch.softmax(clf(x), 1)
        pred = p0.argmax(1)
        rows = torch.arange(len(x))
        lowered = torch.softmax(clf(perturb(clf, x, 0.1, "lower")), 1).detach()
        raised = torch.softmax(clf(perturb(clf, x, 0.01, "raise")), 1).detach()
        # Eq. 8 as the paper describes it lowers the softmax of the predicted class ...
        assert float((lowered[rows, pred] - p0[rows, pred]).mean()) < 0
        # ... and ODIN's sign raises it (a small step: the sign step is first-order)
        assert float((raised[rows, pred] - p0[rows, pred]).mean()) >= -1e-6
    # normal patches are predicted normal: the paper's perturbation raises their abnormal score
    p_plain = abnormal_probability(clf, pos, use_perturbation=False)
    p_pert = abnormal_probability(clf, pos, 0.1, use_perturbation=True, direction="lower")
    assert p_pert.mean() > p_plain.mean()


# -- patches and maps -------------------------------------------------------------------------


def test_organized_patches_and_point_scores() -> None:
    c = cloud_of("block", 0)
    ps = extract_patches(c, k=64)
    assert ps.organized and 0 < len(ps) <= GRID * GRID
    assert ps.neighbors.shape == (len(ps), 64) and int(ps.neighbors.max()) < len(c.points)
    values = torch.zeros(len(ps))
    values[np.argmax(c.points[ps.centers.numpy(), 0])] = 1.0  # one hot patch at the +x end
    s = organized_point_scores(values, ps, c, sigma=4.0).numpy()
    assert s.shape == (len(c.points),) and np.isfinite(s).all()
    assert c.points[np.argmax(s), 0] > 8  # the map peaks near that patch
    un = extract_patches(PreparedCloud(c.points, np.arange(len(c.points)), np.arange(len(c.points))), k=64,
                         max_patches=100)
    assert not un.organized and len(un) == 100 and len(np.unique(un.centers.numpy())) == 100


# -- the scorer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted() -> ZeroShotScorer:
    """Fitted on two products (block, dome); 'roll' is never seen."""
    train = [cloud_of("block", s) for s in range(3)] + [cloud_of("dome", s) for s in range(3)]
    scorer = scorer_class("zeroshot")(voxel_size=1.0, **SMALL)
    assert isinstance(scorer, ZeroShotScorer)
    scorer.fit(train)
    return scorer


def test_zero_shot_dent_scores_higher(fitted: ZeroShotScorer) -> None:
    assert fitted.encoder is not None and fitted.classifier is not None
    assert fitted.fit_info["n_adding"] > 0 and fitted.fit_info["n_pois"] > 0
    good = [fitted.score(cloud_of("roll", s)) for s in (10, 11)]
    bad_cloud = cloud_of("roll", 12, dent=(5.0, 0.0, 5.0, 3.0))
    bad = fitted.score(bad_cloud)
    assert bad.point_scores.shape == (len(bad_cloud.points),)
    assert bad.object_score > max(g.object_score for g in good)
    in_dent = np.hypot(bad_cloud.points[:, 0] - 5.0, bad_cloud.points[:, 1]) < 3.0
    assert bad.point_scores[in_dent].mean() > bad.point_scores[~in_dent].mean()


def test_save_load_round_trip(fitted: ZeroShotScorer, tmp_path) -> None:
    fitted.save(tmp_path, train_hash="x")
    assert read_meta(tmp_path)["scorer"] == "zeroshot"
    loaded = load_scorer(tmp_path)
    c = cloud_of("roll", 20, dent=(-4.0, 2.0, 4.0, 2.0))
    a, b = fitted.score(c), loaded.score(c)
    assert a.object_score == b.object_score
    assert np.array_equal(a.point_scores, b.point_scores)


def test_ablation_knobs_and_unorganized_input(fitted: ZeroShotScorer) -> None:
    c = cloud_of("roll", 21, dent=(5.0, 0.0, 5.0, 3.0))
    flat = PreparedCloud(c.points, np.arange(len(c.points)), np.arange(len(c.points)))
    r = fitted.score(flat)  # no frame: FPS + kNN patches
    assert r.point_scores.shape == (len(c.points),) and np.isfinite(r.point_scores).all()
    train = [cloud_of("block", s) for s in range(2)] + [cloud_of("dome", s) for s in range(2)]
    plain = ZeroShotScorer(use_learned=False, use_classifier=False, **SMALL)
    plain.fit(train)
    assert plain.encoder is None and plain.classifier is None and "n_pois" not in plain.fit_info
    assert plain.score(c).object_score > 0
    removing = ZeroShotScorer(pseudo_mix="removing", use_classifier=False, **SMALL)
    removing.fit(train)
    assert removing.fit_info["n_adding"] == 0 and removing.classifier is None
    with pytest.raises(ValueError):
        ZeroShotScorer(pseudo_mix="sideways")


def with_rgb(frame: Frame) -> Frame:
    """The frame plus a grey RGB image shaded by height."""
    z = np.nan_to_num(frame.points[..., 2], nan=0.0)
    grey = np.clip(40 + 10 * z, 0, 255).astype(np.uint8)
    return Frame(points=frame.points, meta=frame.meta, rgb=np.repeat(grey[..., None], 3, axis=2),
                 gt_mask=frame.gt_mask)


def test_rgb_branch_off_without_checkpoint_and_on_with_one(tmp_path, caplog) -> None:
    from safetensors.torch import save_file

    train = [prepare(with_rgb(render(s, i)), PP) for s in ("block", "dome") for i in range(2)]
    test = prepare(with_rgb(render("roll", 30, dent=(5.0, 0.0, 5.0, 3.0))), PP)
    fast = {**SMALL, "use_learned": False, "use_classifier": False}
    with caplog.at_level("INFO", logger="inspectd.zeroshot"):
        off = ZeroShotScorer(**fast)
        off.fit(train)
    assert off.rgb_model is None and "RGB branch left out" in caplog.text
    ckpt = tmp_path / "imagenet_resnet50.safetensors"  # stands in for a local ImageNet checkpoint
    save_file({k: v.contiguous() for k, v in he_init(ResNet50(), seed=3).state_dict().items()}, str(ckpt))
    on = ZeroShotScorer(rgb_checkpoint=str(ckpt), **fast)
    on.fit(train)
    assert on.rgb_model is not None and on.tensors()["memory_bank"].shape[1] == 33 + 512 + 1024
    assert any(k.startswith("rgb.layer3.") for k in on.tensors())
    on.save(tmp_path / "model", train_hash="x")
    a, b = on.score(test), load_scorer(tmp_path / "model").score(test)
    assert a.object_score == b.object_score and np.array_equal(a.point_scores, b.point_scores)
    with pytest.raises(ValueError):
        on.score(prepare(render("roll", 31), PP))  # no RGB image: the branch cannot run
