"""``inspectd synth`` and ``inspectd eval``: benchmark data and the evaluation protocol.

Why: a scorer is only worth deploying if its numbers on the public 3D anomaly-detection
benchmarks (MVTec 3D-AD, Real3D-AD, Anomaly-ShapeNet) can be produced by one command and checked
by anyone. ``inspectd eval`` runs the exact production path (``workers.frame_scoring.score_frame``:
preprocess → scorer → map back) on a dataset in one of the published layouts
(``sensors.datasets``), writes the scores of every test sample, and the metrics of the field
(``workers.metrics``), so the report can be recomputed from what it saved
(:func:`recompute_metrics`). ``inspectd synth`` writes synthetic datasets in those layouts
(``sensors.synth``, the Anomaly-ShapeNet pipeline of IMRNet Sec. 3 over procedural parts).

Protocol (per class):

* **fit** on the class's ``train`` split (good parts only). With ``--zero-shot`` the scorer is
  fitted on the ``train`` splits of **all other classes of the dataset** (not only the other
  classes selected with ``--classes``) and never sees the class it is tested on: the
  cross-class protocol of 3DzAL. MVTec's ``validation`` split is not used.
* **preprocessing** (``workers.preprocess``): organized camera scenes (``mvtec3d``) get the
  background plane removed (``remove_plane=True``); the point-cloud layouts are already
  isolated parts (``remove_plane=False``). Voxel size 1.0 mm unless ``--voxel-size``.
* **score** every ``test`` sample with ``score_frame``; the anomaly map has the frame's layout
  (H×W for organized data, one score per point for clouds). Points of a cloud sample are the
  ones the loader returns (the label file's rows when there is one, see ``sensors.datasets``).
* **metrics** (``workers.metrics``): I-AUROC over the object scores; P-AUROC over **all** test
  pixels (organized: every pixel of the image, as MVTec 3D-AD's official evaluation, on the
  dense map of ``score_frame(dense=True)``: an unscored pixel of the part region, unmeasured or
  cut with the plane, takes the score of the nearest scored pixel, as the interpolated maps of
  the methods on that benchmark do; the table takes the map's floor) or all test points; AUPRO integrated to FPR 0.3
  and divided by 0.3 (MVTec 3D-AD). AUPRO regions: 8-connected components of the gt mask for
  organized data; for point clouds, a region is a connected component of the graph joining
  anomalous points at most 2.5 × the sample's median nearest-neighbour spacing apart
  (``workers.metrics.gt_regions``). Class means are plain means over classes, ignoring a class
  whose metric is undefined (NaN, written as ``null`` in JSON).
* **timings**: ``fit_seconds`` = preprocessing of the training frames + ``Scorer.fit`` (file
  reading excluded); ``score_seconds_per_sample`` = mean wall time of ``score_frame``
  (preprocess + features + search + map back; file reading excluded), one process. The
  report's ``details`` add the CPU time of both (``time.process_time``, all threads) and the
  mean per-stage times, and ``environment`` the load average, as wall times on a shared
  machine depend on what else runs.

Outputs under ``OUT``: ``report.json`` (schema in :func:`evaluate`), ``report.md`` (the
per-class table as the papers print it), ``roc_curves.png`` (per-class image-level ROC, and
pixel/point-level ROC), ``gallery.png`` (a few test samples per class: organized: z image and
anomaly map with the gt contour; point clouds: top-down orthographic views coloured by score
and by gt) and ``scores/<class>/<stem>.npz`` (MVTec 3D-AD: ``<defect>_<stem>.npz``, as stems
repeat across defect folders) holding ``object_score``, ``label`` and ``point_scores`` (N, aligned
to the loaded points) or ``map`` (H×W).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensors.datasets import LAYOUTS, Sample, list_classes, list_samples
from workers.preprocess import PreprocessParams

log = logging.getLogger("inspectd.eval")

__all__ = [
    "add_commands",
    "evaluate",
    "recompute_metrics",
    "preprocess_params",
    "score_file",
    "AUPRO_FPR_LIMIT",
    "REPORT_VERSION",
]

AUPRO_FPR_LIMIT = 0.3
REPORT_VERSION = 1
METRICS = ("i_auroc", "p_auroc", "aupro")
GALLERY_PER_CLASS = 4


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


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


def cmd_synth(args: argparse.Namespace) -> int:
    from sensors.synth import synthesize

    counts = {k: v for k, v in (("n_train", args.train), ("n_test_good", args.test_good),
                                 ("n_test_per_defect", args.test_per_defect)) if v is not None}
    t0 = time.perf_counter()
    info = synthesize(Path(args.out), args.layout, args.classes, args.seed, progress=not args.no_progress,
                      workers=args.workers, **counts)
    dt = time.perf_counter() - t0
    n = info.get("counts", {}).get("total", "?")
    print(f"wrote a {args.layout} dataset of {len(info['classes'])} classes ({n} samples) to {args.out} in {dt:.1f} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
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
    )
    print(_markdown_table(report))
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
    s.add_argument("--classes", type=int, default=4, help="number of part classes (the first N of the library)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, help="good training parts per class")
    s.add_argument("--test-good", type=int, help="good test parts per class")
    s.add_argument("--test-per-defect", type=int, help="defective test parts per defect kind and class")
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
    e.add_argument("--scorer-param", action="append", metavar="KEY=VALUE",
                   help="scorer hyper-parameter (repeatable; VALUE is JSON), e.g. coreset_ratio=0.2")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def preprocess_params(layout: str, voxel_size: float = 1.0) -> PreprocessParams:
    """The preprocessing for a layout: plane removal for camera scenes (mvtec3d) only."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not voxel_size > 0:
        raise ValueError(f"voxel size must be > 0 mm, got {voxel_size}")
    return PreprocessParams(remove_plane=layout == "mvtec3d", voxel_size=float(voxel_size))


