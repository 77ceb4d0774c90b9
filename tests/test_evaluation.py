"""``inspectd eval`` (tools.evaluation.protocol) end to end on tiny synthetic datasets of each layout.

Checks the report schema, the saved per-sample scores (and that every metric can be
recomputed from them), the figures, the CLI, and that --zero-shot never fits on the class it
tests. Voxels of 2 mm and a small coreset keep it fast; the real numbers are in docs/results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sensors.datasets import list_samples
from sensors.parts import PART_CLASSES
from tools.cli import main
from tools.evaluation.protocol import evaluate, recompute_metrics, score_file
from tools.synth.writer import synthesize
from workers.patchcore import PatchCoreFPFHScorer

FAST = {"coreset_ratio": 0.05}
CLASS_KEYS = {"i_auroc", "p_auroc", "aupro", "n_test", "fit_seconds", "score_seconds_per_sample"}
MEAN_KEYS = {"i_auroc", "p_auroc", "aupro"}


def _tiny(root: Path, layout: str, n_classes: int) -> Path:
    synthesize(root, layout, n_classes, seed=1, n_train=2, n_test_good=2, n_test_per_defect=1,
               n_validation=0, kinds=["bulge", "break"], progress=False, workers=1)
    return root


@pytest.fixture(scope="module")
def shapenet2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes, for --zero-shot."""
    return _tiny(tmp_path_factory.mktemp("asn"), "anomaly-shapenet", 2)


def _check_close(a: float | None, b: float) -> None:
    if a is None:
        assert np.isnan(b)
    else:
        assert a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize("layout", ["mvtec3d", "real3d", "anomaly-shapenet"])
