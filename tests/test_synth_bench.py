"""``inspectd synth --preset bench`` (reduced) and the eval breakdown it feeds.

A one-class reduction of the preset (a few parts per split, every defect kind) keeps this to
tens of seconds; the full preset's size and timings are in docs/results/bench-preset.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sensors.datasets import list_samples
from sensors.defects import SEVERITY_RANGES, severity_value
from tools.cli import main
from tools.evaluation.breakdown import SampleResult, breakdown, p_auroc_interval, pixel_histograms
from tools.synth.presets import BENCH_CLASSES, BENCH_DEFECTS, PRESETS
from workers.metrics import p_auroc


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "real3d"
    assert main(["synth", str(root), "--layout", "real3d", "--preset", "bench", "--classes", "1", "--train", "2",
                 "--test-good", "3", "--test-per-defect", "1", "--validation", "1", "--validation-per-defect", "1",
                 "--workers", "2", "--no-progress"]) == 0
    return root


def test_preset_sizes_and_magnitude_ranges() -> None:
    p = PRESETS["bench"]
    assert len(p["class_list"]) >= 8 and p["n_test_good"] >= 30 and p["n_test_per_defect"] >= 10
    assert p["n_validation"] > 0 and p["n_validation_per_defect"] > 0 and p["pose"] == "so3"
    assert set(BENCH_DEFECTS) == {"bulge", "concavity", "hole", "crack", "break", "bending", "contamination", "missing"}
    assert {"washer", "hinge", "flange", "pulley", "gear", "bolt"} <= set(BENCH_CLASSES)
    # with 10 parts per kind the subtlest sits at severity 0.05: bends of ~1°, bulges of ~2x the 0.05 mm noise
    assert severity_value("bending", 0.05) < 1.2 and severity_value("bulge", 0.05) < 2.5 * 0.05
    assert severity_value("dent", 0.05) < 2.5 * 0.05 and SEVERITY_RANGES["bending"][2] == 1.0


def test_bench_layout_manifest_and_poses(bench: Path) -> None:
    info = json.loads((bench / "dataset.json").read_text())
    assert info["preset"] == "bench" and info["pose"] == "so3" and info["units"] == "mm"
    cls = info["classes"][0]
    assert cls == BENCH_CLASSES[0]
    test = list_samples(bench, "real3d", cls, "test")
    assert sorted(s.defect for s in test if s.label) == sorted(BENCH_DEFECTS)
    val = list_samples(bench, "real3d", cls, "validation")
    assert sorted(s.defect for s in val) == sorted([*BENCH_DEFECTS, "good"])
    for s in val:
        f = s.load()
        assert f.gt_mask is not None and (f.gt_mask.any() == bool(s.label))
    samples = {r["file"]: r for r in info["samples"]}
    for s in test + val:
        rec = samples[s.path.relative_to(bench).as_posix()]
        if s.label:
            mag = rec["magnitude"]
            assert 0.0 <= mag["severity"] <= 1.0 and mag["bin"] in ("subtle", "moderate", "gross")
            assert mag["unit"] in ("mm", "deg", "1") and mag["value"] > 0
        else:
            assert "magnitude" not in rec
    # SO(3): the flange is a flat disc whose thinnest axis is z when canonical (train); test parts turn anywhere
    def thin_axis(points: np.ndarray) -> np.ndarray:
        return np.linalg.eigh(np.cov((points - points.mean(axis=0)).T))[1][:, 0]

    train = list_samples(bench, "real3d", cls, "train")[0].load().points
    assert abs(thin_axis(train)[2]) > 0.99
    tilts = [abs(thin_axis(s.load().points)[2]) for s in test]
    assert min(tilts) < 0.9


def test_eval_breakdown_per_kind_and_magnitude(bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["eval", "--dataset", str(bench), "--layout", "real3d", "--scorer", "patchcore-fpfh", "--out", str(out),
                 "--voxel-size", "2", "--scorer-param", "coreset_ratio=0.1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    br = report["breakdown"]
    assert set(br["per_defect"]) == set(BENCH_DEFECTS)
    assert set(br["per_magnitude"]) <= {"subtle", "moderate", "gross"} and br["per_magnitude"]
    lo, hi = report["ci95"]["i_auroc"]
    assert lo <= report["mean"]["i_auroc"] <= hi
    md = (out / "report.md").read_text()
    assert "kind: contamination" in md and "magnitude: moderate" in md


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(0)
    perfect = [SampleResult("a", f"g{i}", "good", 0, float(i)) for i in range(10)]
    perfect += [SampleResult("a", f"d{i}", "bulge", 1, 100.0 + i, "subtle") for i in range(10)]
    br = breakdown(perfect, b=300)
    assert br["i_auroc"]["mean"] == 1.0 and br["i_auroc"]["ci95"] == [1.0, 1.0]
    noisy = [SampleResult(c, f"g{i}", "good", 0, float(rng.normal())) for c in "ab" for i in range(30)]
    noisy += [SampleResult(c, f"d{i}", k, 1, float(rng.normal(1.0)), "gross")
              for c in "ab" for k in ("hole", "crack") for i in range(10)]
    br = breakdown(noisy, b=500)
    lo, hi = br["i_auroc"]["ci95"]
    assert lo < br["i_auroc"]["mean"] < hi and hi - lo < 0.4
    assert set(br["per_defect"]) == {"hole", "crack"} and set(br["per_magnitude"]) == {"gross"}
    assert breakdown(noisy, b=500) == br  # seeded
    # the binned P-AUROC the interval is built on is close to the exact one
    maps = [rng.normal(size=400) + 2.0 * (np.arange(400) < 40) * (k % 2) for k in range(12)]
    gts = [((np.arange(400) < 40) * (k % 2)).astype(np.uint8) for k in range(12)]
    hists = pixel_histograms(maps, gts, [k % 2 for k in range(12)])
    pos, neg = hists.positive.sum(axis=0), hists.negative.sum(axis=0)
    below = np.cumsum(neg) - neg
    binned = float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
    assert binned == pytest.approx(p_auroc(maps, gts), abs=0.01)
    lo, hi = p_auroc_interval({"a": hists}, b=300)
    assert lo <= p_auroc(maps, gts) <= hi


@pytest.mark.parametrize("kind", ["contamination", "missing"])
def test_added_defect_kinds_mark_the_part(kind: str) -> None:
    from sensors.defects import ALL_KINDS, carve_defect, sample_cloud
    from sensors.mesh import subdivide_uniform
    from sensors.parts import make_part

    assert kind in ALL_KINDS
    base = subdivide_uniform(make_part("bracket", np.random.default_rng(0)), 1.0)
    for severity in (None, 0.05, 0.95):
        mesh, info = carve_defect(base, kind, np.random.default_rng(3), (0.3, 0.2, 0.9), severity=severity)
        tol = 0.25 if severity is None else min(0.25, 0.5 * info["magnitude"]["value"])
        _, labels = sample_cloud(mesh, base, 16000, np.random.default_rng(1), 0.05, info=info, tol=tol)
        assert 10 <= labels.sum() < 0.15 * len(labels), (severity, labels.sum())
        if severity is not None:
            assert info["magnitude"]["severity"] == severity and info["magnitude"]["unit"] == "mm"