def score_file(out: str | Path, sample: Sample) -> Path:
    """Where the scores of a test ``sample`` are saved: ``OUT/scores/<class>/<stem>.npz``
    (``<defect>_<stem>.npz`` for mvtec3d, whose stems repeat across defect folders)."""
    name = f"{sample.defect}_{sample.stem}.npz" if sample.layout == "mvtec3d" else f"{sample.stem}.npz"
    return Path(out) / "scores" / sample.cls / name


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _none_to_nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")


def compute_metrics(
    object_scores: Sequence[float],
    labels: Sequence[int],
    maps: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    points: Sequence[np.ndarray] | None,
) -> dict[str, float]:
    """I-AUROC, P-AUROC and AUPRO@0.3 of one class (``points`` for clouds, None for organized)."""
    from workers.metrics import aupro, auroc, p_auroc

    return {
        "i_auroc": auroc(np.asarray(object_scores, dtype=np.float64), np.asarray(labels)),
        "p_auroc": p_auroc(list(maps), list(gts)),
        "aupro": aupro(list(maps), list(gts), AUPRO_FPR_LIMIT, points=None if points is None else list(points)),
    }


@dataclass
class _Prepared:
    clouds: list  # list[PreparedCloud]
    seconds: float
    cpu_seconds: float


@dataclass
class _GalleryItem:
    cls: str
    name: str
    label: int
    object_score: float
    score: np.ndarray
    gt: np.ndarray
    points: np.ndarray  # organized: H×W depth (z); clouds: N×3


def _gallery_picks(samples: Sequence[Sample], k: int) -> list[int]:
    """Indices of up to ``k`` test samples to show: defective ones of distinct kinds first, one good."""
    picks: list[int] = []
    seen: set[str] = set()
    for i, s in enumerate(samples):
        if s.label and s.defect not in seen and len(picks) < max(k - 1, 1):
            picks.append(i)
            seen.add(s.defect)
    good = [i for i, s in enumerate(samples) if not s.label]
    if good and len(picks) < k:
        picks.append(good[0])
    for i in range(len(samples)):
        if len(picks) >= k:
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks)[:k]


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _environment(load_at_start: list[float] | None) -> dict[str, Any]:
    import open3d
    import scipy
    import torch

    return {
        "load_average_start": load_at_start,
        "load_average_end": _load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "open3d": open3d.__version__,
    }