def test_eval_end_to_end(layout: str, tmp_path: Path, shapenet2: Path) -> None:
    data = shapenet2 if layout == "anomaly-shapenet" else _tiny(tmp_path / "data", layout, 1)
    cls = PART_CLASSES[0]
    out = tmp_path / "eval"
    report = evaluate(data, layout, "patchcore-fpfh", classes=[cls], out=out, scorer_params=FAST,
                      progress=False, voxel_size=2.0)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert {"dataset", "layout", "scorer", "classes", "mean"} <= on_disk.keys()
    assert on_disk["layout"] == layout and on_disk["scorer"] == "patchcore-fpfh"
    assert Path(on_disk["dataset"]) == data.resolve()
    assert list(on_disk["classes"]) == [cls]
    row = on_disk["classes"][cls]
    served = {"aupro_served"} if layout == "mvtec3d" else set()  # the map the daemon serves, beside the dense one
    assert set(row) == CLASS_KEYS | served and set(on_disk["mean"]) == MEAN_KEYS | served
    assert on_disk["failures"] == [] and on_disk["units"] == ("m" if layout == "mvtec3d" else "mm")
    assert row["n_test"] == 4 and row["fit_seconds"] > 0 and row["score_seconds_per_sample"] > 0
    for k in MEAN_KEYS:
        assert 0.0 <= row[k] <= 1.0
    assert on_disk["voxel_size"] == 2.0 and on_disk["scorer_params"]["coreset_ratio"] == 0.05

    # per-sample scores: one file per test sample, exactly the specified keys, aligned to the sample
    tests = list_samples(data, layout, cls, "test")
    key = "map" if layout == "mvtec3d" else "point_scores"
    for s in tests:
        path = score_file(out, s)
        expected = f"{s.defect}_{s.stem}.npz" if layout == "mvtec3d" else f"{s.stem}.npz"
        assert path == out / "scores" / cls / expected and path.is_file()
        with np.load(path) as z:
            assert set(z.files) == {"object_score", "label", key}
            assert int(z["label"]) == s.label and np.isfinite(float(z["object_score"]))
            assert z[key].shape == s.load().points.shape[:-1]
    assert len(list((out / "scores" / cls).iterdir())) == len(tests)

    # the report's numbers come back from the saved scores alone (+ the dataset's gt and points)
    again = recompute_metrics(out)
    for k in MEAN_KEYS:
        _check_close(on_disk["classes"][cls][k], again["classes"][cls][k])
        _check_close(on_disk["mean"][k], again["mean"][k])

    for name in ("report.md", "roc_curves.png", "gallery.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| Class | I-AUROC | P-AUROC | AUPRO@0.3 |" in md and "| n_test | fit s | s / sample |" in md
    assert "**Mean**" in md and "95 % CI" in md and "kind: bulge" in md


def test_zero_shot_fits_on_the_other_classes_only(shapenet2: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[set[str]] = []
    original = PatchCoreFPFHScorer.fit

    def spy(self: PatchCoreFPFHScorer, clouds, progress: bool = False) -> None:
        seen.append({c.frame.meta.product for c in clouds})
        original(self, clouds, progress)

    monkeypatch.setattr(PatchCoreFPFHScorer, "fit", spy)
    a, b = sorted(PART_CLASSES[:2])
    report = evaluate(shapenet2, "anomaly-shapenet", "patchcore-fpfh", classes=[a], zero_shot=True,
                      out=tmp_path / "zs", scorer_params=FAST, progress=False, voxel_size=2.0)
    assert seen == [{b}]  # tested on a, fitted on the other class only
    assert report["zero_shot"] is True and report["details"][a]["fit_classes"] == [b]
    seen.clear()
    evaluate(shapenet2, "anomaly-shapenet", "patchcore-fpfh", classes=[b], out=tmp_path / "fs",
             scorer_params=FAST, progress=False, voxel_size=2.0)
    assert seen == [{b}]


def test_cli_synth_and_eval(shapenet2: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    assert main(["synth", str(data), "--layout", "real3d", "--classes", "1", "--seed", "2", "--train", "1",
                 "--test-good", "1", "--test-per-defect", "0", "--workers", "1", "--no-progress"]) == 0
    assert json.loads((data / "dataset.json").read_text())["counts"]["total"] == 2
    cls = PART_CLASSES[1]
    assert main(["eval", "--dataset", str(shapenet2), "--layout", "anomaly-shapenet", "--scorer", "patchcore-fpfh",
                 "--classes", cls, "--out", str(out), "--voxel-size", "2",
                 "--scorer-param", "coreset_ratio=0.05", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["classes"]) == [cls] and report["classes"][cls]["n_test"] == 4
    assert report["voxel_size"] == 2.0 and report["scorer_params"]["coreset_ratio"] == 0.05
    assert report["command"] == (f"inspectd eval --dataset {shapenet2} --layout anomaly-shapenet --scorer patchcore-fpfh "
                                 f"--classes {cls} --out {out} --voxel-size 2 --scorer-param coreset_ratio=0.05")


def test_clear_errors(shapenet2: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown class"):
        evaluate(shapenet2, "anomaly-shapenet", "patchcore-fpfh", classes=["teapot"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown scorer"):
        evaluate(shapenet2, "anomaly-shapenet", "no-such-scorer", out=tmp_path, progress=False)
    assert main(["eval", "--dataset", str(tmp_path / "missing"), "--layout", "real3d", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2


def test_enrollment_takes_the_validation_splits_good_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a class is fitted on its train split and its validation split's good parts (never the
    defective ones); ``enroll="train"`` fits on the train split alone."""
    data = tmp_path / "data"
    synthesize(data, "real3d", 1, seed=3, n_train=2, n_test_good=1, n_test_per_defect=1, n_validation=2,
               n_validation_per_defect=1, kinds=["bulge"], progress=False, workers=1)
    seen: list[list[str]] = []
    original = PatchCoreFPFHScorer.fit

    def spy(self: PatchCoreFPFHScorer, clouds, progress: bool = False) -> None:
        seen.append(sorted(c.frame.meta.part_id.split("_")[1] for c in clouds))  # <k>_template / <k>_good
        original(self, clouds, progress)

    monkeypatch.setattr(PatchCoreFPFHScorer, "fit", spy)
    cls = PART_CLASSES[0]
    both = evaluate(data, "real3d", "patchcore-fpfh", out=tmp_path / "both", scorer_params=FAST, progress=False,
                    voxel_size=2.0)
    assert seen == [["good", "good", "template", "template"]]
    assert both["enroll"] == "train+validation" and both["details"][cls]["n_train"] == 4
    seen.clear()
    alone = evaluate(data, "real3d", "patchcore-fpfh", out=tmp_path / "alone", scorer_params=FAST, progress=False,
                     voxel_size=2.0, enroll="train")
    assert seen == [["template", "template"]] and alone["enroll"] == "train" and alone["details"][cls]["n_train"] == 2
    with pytest.raises(ValueError, match="enrollment"):
        evaluate(data, "real3d", "patchcore-fpfh", out=tmp_path / "bad", progress=False, enroll="test")
