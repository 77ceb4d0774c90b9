"""Dataset loaders (sensors.datasets) on tiny on-disk copies of the published layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sensors.datasets import LAYOUTS, DatasetError, Sample, list_classes, list_samples
from sensors.pointfiles import write_pcd, write_xyz_tiff

H, W = 4, 5


def _xyz(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(1, 2, (H, W, 3)).astype(np.float32)
    xyz[0, 0] = np.nan  # written as 0 -> must come back as NaN
    return xyz


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _mvtec_sample(d: Path, stem: str, seed: int, gt: np.ndarray | None) -> None:
    write_xyz_tiff(d / "xyz" / f"{stem}.tiff", _xyz(seed))
    _png(d / "rgb" / f"{stem}.png", np.full((H, W, 3), seed, np.uint8))
    if gt is not None:
        _png(d / "gt" / f"{stem}.png", gt)


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec_3d_anomaly_detection"
    for cls in ("bagel", "cable_gland"):
        c = root / cls
        for i in range(2):
            _mvtec_sample(c / "train" / "good", f"{i:03d}", i, None)
        _mvtec_sample(c / "validation" / "good", "000", 7, None)
        crack = np.zeros((H, W), np.uint8)
        crack[2:4, 1:3] = 255
        _mvtec_sample(c / "test" / "crack", "000", 10, crack)
        _mvtec_sample(c / "test" / "crack", "001", 11, crack)
        _mvtec_sample(c / "test" / "good", "000", 12, np.zeros((H, W), np.uint8))  # all-black gt, as published
        _mvtec_sample(c / "test" / "good", "001", 13, None)  # and without a gt file
        (c / "calibration").mkdir()
        (c / "calibration" / "camera_parameters.json").write_text("{}")
    (root / "readme.txt").write_text("stray file")
    (root / "not_a_class").mkdir()
    return root


def test_mvtec_listing(mvtec: Path) -> None:
    assert list_classes(mvtec, "mvtec3d") == ["bagel", "cable_gland"]
    train = list_samples(mvtec, "mvtec3d", "bagel", "train")
    assert [(s.split, s.defect, s.label, s.stem) for s in train] == [("train", "good", 0, "000"), ("train", "good", 0, "001")]
    assert len(list_samples(mvtec, "mvtec3d", "bagel", "validation")) == 1
    test = list_samples(mvtec, "mvtec3d", "bagel", "test")
    assert [(s.defect, s.stem, s.label) for s in test] == [
        ("crack", "000", 1), ("crack", "001", 1), ("good", "000", 0), ("good", "001", 0)
    ]
    assert test[0].path == mvtec / "bagel" / "test" / "crack" / "xyz" / "000.tiff"
    assert all(isinstance(s, Sample) and s.cls == "bagel" for s in test)


def test_mvtec_load(mvtec: Path) -> None:
    crack, _, good_gt, good_nogt = list_samples(mvtec, "mvtec3d", "bagel", "test")
    f = crack.load(seq=3, capture_time=12.5)
    assert f.organized and f.points.shape == (H, W, 3) and f.points.dtype == np.float32
    assert np.isnan(f.points[0, 0]).all() and f.valid_mask().sum() == H * W - 1
    np.testing.assert_allclose(f.points[1:, :], _xyz(10)[1:, :])
    expected = np.zeros((H, W), np.uint8)
    expected[2:4, 1:3] = 1
    np.testing.assert_array_equal(f.gt_mask, expected)  # 255 -> 1
    assert f.rgb is not None and f.rgb.shape == (H, W, 3) and (f.rgb == 10).all()
    m = f.meta
    assert (m.product, m.part_id, m.sensor_id, m.seq, m.capture_time) == ("bagel", "000", "dataset", 3, 12.5)
    assert m.truth == {"defective": True, "defect": "crack"}
    for s in (good_gt, good_nogt):
        g = s.load()
        assert g.gt_mask is not None and g.gt_mask.dtype == np.uint8 and not g.gt_mask.any()
        assert g.gt_mask.shape == (H, W)
        assert g.meta.truth == {"defective": False, "defect": "good"}
    train = list_samples(mvtec, "mvtec3d", "cable_gland", "train")[0].load()
    assert train.gt_mask is not None and not train.gt_mask.any()


def test_mvtec_anomalous_without_gt_and_size_mismatch(mvtec: Path) -> None:
    (mvtec / "bagel" / "test" / "crack" / "gt" / "001.png").unlink()
    s = list_samples(mvtec, "mvtec3d", "bagel", "test")[1]
    with pytest.raises(DatasetError, match=r"001\.tiff.*no gt mask"):
        s.load()
    _png(mvtec / "bagel" / "test" / "crack" / "gt" / "000.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DatasetError, match=r"000\.png.*gt mask is"):
        list_samples(mvtec, "mvtec3d", "bagel", "test")[0].load()


def test_errors_name_path_and_layout(tmp_path: Path, mvtec: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset layout 'mvtec'.*mvtec3d"):
        list_classes(mvtec, "mvtec")
    with pytest.raises(DatasetError, match=r"nowhere.*missing directory.*'real3d'"):
        list_classes(tmp_path / "nowhere", "real3d")
    with pytest.raises(DatasetError, match=r"dowel[/\\]test.*'mvtec3d'"):
        list_samples(mvtec, "mvtec3d", "dowel", "test")
    with pytest.raises(DatasetError, match="splits train, validation, test"):
        list_samples(mvtec, "real3d", "bagel", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no class folders.*'anomaly-shapenet'"):
        list_classes(tmp_path / "empty", "anomaly-shapenet")
    assert LAYOUTS == ("mvtec3d", "real3d", "anomaly-shapenet")


# ------------------------------------------------------------------------------ point clouds


def _cloud(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3)).astype(np.float32)


def _write_txt(path: Path, pts: np.ndarray, labels: np.ndarray, sep: str = " ") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [sep.join([f"{v:.9g}" for v in p] + [f"{int(lab)}"]) for p, lab in zip(pts.tolist(), labels, strict=True)]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture
def real3d(tmp_path: Path) -> Path:
    root = tmp_path / "Real3D-AD-PCD"
    c = root / "airplane"
    write_pcd(c / "train" / "1_template.pcd", _cloud(30, 0))
    write_pcd(c / "train" / "2_template.pcd", _cloud(30, 1), binary=False)
    # anomalous: the PCD has a different order and count than the gt txt; the txt is used
    gt_pts = _cloud(40, 2)
    gt_lab = np.zeros(40, np.uint8)
    gt_lab[[3, 4, 5, 20]] = 1
    write_pcd(c / "test" / "1_bulge.pcd", gt_pts[::-1][:35])
    _write_txt(c / "gt" / "1_bulge.txt", gt_pts, gt_lab)
    write_pcd(c / "test" / "2_sink.pcd", _cloud(25, 3))
    _write_txt(c / "gt" / "2_sink.txt", _cloud(25, 3), np.r_[np.ones(5), np.zeros(20)])
    write_pcd(c / "test" / "3_good.pcd", _cloud(20, 4))  # good without a gt file
    write_pcd(c / "test" / "4_good.pcd", _cloud(22, 5))  # good with an all-zero gt file
    _write_txt(c / "gt" / "4_good.txt", _cloud(22, 5), np.zeros(22))
    (c / "test" / "notes.txt").write_text("ignored")
    (root / "README.md").write_text("stray")
    return root


def test_real3d(real3d: Path) -> None:
    assert list_classes(real3d, "real3d") == ["airplane"]
    train = list_samples(real3d, "real3d", "airplane", "train")
    assert [(s.stem, s.label, s.defect) for s in train] == [("1_template", 0, "good"), ("2_template", 0, "good")]
    f = train[1].load()
    assert not f.organized and f.points.shape == (30, 3) and not f.gt_mask.any()
    np.testing.assert_array_equal(f.points, _cloud(30, 1))

    test = list_samples(real3d, "real3d", "airplane", "test")
    assert [(s.stem, s.defect, s.label) for s in test] == [
        ("1_bulge", "bulge", 1), ("2_sink", "sink", 1), ("3_good", "good", 0), ("4_good", "good", 0)
    ]
    bulge = test[0].load()
    assert bulge.points.shape == (40, 3)  # from the gt txt, not the 35-point PCD
    np.testing.assert_allclose(bulge.points, _cloud(40, 2))
    assert np.flatnonzero(bulge.gt_mask).tolist() == [3, 4, 5, 20]  # aligned with its points
    assert bulge.meta.truth == {"defective": True, "defect": "bulge"}
    assert bulge.meta.product == "airplane" and bulge.meta.part_id == "1_bulge"
    assert test[1].load().gt_mask.sum() == 5
    for s in test[2:]:
        g = s.load()
        assert g.gt_mask.dtype == np.uint8 and not g.gt_mask.any() and g.gt_mask.shape == (g.points.shape[0],)
        assert g.meta.truth == {"defective": False, "defect": "good"}


def test_real3d_anomalous_without_gt(real3d: Path) -> None:
    (real3d / "airplane" / "gt" / "2_sink.txt").unlink()
    s = list_samples(real3d, "real3d", "airplane", "test")[1]
    assert s.gt_path is None
    with pytest.raises(DatasetError, match=r"2_sink\.pcd.*no label file.*2_sink\.txt"):
        s.load()


def test_real3d_broken_pcd_is_dataset_error(real3d: Path) -> None:
    (real3d / "airplane" / "train" / "1_template.pcd").write_bytes(b"VERSION 0.7\nFIELDS x y z\n")
    with pytest.raises(DatasetError, match=r"1_template\.pcd.*missing header line"):
        list_samples(real3d, "real3d", "airplane", "train")[0].load()


def test_anomaly_shapenet(tmp_path: Path) -> None:
    root = tmp_path / "Anomaly-ShapeNet" / "pcd"
    c = root / "ashtray0"
    for i in range(2):
        write_pcd(c / "train" / f"ashtray0_template{i}.pcd", _cloud(15, i))
    write_pcd(c / "test" / "ashtray0_bulge0.pcd", _cloud(18, 9))
    lab = np.zeros(18, np.uint8)
    lab[-3:] = 1
    _write_txt(c / "GT" / "ashtray0_bulge0.txt", _cloud(18, 10), lab, sep=",")  # commas, as published
    write_pcd(c / "test" / "ashtray0_concavity1.pcd", _cloud(12, 11))
    _write_txt(c / "GT" / "ashtray0_concavity1.txt", _cloud(12, 11), np.r_[1, np.zeros(11)])
    write_pcd(c / "test" / "ashtray0_positive0.pcd", _cloud(16, 12), binary=False)  # normal, no GT
    write_pcd(c / "test" / "ashtray0_positive1.pcd", _cloud(16, 13))
    _write_txt(c / "GT" / "ashtray0_positive1.txt", _cloud(16, 13), np.zeros(16))
    write_pcd(root / "bottle1" / "train" / "bottle1_template0.pcd", _cloud(5, 0))

    assert list_classes(root, "anomaly-shapenet") == ["ashtray0", "bottle1"]
    train = list_samples(root, "anomaly-shapenet", "ashtray0", "train")
    assert [s.stem for s in train] == ["ashtray0_template0", "ashtray0_template1"]
    test = list_samples(root, "anomaly-shapenet", "ashtray0", "test")
    assert [(s.stem, s.defect, s.label) for s in test] == [
        ("ashtray0_bulge0", "bulge", 1),
        ("ashtray0_concavity1", "concavity", 1),
        ("ashtray0_positive0", "good", 0),
        ("ashtray0_positive1", "good", 0),
    ]
    bulge = test[0].load()
    np.testing.assert_allclose(bulge.points, _cloud(18, 10))  # points from the GT file
    assert np.flatnonzero(bulge.gt_mask).tolist() == [15, 16, 17]
    assert test[1].load().gt_mask.tolist() == [1] + [0] * 11
    pos0 = test[2].load()
    assert pos0.points.shape == (16, 3) and not pos0.gt_mask.any()
    np.testing.assert_array_equal(pos0.points, _cloud(16, 12))
    assert not test[3].load().gt_mask.any()
    (c / "test").rename(c / "moved")
    with pytest.raises(DatasetError, match=r"ashtray0[/\\]test.*missing directory"):
        list_samples(root, "anomaly-shapenet", "ashtray0", "test")
