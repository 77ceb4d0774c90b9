"""tools.synth.writer: the synthetic datasets are written exactly as sensors.datasets reads them.

Tiny datasets (one class, one part per split and defect kind) keep this fast; the defaults
and the 4-class timing are exercised by ``inspectd synth`` in docs/results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sensors.datasets import list_classes, list_samples
from sensors.parts import PART_CLASSES
from sensors.pointfiles import read_pcd
from tools.synth.presets import DEFECTS, FRACTION_RANGE
from tools.synth.writer import synthesize

TINY = {"n_train": 1, "n_test_good": 1, "n_test_per_defect": 1, "n_validation": 1, "progress": False, "workers": 1}


@pytest.fixture(scope="module", params=["mvtec3d", "real3d", "anomaly-shapenet"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    layout = request.param
    root = tmp_path_factory.mktemp(f"synth-{layout}")
    info = synthesize(root, layout, 1, seed=3, **TINY)
    return layout, root, info


def _part_pixels(points: np.ndarray, gt: np.ndarray) -> int:
    valid = np.isfinite(points).all(axis=-1)
    return int(((valid & (np.nan_to_num(points[..., 2]) > 0.5)) | (gt > 0)).sum())


def test_round_trip_through_loaders(tiny: tuple[str, Path, dict]) -> None:
    layout, root, info = tiny
    cls = PART_CLASSES[0]
    assert list_classes(root, layout) == [cls] == info["classes"]
    train = list_samples(root, layout, cls, "train")
    assert len(train) == 1 and all(s.label == 0 and s.defect == "good" for s in train)
    test = list_samples(root, layout, cls, "test")
    assert sorted(s.defect for s in test) == sorted([*DEFECTS, "good"])
    if layout == "mvtec3d":
        assert len(list_samples(root, layout, cls, "validation")) == 1
    for s in [*train, *test]:
        f = s.load()
        assert f.gt_mask is not None and f.meta.product == cls
        frac = float(f.gt_mask.mean())
        if s.label == 0:
            assert frac == 0.0
            continue
        if layout == "mvtec3d":
            assert f.organized and f.points.shape == (400, 400, 3) and f.rgb is not None
            assert s.gt_path is not None
            assert set(np.unique(np.asarray(Image.open(s.gt_path)))) <= {0, 255}
            assert f.meta.units == "m" and np.nanmax(f.points[..., 2]) < 0.2  # metres, as MVTec 3D-AD
            frac = f.gt_mask.sum() / _part_pixels(f.in_mm().points, f.gt_mask)
        else:
            assert not f.organized and f.points.shape == (16000, 3)
            # the label file holds the PCD's points, in the PCD's order
            pcd_points, _ = read_pcd(s.path)
            np.testing.assert_allclose(f.points, pcd_points, atol=1e-5)
        assert FRACTION_RANGE[0] <= frac <= FRACTION_RANGE[1], (s.path, frac)
    if layout == "mvtec3d":  # good test parts have an all-black gt PNG, as published
        good = next(s for s in test if s.label == 0)
        assert good.gt_path is not None and not np.asarray(Image.open(good.gt_path)).any()
    else:  # and no label file in the point-cloud layouts
        assert all(s.gt_path is None for s in test if s.label == 0)


def test_file_names_follow_the_published_layouts(tiny: tuple[str, Path, dict]) -> None:
    layout, root, _ = tiny
    c = root / PART_CLASSES[0]
    if layout == "mvtec3d":
        assert (c / "train/good/xyz/000.tiff").is_file() and (c / "train/good/rgb/000.png").is_file()
        assert (c / "validation/good/xyz/000.tiff").is_file()
        for kind in [*DEFECTS, "good"]:
            assert all((c / "test" / kind / sub / f"000.{ext}").is_file()
                       for sub, ext in (("xyz", "tiff"), ("rgb", "png"), ("gt", "png")))
        assert not (c / "train/good/gt").exists()
    elif layout == "real3d":
        assert [p.name for p in (c / "train").iterdir()] == ["1_template.pcd"]
        stems = sorted(p.stem for p in (c / "test").iterdir())
        assert sorted(s.split("_", 1)[1] for s in stems) == sorted([*DEFECTS, "good"])
        assert sorted(p.stem for p in (c / "gt").iterdir()) == sorted(s for s in stems if not s.endswith("good"))
    else:
        assert [p.name for p in (c / "train").iterdir()] == [f"{PART_CLASSES[0]}_template0.pcd"]
        assert sorted(p.name for p in (c / "test").iterdir()) == sorted(
            [f"{k}0.pcd" for k in DEFECTS] + ["positive0.pcd"])
        assert sorted(p.name for p in (c / "GT").iterdir()) == sorted(f"{k}0.txt" for k in DEFECTS)


def test_dataset_json(tiny: tuple[str, Path, dict]) -> None:
    layout, root, info = tiny
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["layout"] == layout and meta["seed"] == 3 and meta["classes"] == [PART_CLASSES[0]]
    assert meta["generator_version"] and meta["defect_kinds"] == list(DEFECTS)
    assert meta["parameters"]["part_tolerance"].startswith("ISO 2768-m")
    n = 1 + (1 if layout == "mvtec3d" else 0) + 1 + len(DEFECTS)
    assert meta["counts"]["total"] == n == len(meta["samples"])
    lo, hi = meta["anomalous_fraction"]["min"], meta["anomalous_fraction"]["max"]
    assert FRACTION_RANGE[0] <= lo <= hi <= FRACTION_RANGE[1]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed_whatever_the_workers(tmp_path: Path) -> None:
    kw = {"n_train": 1, "n_test_good": 1, "n_test_per_defect": 1, "kinds": ["hole", "bending"], "progress": False}
    synthesize(tmp_path / "a", "anomaly-shapenet", 1, seed=5, workers=1, **kw)
    synthesize(tmp_path / "b", "anomaly-shapenet", 1, seed=5, workers=2, **kw)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 7  # 4 PCDs, 2 GT files, dataset.json
    assert all(a[k] == b[k] for k in a)
    synthesize(tmp_path / "c", "anomaly-shapenet", 1, seed=6, workers=1, **kw)
    c = _tree(tmp_path / "c")
    assert c[f"{PART_CLASSES[0]}/test/hole0.pcd"] != a[f"{PART_CLASSES[0]}/test/hole0.pcd"]


def test_rewrites_its_own_output_and_refuses_other_folders(tmp_path: Path) -> None:
    kw = {"n_train": 1, "n_test_good": 1, "n_test_per_defect": 0, "progress": False, "workers": 1}
    synthesize(tmp_path / "d", "real3d", 1, seed=0, **kw)
    synthesize(tmp_path / "d", "real3d", 1, seed=0, **{**kw, "n_test_good": 2})
    assert len(list((tmp_path / "d" / PART_CLASSES[0] / "test").iterdir())) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        synthesize(tmp_path / "other", "real3d", 1, seed=0, **kw)
    with pytest.raises(ValueError, match="layout"):
        synthesize(tmp_path / "x", "kitti", 1, seed=0, **kw)
    with pytest.raises(ValueError, match="between 1 and"):
        synthesize(tmp_path / "y", "real3d", len(PART_CLASSES) + 1, seed=0, **kw)


def test_a_graded_defect_too_small_to_show_grows_instead_of_ending_the_run() -> None:
    from tools.synth.presets import MAX_DEFECT_TRIES
    from tools.synth.samples import SEVERITY_STEP, Job, _max_tries, _severity

    job = Job("/tmp/x", "mvtec3d", "flange", 0, 0, "test", "hole", "x.tiff", None, None, 0, "so3", 0.05)
    assert [_severity(job, t) for t in (1, MAX_DEFECT_TRIES)] == [0.05, 0.05]
    assert _severity(job, MAX_DEFECT_TRIES + 2) == pytest.approx(0.05 + 2 * SEVERITY_STEP)
    assert _severity(job, 10 * MAX_DEFECT_TRIES) == 1.0 and _max_tries(job) == 2 * MAX_DEFECT_TRIES
    default = Job("/tmp/x", "real3d", "flange", 0, 0, "test", "hole", "x.pcd", None, None, 0)
    assert _severity(default, MAX_DEFECT_TRIES + 5) is None and _max_tries(default) == MAX_DEFECT_TRIES


def _oracle_study():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "oracle_ceiling.py"
    spec = importlib.util.spec_from_file_location("oracle_ceiling", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_written_sample_is_remade_with_its_defect_free_twin(tiny: tuple[str, Path, dict], tmp_path: Path) -> None:
    """``scan_cloud`` / ``scan_camera`` remake each test sample from its seed (the oracle study
    checks every one against its file) and hand over its twin: against it, a good scan shows
    scanner noise only, and a defect stands out."""
    layout, root, info = tiny
    study = _oracle_study()
    out = tmp_path / "oracle.npz"
    study.measure(root, out, None, workers=1)
    z = np.load(out)
    assert len(z["kind"]) == info["counts"]["test"]
    good, bad = z["kind"] == "good", z["kind"] != "good"
    assert z["dev_32"][good].max() < 0.1  # noise: σ 0.05 mm (camera: of two renders) over ~32 points
    assert z["dev_1"][bad].max() > 3 * z["dev_1"][good].max()
    assert ("cad_dev_32" in z.files) == (layout != "mvtec3d")


def test_point_cloud_layouts_draw_parts_of_their_own(tmp_path: Path) -> None:
    """One seed's real3d and anomaly-shapenet test parts are different parts (up to generator
    1.1.0 they were the same scans), so the two layouts' figures are two measurements."""
    kw = {**TINY, "n_test_per_defect": 0, "n_validation": 0}
    synthesize(tmp_path / "r", "real3d", 1, seed=4, **kw)
    synthesize(tmp_path / "a", "anomaly-shapenet", 1, seed=4, **kw)
    cls = PART_CLASSES[0]
    real3d, _ = read_pcd(next((tmp_path / "r" / cls / "test").glob("*_good.pcd")))
    shapenet, _ = read_pcd(tmp_path / "a" / cls / "test" / "positive0.pcd")
    assert real3d.shape == shapenet.shape and not np.allclose(real3d, shapenet, atol=0.01)