def evaluate(
    dataset: str | Path,
    layout: str,
    scorer_name: str,
    classes: Sequence[str] | None = None,
    zero_shot: bool = False,
    out: str | Path = "out/eval",
    scorer_params: dict[str, Any] | None = None,
    progress: bool = True,
    voxel_size: float = 1.0,
    gallery_per_class: int = GALLERY_PER_CLASS,
    command: str | None = None,
) -> dict[str, Any]:
    """Fit, score and report one scorer on one dataset; see the module docstring for the protocol.

    Returns (and writes as ``OUT/report.json``)::

        {"dataset": str (absolute path), "layout": str, "scorer": str,
         "classes": {cls: {"i_auroc", "p_auroc", "aupro", "n_test", "fit_seconds",
                           "score_seconds_per_sample"}},
         "mean": {"i_auroc", "p_auroc", "aupro"},
         ...extra keys: "zero_shot", "voxel_size", "preprocess", "scorer_params", "details"
            (per class: fit_classes, n_train, n_good, n_defective, per-defect I-AUROC...),
            "metric_notes", "dataset_info" (the dataset's dataset.json if any), "environment",
            "command", "timestamp", "report_version"}

    Undefined metrics (one label present) are ``null``. Raises ``ValueError`` (a
    ``DatasetError`` for layout problems) on unknown classes, layouts or scorers.
    """
    from tqdm import tqdm

    from workers.frame_scoring import score_frame
    from workers.preprocess import prepare
    from workers.scorer import scorer_class

    dataset = Path(dataset).resolve()
    out = Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    all_classes = list_classes(dataset, layout)
    selected = list(classes) if classes else list(all_classes)
    unknown = [c for c in selected if c not in all_classes]
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(unknown)} in {dataset}; the dataset has {', '.join(all_classes)}")
    if zero_shot and len(all_classes) < 2:
        raise ValueError("--zero-shot needs a dataset with at least two classes (it fits on the other classes)")
    cls_type = scorer_class(scorer_name)
    params = dict(scorer_params or {})
    params.pop("voxel_size", None)
    pp = preprocess_params(layout, voxel_size)
    organized = layout == "mvtec3d"
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = _load_average()

    cache: dict[str, _Prepared] = {}

    def train_clouds(cls: str) -> _Prepared:
        if cls not in cache:
            samples = list_samples(dataset, layout, cls, "train")
            if not samples:
                raise ValueError(f"class {cls!r} of {dataset} has no training samples")
            clouds, secs, cpu = [], 0.0, 0.0
            for s in tqdm(samples, desc=f"prepare {cls} train", disable=not progress, leave=False):
                frame = s.load()
                t0, c0 = time.perf_counter(), time.process_time()
                clouds.append(prepare(frame, pp))
                secs += time.perf_counter() - t0
                cpu += time.process_time() - c0
            cache[cls] = _Prepared(clouds, secs, cpu)
        return cache[cls]

    per_class: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    roc_data: dict[str, dict[str, np.ndarray]] = {}
    gallery: list[_GalleryItem] = []
    ranges: dict[str, tuple[float, float]] = {}
    scorer_record: dict[str, Any] = {}

    for cls in tqdm(selected, desc="classes", disable=not progress):
        fit_classes = [c for c in all_classes if c != cls] if zero_shot else [cls]
        prepared = [train_clouds(c) for c in fit_classes]
        clouds = [c for p in prepared for c in p.clouds]
        scorer = cls_type(voxel_size=pp.voxel_size, **params)
        t0, c0 = time.perf_counter(), time.process_time()
        scorer.fit(clouds, progress=progress)
        fit_seconds = sum(p.seconds for p in prepared) + (time.perf_counter() - t0)
        fit_cpu = sum(p.cpu_seconds for p in prepared) + (time.process_time() - c0)
        scorer_record = scorer.params()
        if not zero_shot:
            cache.pop(cls, None)  # not needed again

        tests = list_samples(dataset, layout, cls, "test")
        if not tests:
            raise ValueError(f"class {cls!r} of {dataset} has no test samples")
        picks = set(_gallery_picks(tests, gallery_per_class))
        obj, labels, maps, gts, pts, secs, defects = [], [], [], [], [], [], []
        stages: dict[str, float] = {}
        cpu_secs: list[float] = []
        for i, s in enumerate(tqdm(tests, desc=f"score {cls}", disable=not progress, leave=False)):
            frame = s.load()
            t0, c0 = time.perf_counter(), time.process_time()
            fs = score_frame(scorer, frame, pp, dense=organized)
            secs.append(time.perf_counter() - t0)
            cpu_secs.append(time.process_time() - c0)
            for k, v in fs.timings.items():
                stages[k] = stages.get(k, 0.0) + float(v)
            amap = np.asarray(fs.anomaly_map, dtype=np.float32)
            gt = frame.gt_mask if frame.gt_mask is not None else np.zeros(amap.shape, np.uint8)
            path = score_file(out, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            key = "map" if organized else "point_scores"
            np.savez(path, object_score=np.float64(fs.object_score), label=np.int64(s.label), **{key: amap})
            obj.append(fs.object_score)
            labels.append(s.label)
            defects.append(s.defect)
            maps.append(amap)
            gts.append(gt)
            if not organized:
                pts.append(frame.points)
            if i in picks:
                view = frame.points[..., 2] if organized else frame.points
                gallery.append(_GalleryItem(cls, f"{s.defect}/{s.stem}", s.label, fs.object_score, amap, gt, view))
        m = compute_metrics(obj, labels, maps, gts, None if organized else pts)
        per_class[cls] = {
            "i_auroc": _nan_to_none(m["i_auroc"]),
            "p_auroc": _nan_to_none(m["p_auroc"]),
            "aupro": _nan_to_none(m["aupro"]),
            "n_test": len(tests),
            "fit_seconds": round(fit_seconds, 4),
            "score_seconds_per_sample": round(float(np.mean(secs)), 4),
        }
        from workers.metrics import auroc, roc_curve

        labels_a = np.asarray(labels)
        obj_a = np.asarray(obj, dtype=np.float64)
        good = labels_a == 0
        per_defect = {}
        for d in sorted(set(defects) - {"good"}):
            sel = good | (np.asarray(defects) == d)
            per_defect[d] = _nan_to_none(auroc(obj_a[sel], labels_a[sel]))
        details[cls] = {
            "fit_classes": fit_classes,
            "n_train": len(clouds),
            "n_good": int(good.sum()),
            "n_defective": int((~good).sum()),
            "i_auroc_per_defect": per_defect,
            "score_seconds_max": round(float(np.max(secs)), 4),
            "fit_cpu_seconds": round(fit_cpu, 4),
            "score_cpu_seconds_per_sample": round(float(np.mean(cpu_secs)), 4),
            "score_seconds_per_stage": {k: round(v / len(tests), 4) for k, v in stages.items()},
            "memory_bank_size": getattr(scorer, "memory_bank_size", None),
        }
        flat_s = np.concatenate([np.ravel(a) for a in maps])
        flat_g = np.concatenate([np.ravel(g) for g in gts])
        fpr_i, tpr_i, _ = roc_curve(obj_a, labels_a)
        fpr_p, tpr_p, _ = roc_curve(flat_s, flat_g)
        roc_data[cls] = {"image": np.stack([fpr_i, tpr_i]), "pixel": _thin_curve(fpr_p, tpr_p)}
        finite = flat_s[np.isfinite(flat_s)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(np.quantile(finite, 0.999)) if finite.size else 1.0
        ranges[cls] = (lo, hi if hi > lo else lo + 1.0)
        del maps, gts, pts, flat_s, flat_g

    report: dict[str, Any] = {
        "dataset": str(dataset),
        "layout": layout,
        "scorer": scorer_name,
        "classes": per_class,
        "mean": {k: _nan_to_none(_mean([_none_to_nan(v[k]) for v in per_class.values()])) for k in METRICS},
        "zero_shot": bool(zero_shot),
        "voxel_size": pp.voxel_size,
        "preprocess": asdict(pp),
        "scorer_params": scorer_record,
        "details": details,
        "metric_notes": _metric_notes(layout),
        "dataset_info": _dataset_info(dataset),
        "environment": _environment(load_at_start),
        "command": command,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "report_version": REPORT_VERSION,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    draw_roc_curves(roc_data, per_class, out / "roc_curves.png", title=f"{scorer_name} on {dataset.name} ({layout})")
    draw_gallery(gallery, ranges, organized, out / "gallery.png")
    log.info("eval report written to %s", out / "report.json")
    return report


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray, n: int = 2000) -> np.ndarray:
    """At most ~n points of a ROC curve for drawing (keeps the ends)."""
    if fpr.size <= n:
        return np.stack([fpr, tpr])
    idx = np.unique(np.r_[np.linspace(0, fpr.size - 1, n).astype(np.int64), fpr.size - 1])
    return np.stack([fpr[idx], tpr[idx]])


def _metric_notes(layout: str) -> dict[str, str]:
    region = (
        "8-connected components of each gt mask (MVTec 3D-AD)"
        if layout == "mvtec3d"
        else "connected components of the graph joining anomalous points at most 2.5 x the sample's "
        "median nearest-neighbour spacing apart"
    )
    return {
        "i_auroc": "AUROC of the object scores over the test split",
        "p_auroc": (
            "AUROC over all pixels of all test images (dense maps: an unscored pixel of the part region, "
            "the scored pixels with holes filled grown by 3 px, takes the score of the nearest scored "
            "pixel; the table takes the map's floor)"
            if layout == "mvtec3d" else "AUROC over all points of all test samples"
        ),
        "aupro": f"area under the PRO curve up to FPR {AUPRO_FPR_LIMIT}, divided by {AUPRO_FPR_LIMIT}; regions: {region}",
        "mean": "mean over classes (classes with an undefined metric are left out)",
        "fit_seconds": "preprocessing of the training frames + Scorer.fit (file reading excluded)",
        "score_seconds_per_sample": "mean wall time of score_frame per test sample (file reading excluded)",
    }


def _dataset_info(dataset: Path) -> dict[str, Any] | None:
    f = dataset / "dataset.json"
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
        return {k: v for k, v in info.items() if k != "samples"} if isinstance(info, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------
# recompute
# --------------------------------------------------------------------------------------------


def recompute_metrics(out: str | Path, dataset: str | Path | None = None) -> dict[str, Any]:
    """Recompute every metric of ``OUT/report.json`` from the saved ``OUT/scores`` files.

    Reads the per-sample ``.npz`` files and, from the dataset (``dataset`` or the report's
    ``dataset`` path), the ground truth and, for point clouds, the points (AUPRO regions).
    Returns ``{"classes": {cls: {"i_auroc", "p_auroc", "aupro"}}, "mean": {...}}`` (NaN where
    undefined). A missing score file, a label that disagrees with the dataset or a map whose
    shape does not match the sample raises ``ValueError``.
    """
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    root = Path(dataset) if dataset is not None else Path(report["dataset"])
    layout = report["layout"]
    organized = layout == "mvtec3d"
    result: dict[str, Any] = {"classes": {}}
    for cls in report["classes"]:
        obj, labels, maps, gts, pts = [], [], [], [], []
        for s in list_samples(root, layout, cls, "test"):
            path = score_file(out, s)
            if not path.is_file():
                raise ValueError(f"no saved scores for test sample {s.path} (expected {path})")
            with np.load(path) as z:
                score = z["map" if organized else "point_scores"]
                obj.append(float(z["object_score"]))
                label = int(z["label"])
            if label != s.label:
                raise ValueError(f"{path}: label {label} but the dataset says {s.label}")
            frame = s.load()
            if score.shape != frame.points.shape[:-1]:
                raise ValueError(f"{path}: scores of shape {score.shape} for a sample of {frame.points.shape[:-1]}")
            labels.append(label)
            maps.append(score)
            gts.append(frame.gt_mask)
            if not organized:
                pts.append(frame.points)
        result["classes"][cls] = compute_metrics(obj, labels, maps, gts, None if organized else pts)
    result["mean"] = {k: _mean([v[k] for v in result["classes"].values()]) for k in METRICS}
    return result


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, nd: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _markdown_table(report: dict[str, Any]) -> str:
    rows = [
        "| Class | I-AUROC | P-AUROC | AUPRO@0.3 | n_test | fit s | s / sample |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    cl = report["classes"]
    for cls, r in cl.items():
        rows.append(
            f"| {cls} | {_fmt(r['i_auroc'])} | {_fmt(r['p_auroc'])} | {_fmt(r['aupro'])} | {r['n_test']} | "
            f"{r['fit_seconds']:.1f} | {r['score_seconds_per_sample']:.2f} |"
        )
    mean = report["mean"]
    n = sum(r["n_test"] for r in cl.values())
    fit = float(np.mean([r["fit_seconds"] for r in cl.values()])) if cl else float("nan")
    sps = float(np.mean([r["score_seconds_per_sample"] for r in cl.values()])) if cl else float("nan")
    rows.append(
        f"| **Mean** | **{_fmt(mean['i_auroc'])}** | **{_fmt(mean['p_auroc'])}** | **{_fmt(mean['aupro'])}** | "
        f"{n} | {fit:.1f} | {sps:.2f} |"
    )
    return "\n".join(rows)


def _markdown(report: dict[str, Any]) -> str:
    info = report.get("dataset_info") or {}
    env = report["environment"]
    lines = [
        f"# {report['scorer']} on `{Path(report['dataset']).name}` ({report['layout']})",
        "",
    ]
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    proto = "zero-shot: fitted on the train splits of all other classes (3DzAL)" if report["zero_shot"] else (
        "fitted on each class's train split"
    )
    lines += [
        f"Dataset: `{report['dataset']}`"
        + (f" (synthetic, generator {info.get('generator')} v{info.get('generator_version')}, seed {info.get('seed')})"
           if info.get("generator") else ""),
        f"Protocol: {proto}; voxel size {report['voxel_size']} mm; plane removal "
        f"{'on' if report['preprocess']['remove_plane'] else 'off'}.",
        "",
        _markdown_table(report),
        "",
        "I-AUROC: image/object level. " + report["metric_notes"]["p_auroc"].replace("AUROC", "P-AUROC: AUROC", 1)
        + ". AUPRO@0.3: " + report["metric_notes"]["aupro"] + ".",
        f"Timings on {env['cpu_count']} CPU cores ({env['platform']}, torch {env['torch']} with "
        f"{env['torch_threads']} threads; 1/5/15-min load average {env['load_average_start']} at the start, "
        f"{env['load_average_end']} at the end): fit s = {report['metric_notes']['fit_seconds']}; "
        f"s / sample = {report['metric_notes']['score_seconds_per_sample']}.",
        "",
        "Time spent, wall clock and CPU (all threads of this process; less sensitive to other load on the "
        "machine), and the per-stage mean of a scored sample:",
        "",
        "| Class | fit s | fit CPU s | s / sample | CPU s / sample | stages (s / sample) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for cls, det in report["details"].items():
        row = report["classes"][cls]
        st = ", ".join(f"{k} {v:.3f}" for k, v in det.get("score_seconds_per_stage", {}).items()
                       if k not in ("score",))
        lines.append(f"| {cls} | {row['fit_seconds']:.2f} | {det.get('fit_cpu_seconds', float('nan')):.2f} | "
                     f"{row['score_seconds_per_sample']:.3f} | {det.get('score_cpu_seconds_per_sample', float('nan')):.3f} "
                     f"| {st} |")
    lines += [
        "",
        "Per-defect I-AUROC (good vs. one defect kind):",
        "",
    ]
    kinds = sorted({d for det in report["details"].values() for d in det["i_auroc_per_defect"]})
    if kinds:
        lines += ["| Class | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        for cls, det in report["details"].items():
            lines.append(f"| {cls} | " + " | ".join(_fmt(det["i_auroc_per_defect"].get(k)) for k in kinds) + " |")
    lines += [
        "",
        "![ROC curves](roc_curves.png)",
        "",
        "![Anomaly maps](gallery.png)",
        "",
        f"Per-sample scores: `scores/<class>/<stem>.npz`{' (`<defect>_<stem>.npz`)' if report['layout'] == 'mvtec3d' else ''}"
        "; `daemon.evaluation.recompute_metrics(OUT)` recomputes every number above from them.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# figures (PIL only)
# --------------------------------------------------------------------------------------------

_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
_CMAP = np.array(  # an inferno-like ramp: black → purple → red → yellow → white
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
     (250, 193, 39), (252, 255, 164)], dtype=np.float64
)


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values to RGB uint8 with an inferno-like ramp; NaN → dark grey."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    t = np.nan_to_num(t, nan=0.0)
    x = t * (len(_CMAP) - 1)
    rgb = np.stack([np.interp(x, np.arange(len(_CMAP)), _CMAP[:, k]) for k in range(3)], axis=-1)
    rgb[~np.isfinite(v)] = (48, 48, 48)
    return rgb.astype(np.uint8)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_roc_curves(data: dict[str, dict[str, np.ndarray]], per_class: dict[str, dict[str, Any]],
                    path: Path, title: str = "") -> None:
    """One PNG, two panels: per-class image-level ROC (I-AUROC in the legend) and pixel/point ROC."""
    from PIL import Image, ImageDraw

    size, margin, top = 420, 50, 40
    img = Image.new("RGB", (2 * (size + 2 * margin), size + 2 * margin + top + 18 * len(data)), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((margin, 8), title, fill="black", font=font)
    for p, (key, metric, name) in enumerate((("image", "i_auroc", "image-level ROC"),
                                             ("pixel", "p_auroc", "pixel / point-level ROC"))):
        x0, y0 = p * (size + 2 * margin) + margin, top + margin // 2
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        for k in range(1, 10):
            g = k * size / 10
            draw.line([x0 + g, y0, x0 + g, y0 + size], fill=(230, 230, 230))
            draw.line([x0, y0 + g, x0 + size, y0 + g], fill=(230, 230, 230))
        draw.line([x0, y0 + size, x0 + size, y0], fill=(180, 180, 180))
        for k in range(0, 11, 2):
            draw.text((x0 + k * size / 10 - 8, y0 + size + 4), f"{k / 10:.1f}", fill="black", font=font)
            draw.text((x0 - 30, y0 + size - k * size / 10 - 7), f"{k / 10:.1f}", fill="black", font=font)
        draw.text((x0 + size // 2 - 40, y0 + size + 20), "false positive rate", fill="black", font=font)
        draw.text((x0 + 4, y0 - 18), f"{name} (y: true positive rate)", fill="black", font=font)
        for c, (cls, curves) in enumerate(data.items()):
            fpr, tpr = curves[key]
            ok = np.isfinite(fpr) & np.isfinite(tpr)
            xy = np.stack([x0 + fpr[ok] * size, y0 + size - tpr[ok] * size], axis=1)
            colour = _PALETTE[c % len(_PALETTE)]
            if len(xy) >= 2:
                draw.line([tuple(q) for q in xy.tolist()], fill=colour, width=2)
            ly = y0 + size + 40 + 18 * c
            draw.line([x0, ly + 7, x0 + 24, ly + 7], fill=colour, width=3)
            draw.text((x0 + 30, ly), f"{cls}  AUROC {_fmt(per_class[cls][metric])}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _fit_panel(rgb: np.ndarray, size: int):
    from PIL import Image

    im = Image.fromarray(rgb)
    scale = size / max(im.width, im.height)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
    panel = Image.new("RGB", (size, size), (255, 255, 255))
    panel.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return panel


def _organized_panels(item: _GalleryItem, lo: float, hi: float, size: int):
    from scipy import ndimage

    depth = item.points.astype(np.float64)
    finite = np.isfinite(depth)
    grey = np.zeros(depth.shape + (3,), np.uint8)
    if finite.any():
        d0, d1 = np.quantile(depth[finite], [0.01, 0.99])
        t = np.clip((depth - d0) / (d1 - d0 if d1 > d0 else 1.0), 0, 1)
        shade = (35 + 200 * np.nan_to_num(t)).astype(np.uint8)  # high z = bright
        grey[...] = shade[..., None]
    grey[~finite] = (0, 0, 60)
    amap = colormap(item.score, lo, hi)
    gt = item.gt != 0
    edge = gt & ~ndimage.binary_erosion(gt, structure=np.ones((3, 3)))
    edge = ndimage.binary_dilation(edge, iterations=max(1, round(item.gt.shape[0] / size) - 1))
    amap[edge] = (0, 255, 0)
    grey[edge] = (0, 255, 0)
    return _fit_panel(grey, size), _fit_panel(amap, size)


def _topdown(points: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """Top-down orthographic view (x right, y up) with a z-buffer; 3×3 splats."""
    img = np.full((size, size, 3), 255, np.uint8)
    ok = np.isfinite(points).all(axis=1)
    p, c = points[ok].astype(np.float64), colours[ok]
    if len(p) == 0:
        return img
    lo, hi = p[:, :2].min(axis=0), p[:, :2].max(axis=0)
    scale = (size - 6) / max(float((hi - lo).max()), 1e-9)
    off = (size - (hi - lo) * scale) / 2
    ix = ((p[:, 0] - lo[0]) * scale + off[0]).astype(np.int64)
    iy = (size - 1 - ((p[:, 1] - lo[1]) * scale + off[1])).astype(np.int64)
    dx, dy = np.meshgrid([-1, 0, 1], [-1, 0, 1])
    ix = (ix[:, None] + dx.ravel()[None, :]).ravel()
    iy = (iy[:, None] + dy.ravel()[None, :]).ravel()
    z = np.repeat(p[:, 2], 9)
    col = np.repeat(c, 9, axis=0)
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    ix, iy, z, col = ix[inside], iy[inside], z[inside], col[inside]
    pix = iy * size + ix
    order = np.argsort(-z, kind="stable")  # highest first
    _, first = np.unique(pix[order], return_index=True)
    win = order[first]
    img.reshape(-1, 3)[pix[win]] = col[win]
    return img


def _cloud_panels(item: _GalleryItem, lo: float, hi: float, size: int):
    from PIL import Image

    score_rgb = colormap(item.score, lo, hi)
    gt_rgb = np.where((item.gt != 0)[:, None], np.array([[220, 30, 30]], np.uint8), np.array([[170, 170, 170]], np.uint8))
    return (Image.fromarray(_topdown(item.points, score_rgb, size)),
            Image.fromarray(_topdown(item.points, gt_rgb.astype(np.uint8), size)))


def draw_gallery(items: Sequence[_GalleryItem], ranges: dict[str, tuple[float, float]], organized: bool,
                 path: Path, size: int = 200) -> None:
    """A grid: one row per class, per sample two panels (organized: depth | anomaly map with the gt
    contour in green; clouds: top-down view coloured by score | by gt, anomalous in red)."""
    from PIL import Image, ImageDraw

    by_cls: dict[str, list[_GalleryItem]] = {}
    for it in items:
        by_cls.setdefault(it.cls, []).append(it)
    cols = max((len(v) for v in by_cls.values()), default=1)
    head, label_h, gap = 24, 34, 12
    cell_w = 2 * size + gap
    img = Image.new("RGB", (max(1, cols * cell_w), head + max(1, len(by_cls)) * (size + label_h)), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    legend = ("z image (high = bright) | anomaly map (gt contour green)" if organized
              else "top-down view coloured by score | by ground truth (red = anomalous)")
    draw.text((6, 5), legend + "; colour scale per class: min .. 99.9th percentile of its test scores",
              fill="black", font=font)
    for r, (cls, its) in enumerate(by_cls.items()):
        lo, hi = ranges.get(cls, (0.0, 1.0))
        for c, it in enumerate(its):
            x, y = c * cell_w, head + r * (size + label_h)
            a, b = (_organized_panels(it, lo, hi, size) if organized else _cloud_panels(it, lo, hi, size))
            img.paste(a, (x, y + label_h))
            img.paste(b, (x + size, y + label_h))
            draw.text((x + 4, y + 2), f"{cls}: {it.name}", fill="black", font=font)
            draw.text((x + 4, y + 17), f"label {it.label}, object score {it.object_score:.3g}", fill=(80, 80, 80),
                      font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
