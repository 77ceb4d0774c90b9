"""What ``inspectd synth`` can write: layouts, defect kinds, point counts, part classes, poses and
the benchmark preset (``--preset bench``); ``tools.synth.writer`` writes the samples.

Point counts (``POINTS``): anomaly-shapenet 16 000 points per part (the paper's range is 8K–30K),
noise σ 0.05 mm; real3d test parts 16 000 points with σ 0.05 mm and train templates 32 000
points with σ 0.01 mm (Real3D-AD's templates are complete, clean scans, denser than the
tests). At the evaluation's 1 mm voxels these give a few thousand to ~10 000 voxels per part,
so PatchCore-FPFH scores a part in well under a second on 2 cores.

Benchmark preset (``--preset bench``, :data:`PRESETS`): the 8 classes of :data:`BENCH_CLASSES`,
the 8 kinds of :data:`BENCH_DEFECTS` (the paper's six plus ``contamination`` and ``missing``,
see ``sensors.defects``), each kind's parts graded from subtle to gross: the k-th of n parts of
a kind gets severity (k + ½)/n, which sets its magnitude on a log scale
(``sensors.defects.SEVERITY_RANGES``: bulges and dents from 0.1 mm, bends from 1°), recorded
with its bin (subtle / moderate / gross) in ``dataset.json``. Ground truth follows the
magnitude: a point is anomalous where the surface moved by more than half the defect's
displacement when that is below 0.25 mm; the anomalous fraction must lie in
:data:`BENCH_FRACTION_RANGE` with at least :data:`BENCH_MIN_ANOMALOUS` points. Poses
(:data:`POSES`): ``so3`` turns point-cloud test and validation parts to any orientation (carved
and sampled in the canonical pose, then rotated) and gives camera parts fixture jitter (±10°
about z, ±5 mm, a tilt of up to 2°); ``z10`` is the pose of ``tools.synth.writer``'s step 2. A validation split (good and
defective parts; ``<class>/validation/`` in every layout, label files in
``validation/gt`` / ``validation/GT`` for the point-cloud layouts) is for choosing defaults; its
samples (and those of the defective validation parts of mvtec3d) come after the test parts in
the sample index, so the splits above are unchanged by it. Defaults are chosen on seed 1, and
seed 0 is reported (docs/results/bench-preset.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GENERATOR_VERSION = "1.2.0"
"""1.2.0: anomaly-shapenet draws its own parts (up to 1.1.0 its test parts were real3d's scans;
``samples.LAYOUT_STREAM``). 1.1.0: good parts vary within ISO 2768-m general tolerances (1.0.0:
±2 % of every dimension)."""
LAYOUTS = ("mvtec3d", "real3d", "anomaly-shapenet")
DEFECTS: tuple[str, ...] = ("bulge", "concavity", "hole", "crack", "break", "bending")
"""The six defect kinds of Anomaly-ShapeNet, with the paper's names (folder / file names)."""
BENCH_DEFECTS: tuple[str, ...] = (*DEFECTS, "contamination", "missing")
"""The paper's six kinds plus foreign material on the surface and a missing feature (``--preset bench``)."""

POINTS: dict[str, dict[str, dict[str, float]]] = {
    "anomaly-shapenet": {"train": {"n": 16000, "noise": 0.05}, "test": {"n": 16000, "noise": 0.05}},
    "real3d": {"train": {"n": 32000, "noise": 0.01}, "test": {"n": 16000, "noise": 0.05}},
}
"""Points per part and isotropic scanner noise σ (mm), per point-cloud layout and split."""

FRACTION_RANGE = (0.01, 0.10)
MAX_DEFECT_TRIES = 24
MAX_EDGE_MM = 1.0
RIM_MM = {"hole": 2.5, "crack": 2.5}
"""Rim of removed material marked anomalous in point clouds (default 1 mm, ``sensors.defects``)."""
DEFAULT_COUNTS = {"n_train": 4, "n_validation": 2, "n_test_good": 6, "n_test_per_defect": 1}
BENCH_CLASSES: tuple[str, ...] = ("flange", "bracket", "gear", "bolt", "washer", "hinge", "cap", "pulley")
"""The bench preset's 8 classes: thin-walled (washer 3 mm, hinge leaves 3 mm, bracket wall 6 mm),
rotationally symmetric (flange, washer, cap, pulley) and finely featured (gear teeth, bolt
thread, the cap's knurl, the flange's and hinge's small bosses)."""
PRESETS: dict[str, dict[str, Any]] = {
    "bench": {"class_list": BENCH_CLASSES, "n_classes": len(BENCH_CLASSES), "n_train": 4, "n_validation": 10,
              "n_validation_per_defect": 3, "n_test_good": 30, "n_test_per_defect": 10, "kinds": BENCH_DEFECTS,
              "pose": "so3", "magnitudes": True},
}
"""``inspectd synth --preset NAME``: the arguments of :func:`synthesize` it sets (flags override)."""
POSES = ("z10", "so3")
"""``z10``: every camera part and every point-cloud test part turned about z by U(-10°, 10°) and
shifted U(-5, 5) mm in x, y. ``so3``: point-cloud test and validation parts in a uniformly random
orientation (any rotation, carved in the canonical pose first), camera parts with fixture
jitter: the z10 pose plus a tilt of up to 2° about a random horizontal axis, resting on the table."""
BENCH_FRACTION_RANGE = (0.0005, 0.15)
"""Anomalous fraction a defective sample must have with graded magnitudes (subtle defects are small)."""
BENCH_MIN_ANOMALOUS = 10
"""... and at least this many anomalous points (point clouds; camera: ``simcam.MIN_VISIBLE_GT_PIXELS``)."""


def class_names(n_classes: int, class_list: Sequence[str] | None = None) -> list[str]:
    """The first ``n_classes`` part classes of ``class_list`` (default ``sensors.parts.PART_CLASSES``)."""
    from sensors.parts import PART_CLASSES

    pool = list(PART_CLASSES if class_list is None else class_list)
    unknown = [c for c in pool if c not in PART_CLASSES]
    if unknown:
        raise ValueError(f"unknown part class(es) {', '.join(unknown)}; known: {', '.join(PART_CLASSES)}")
    if not 1 <= n_classes <= len(pool):
        raise ValueError(f"--classes must be between 1 and {len(pool)}, got {n_classes}")
    return pool[:n_classes]
