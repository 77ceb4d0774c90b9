"""``inspectd synth`` and ``inspectd eval``: the command-line side of ``tools.evaluation.protocol``.

Why separate: argument parsing and the printed summary are not the evaluation protocol.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sensors.datasets import LAYOUTS
from sensors.frame import UNITS_MM
from tools.evaluation.report import markdown_table

__all__ = ["add_commands", "cmd_eval", "cmd_synth", "parse_params"]


def _class_list(values: Sequence[str] | None) -> list[str] | None:
    """``--classes a b`` or ``--classes a,b`` → ['a', 'b']."""
    if not values:
        return None
    out = [c for v in values for c in v.split(",") if c]
    return out or None


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE parsed as JSON when it is JSON, else a string)."""
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"scorer parameter {item!r} must be KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _tolerance(text: str | None) -> str | float | None:
    """``--tolerance``: an ISO 2768-1 class letter, or a percentage such as ``2%`` (relative)."""
    if text is None or not text.endswith("%"):
        return text
    return float(text[:-1]) / 100.0


def cmd_synth(args: argparse.Namespace) -> int:
    from tools.synth.presets import PRESETS
    from tools.synth.writer import synthesize

    kwargs: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {"n_classes": 4}
    flags = (("n_classes", args.classes), ("n_train", args.train), ("n_test_good", args.test_good),
             ("n_test_per_defect", args.test_per_defect), ("n_validation", args.validation),
             ("n_validation_per_defect", args.validation_per_defect), ("pose", args.pose),
             ("tolerance", _tolerance(args.tolerance)),
             ("kinds", _class_list(args.kinds)))
    kwargs.update({k: v for k, v in flags if v is not None})
    t0 = time.perf_counter()
    info = synthesize(Path(args.out), args.layout, seed=args.seed, progress=not args.no_progress,
                      workers=args.workers, preset=args.preset, **kwargs)
    dt = time.perf_counter() - t0
    n = info.get("counts", {}).get("total", "?")
    print(f"wrote a {args.layout} dataset of {len(info['classes'])} classes ({n} samples) to {args.out} in {dt:.1f} s "
          f"with {info['workers']} worker(s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tools.evaluation.protocol import evaluate

    report = evaluate(
        args.dataset,
        args.layout,
        args.scorer,
        classes=_class_list(args.classes),
        zero_shot=args.zero_shot,
        out=args.out,
        scorer_params=parse_params(args.scorer_param),
        progress=not args.no_progress,
        voxel_size=args.voxel_size,
        command=_eval_command(args),
        units=args.units,
        enroll=args.enroll,
    )
    print(markdown_table(report))
    print(f"\nreport: {Path(args.out) / 'report.json'} and report.md, figures roc_curves.png, gallery.png")
    return 0


def _eval_command(args: argparse.Namespace) -> str:
    """The ``inspectd eval`` command line equivalent to ``args`` (recorded in the report)."""
    import shlex

    parts = ["inspectd", "eval", "--dataset", str(args.dataset), "--layout", args.layout, "--scorer", args.scorer]
    classes = _class_list(args.classes)
    if classes:
        parts += ["--classes", *classes]
    if args.zero_shot:
        parts.append("--zero-shot")
    parts += ["--out", str(args.out)]
    if args.voxel_size != 1.0:
        parts += ["--voxel-size", f"{args.voxel_size:g}"]
    if args.units:
        parts += ["--units", args.units]
    if args.enroll != "train+validation":
        parts += ["--enroll", args.enroll]
    for item in args.scorer_param or ():
        parts += ["--scorer-param", item]
    return shlex.join(parts)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``synth`` and ``eval`` on the ``inspectd`` parser (each sets ``func``)."""
    s = sub.add_parser(
        "synth",
        help="write a synthetic benchmark dataset (Anomaly-ShapeNet pipeline) in a public layout",
        description="Procedural parts → uniform subdivision → defect carving (bulge, concavity, hole, crack, "
        "break, bending) → per-point ground truth, written in the MVTec 3D-AD, Real3D-AD or "
        "Anomaly-ShapeNet layout. Deterministic for a seed.",
    )
    s.add_argument("out", help="output folder (created)")
    s.add_argument("--layout", required=True, choices=LAYOUTS)
    s.add_argument("--preset", choices=["bench"],
                   help="bench: 8 classes (thin-walled, rotationally symmetric, finely featured), 8 defect kinds "
                   "graded subtle to gross, 4 train / 30 good + 10 per kind test / 10 good + 3 per kind validation "
                   "parts per class, arbitrary rotation (point clouds) or fixture jitter (camera); flags override")
    s.add_argument("--classes", type=int,
                   help="number of part classes: the first N of the library (default 4) or of the preset's")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed (bench: choose defaults on seed 1, report seed 0)")
    s.add_argument("--train", type=int, help="good training parts per class")
    s.add_argument("--test-good", type=int, help="good test parts per class")
    s.add_argument("--test-per-defect", type=int, help="defective test parts per defect kind and class")
    s.add_argument("--validation", type=int, help="good validation parts per class")
    s.add_argument("--validation-per-defect", type=int, help="defective validation parts per kind and class")
    s.add_argument("--kinds", nargs="+", help="defect kinds (space- or comma-separated)")
    s.add_argument("--pose", choices=["z10", "so3"],
                   help="z10: test parts turned ±10° about z (the default without a preset); so3: any rotation "
                   "for point clouds, fixture jitter for the camera (the bench preset's)")
    s.add_argument("--tolerance",
                   help="how good parts differ: an ISO 2768-1 general-tolerance class (f, m, c, v; default m) or a "
                   "relative jitter of every dimension such as 2%% (generator 1.0.0's)")
    s.add_argument("--workers", type=int, help="processes (default: min(2, CPUs))")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_synth)

    e = sub.add_parser(
        "eval",
        help="fit a scorer per class on a dataset's train split, score its test split, report the metrics",
        description="Writes OUT/report.json, report.md, roc_curves.png, gallery.png and the per-sample scores "
        "OUT/scores/<class>/<stem>.npz (mvtec3d: <defect>_<stem>.npz).",
    )
    e.add_argument("--dataset", required=True, help="dataset root (the folder holding the class folders)")
    e.add_argument("--layout", required=True, choices=LAYOUTS)
    e.add_argument("--scorer", default="fused")
    e.add_argument("--classes", nargs="+", help="classes to evaluate (default: all); space- or comma-separated")
    e.add_argument("--zero-shot", action="store_true",
                   help="fit on the train splits of all OTHER classes only (3DzAL protocol)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--voxel-size", type=float, default=1.0, help="preprocessing voxel size in mm (default 1.0)")
    e.add_argument("--units", choices=list(UNITS_MM),
                   help="units of the dataset's coordinates (default: its dataset.json's, else the layout's: "
                   "m for mvtec3d, mm for real3d / anomaly-shapenet)")
    e.add_argument("--enroll", choices=["train+validation", "train"], default="train+validation",
                   help="what each class is fitted on: its train split and its validation split's good parts "
                   "where there is one (default), or the train split alone (the public benchmarks' tables)")
    e.add_argument("--scorer-param", action="append", metavar="KEY=VALUE",
                   help="scorer hyper-parameter (repeatable; VALUE is JSON), e.g. coreset_ratio=0.2")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
