"""A quality floor: every built-in scorer must keep detecting defects on a small fixed set.

Why: a change that makes a scorer blind to a defect kind passes every functional test; this one
fails the build instead. The set is made here, deterministically, in seconds of CPU
(``tools.synth.writer``: Real3D-AD layout, the first two classes (flange, bracket), seed 5,
3 training parts, 6 good and one defective test part per kind of the bench's eight kinds at
their default sizes, per class: 28 test parts), and each scorer runs ``inspectd eval``'s
protocol on it at 2 mm voxels, with the small settings of ``PARAMS`` (a fast configuration of
the same code, not its production defaults).

Measured mean I-AUROC on this set (2-core CPU machine, synthetic generator 1.2.0: parts within
ISO 2768-m; the figures are deterministic, so a regression shows as a drop, not as noise; with
16 defective parts a single part moves a figure by about 0.03):

* patchcore-fpfh 0.781 (7.3 s CPU to fit and score both classes)
* zeroshot       0.667 (8.2 s CPU; fitted on each class's own train split here)
* template       0.938 (default parameters; 3.5 s CPU for both classes)
* fused          0.938 (default parameters: template + 0.5 × patchcore-fpfh on 1.5-voxel cells)
* fused-defects  0.938 (fitted on good parts only, so its defect bank is empty and it scores as fused;
  what confirmed defects add is measured in docs/results/few-defects.md)
* imrnet         0.583 (7.9 s CPU; no fine-tuning and 1024 points at these settings, so not far above
  chance: the floor still catches a scorer that breaks outright)

Until generator 1.1.0 the set was made in the Anomaly-ShapeNet layout, whose test parts were
then the same scans as this layout's. Since 1.2.0 that layout draws parts of its own, and on
its new set imrnet measured 0.510, at chance, where a floor catches nothing; this layout keeps
the set's test parts of 1.1.0 (its training parts are denser: ``tools.synth.presets.POINTS``).
Measured with the same protocol in the Anomaly-ShapeNet layout (1.2.0): patchcore-fpfh 0.729,
zeroshot 0.677, template and fused 0.927, imrnet 0.510.

The set itself takes 4.0 s of CPU to make. The whole file: under a minute of CPU.

Each floor is about 0.05 below its measured value. A scorer without a floor entry fails with a
message saying what to add: measure it with this file's ``PARAMS`` and put its floor in
``FLOORS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tools.evaluation.protocol import evaluate
from tools.synth.presets import BENCH_DEFECTS
from tools.synth.writer import synthesize
from workers.registry import builtin_scorers

LAYOUT = "real3d"
VOXEL_MM = 2.0
PARAMS: dict[str, dict[str, Any]] = {
    "patchcore-fpfh": {},
    "imrnet": {"n_points": 1024, "n_centers": 64, "finetune_steps": 0, "iterations": 1, "template_samplings": 1,
               "finetune_samplings": 1},
    "zeroshot": {"epochs": 2, "max_train_patches": 256, "batch_positives": 32, "poi_max_sources": 4, "width": 16,
                 "coreset_ratio": 0.5, "seed": 0},
}
FLOORS: dict[str, float] = {
    "patchcore-fpfh": 0.73,  # measured 0.781
    "zeroshot": 0.61,  # measured 0.667
    "imrnet": 0.53,  # measured 0.583
    "template": 0.88,  # measured 0.938
    "fused": 0.88,  # measured 0.938
    "fused-defects": 0.88,  # measured 0.938 (no confirmed defects: it is fused)
}


@pytest.fixture(scope="module")
def floor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quality-floor")
    synthesize(root, LAYOUT, 2, seed=5, n_train=3, n_test_good=6, n_test_per_defect=1, n_validation=0,
               kinds=list(BENCH_DEFECTS), progress=False, workers=1)
    return root


@pytest.mark.parametrize("scorer", builtin_scorers())  # plugins (tests/plugins) bring their own checks
def test_scorer_stays_above_its_floor(scorer: str, floor_set: Path, tmp_path: Path) -> None:
    if scorer not in FLOORS:
        pytest.fail(f"scorer {scorer!r} has no quality floor: run this test's protocol on it (PARAMS[{scorer!r}] "
                    "for a fast configuration), then add FLOORS[{scorer!r}] = measured mean I-AUROC - 0.05 and the "
                    "measured value to the module docstring")
    report = evaluate(floor_set, LAYOUT, scorer, out=tmp_path / "eval", scorer_params=PARAMS.get(scorer, {}),
                      progress=False, voxel_size=VOXEL_MM, gallery_per_class=0, bootstrap=200)
    assert report["failures"] == []
    i_auroc = report["mean"]["i_auroc"]
    per_kind = {k: g["mean"] for k, g in report["breakdown"]["per_defect"].items()}
    assert i_auroc >= FLOORS[scorer], (
        f"{scorer}: mean I-AUROC {i_auroc:.3f} fell below its floor {FLOORS[scorer]:.2f} (per kind: {per_kind})")
