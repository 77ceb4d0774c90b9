"""``inspectd synth`` and ``inspectd eval``: benchmark data and the evaluation protocol.

Why: a scorer is only worth deploying if its numbers on the public 3D anomaly-detection
benchmarks (MVTec 3D-AD, Real3D-AD, Anomaly-ShapeNet) can be produced by one command and checked
by anyone. ``inspectd eval`` runs the exact production path (``workers.score_frame.score_frame``:
preprocess → scorer → map back) on a dataset in one of the published layouts
(``sensors.datasets``), writes the scores of every test sample, and the metrics of the field
(``workers.metrics``), so the report can be recomputed from what it saved
(:func:`recompute_metrics`). ``inspectd synth`` writes synthetic datasets in those layouts
(``tools.synth.writer``, the Anomaly-ShapeNet pipeline of IMRNet Sec. 3 over procedural parts).

Protocol (per class):

* **fit** on the class's ``train`` split and the good parts of its ``validation`` split, where
  the dataset has one (``--enroll train+validation``, the default: a line enrolls every good part
  it has, and more good parts measure the tolerance of a part better; docs/results/bench-preset.md,
  "Enrollment"); ``--enroll train`` fits on the ``train`` split alone, as the public benchmarks'
  tables do. MVTec 3D-AD's validation split holds good parts only; Real3D-AD and
  Anomaly-ShapeNet have none, so they are fitted on ``train`` either way. The defective parts of
  a validation split are never used. With ``--zero-shot`` the scorer is fitted on those splits
  of **all other classes of the dataset** (not only the other classes selected with
  ``--classes``) and never sees the class it is tested on: the cross-class protocol of 3DzAL.
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

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sensors.datasets import LAYOUTS, Sample, dataset_units, list_classes, list_samples
from sensors.frame import UNITS_MM
from tools.evaluation.breakdown import (
    BOOTSTRAP,
    PixelHistograms,
    SampleResult,
    breakdown,
    p_auroc_interval,
    pixel_histograms,
    severity_bin,
)
from tools.evaluation.plots import (
    GalleryItem,
    draw_gallery,
    draw_roc_curves,
    gallery_picks,
    require_matplotlib,
)
from tools.evaluation.report import (
    AUPRO_FPR_LIMIT,
    dataset_info,
    environment,
    load_average,
    markdown,
    metric_notes,
)
from tools.evaluation.scoring import (
    ClassRun,
    class_curves,
    class_details,
    sample_magnitudes,
    score_both,
    worst_scores,
)
from workers.preprocess import PreprocessParams

log = logging.getLogger("inspectd.eval")

__all__ = [
    "evaluate",
    "recompute_metrics",
    "preprocess_params",
    "score_file",
    "AUPRO_FPR_LIMIT",
    "REPORT_VERSION",
]


REPORT_VERSION = 1
METRICS = ("i_auroc", "p_auroc", "aupro")
GALLERY_PER_CLASS = 4


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


ENROLL = ("train+validation", "train")
"""What a class is fitted on: its train split and its validation split's good parts (where there is one), or
the train split alone."""


def validation_good(dataset: Path, layout: str, cls: str, units: str | None) -> list[Any]:
    """The good parts of ``cls``'s validation split; none when the dataset has no such split."""
    if not (dataset / cls / "validation").is_dir():
        return []
    return [s for s in list_samples(dataset, layout, cls, "validation", units=units) if s.label == 0]


@dataclass
class _Prepared:
    clouds: list  # list[PreparedCloud]
    seconds: float
    cpu_seconds: float


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
    units: str | None = None,
    bootstrap: int = BOOTSTRAP,
    enroll: str = "train+validation",
) -> dict[str, Any]:
    """Fit, score and report one scorer on one dataset; see the module docstring for the protocol.

    Returns (and writes as ``OUT/report.json``)::

        {"dataset": str (absolute path), "layout": str, "scorer": str,
         "classes": {cls: {"i_auroc", "p_auroc", "aupro", "n_test", "fit_seconds",
                           "score_seconds_per_sample"} (+ "aupro_served" for organized data)},
         "mean": {"i_auroc", "p_auroc", "aupro"} (+ "aupro_served"),
         "ci95": {"i_auroc": [lo, hi], "p_auroc": [lo, hi]},
         "breakdown": per defect kind / magnitude bin (``tools.evaluation.breakdown.breakdown``),
         "failures": [{"class", "sample", "defect", "label", "stage", "reason", "object_score"}],
         ...extra keys: "units", "zero_shot", "voxel_size", "preprocess", "scorer_params", "details"
            (per class: fit_classes, n_train, n_good, n_defective, per-defect I-AUROC...),
            "metric_notes", "dataset_info" (the dataset's dataset.json if any), "environment",
            "command", "timestamp", "report_version"}

    ``enroll``: ``train+validation`` fits on the train split and the good parts of the validation
    split where there is one; ``train`` on the train split only (recorded as the report's
    ``enroll``). Undefined metrics (one label present) are ``null``. ``units``: the units of the dataset's
    coordinates (default: ``sensors.datasets.dataset_units``). A test sample that cannot be
    loaded or scored is listed in ``failures`` and takes the worst score; eval goes on. Raises
    ``ValueError`` (a ``DatasetError`` for layout problems) on unknown classes, layouts or
    scorers, and when no training frame of a class can be prepared.
    """
    require_matplotlib()
    from tqdm import tqdm

    from workers.preprocess import prepare
    from workers.registry import scorer_class

    dataset = Path(dataset).resolve()
    out = Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    units = units or dataset_units(dataset, layout)
    if units not in UNITS_MM:
        raise ValueError(f"unknown units {units!r}; expected one of {', '.join(UNITS_MM)}")
    all_classes = list_classes(dataset, layout)
    selected = list(classes) if classes else list(all_classes)
    unknown = [c for c in selected if c not in all_classes]
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(unknown)} in {dataset}; the dataset has {', '.join(all_classes)}")
    if enroll not in ENROLL:
        raise ValueError(f"unknown enrollment {enroll!r}; expected one of {', '.join(ENROLL)}")
    if zero_shot and len(all_classes) < 2:
        raise ValueError("--zero-shot needs a dataset with at least two classes (it fits on the other classes)")
    cls_type = scorer_class(scorer_name)
    params = dict(scorer_params or {})
    params.pop("voxel_size", None)
    pp = replace(preprocess_params(layout, voxel_size), **cls_type.preprocess_overrides)
    organized = layout == "mvtec3d"
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = load_average()
    magnitudes = sample_magnitudes(dataset)

    cache: dict[str, _Prepared] = {}
    train_failures: list[dict[str, str]] = []

    def train_clouds(cls: str) -> _Prepared:
        if cls not in cache:
            samples = list_samples(dataset, layout, cls, "train", units=units)
            if not samples:
                raise ValueError(f"class {cls!r} of {dataset} has no training samples")
            if enroll == "train+validation":
                samples += validation_good(dataset, layout, cls, units)
            clouds, secs, cpu = [], 0.0, 0.0
            for s in tqdm(samples, desc=f"prepare {cls} train", disable=not progress, leave=False):
                try:
                    frame = s.load()
                    t0, c0 = time.perf_counter(), time.process_time()
                    clouds.append(prepare(frame, pp))
                except Exception as exc:  # a bad training file is left out, and said so
                    log.warning("eval: training sample %s left out: %s", s.path, exc)
                    train_failures.append({"class": cls, "sample": str(s.path.relative_to(dataset)), "reason": str(exc)})
                    continue
                secs += time.perf_counter() - t0
                cpu += time.process_time() - c0
            if not clouds:
                raise ValueError(f"class {cls!r} of {dataset}: no training sample could be prepared")
            cache[cls] = _Prepared(clouds, secs, cpu)
        return cache[cls]

    per_class: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    roc_data: dict[str, dict[str, np.ndarray]] = {}
    gallery: list[GalleryItem] = []
    ranges: dict[str, tuple[float, float]] = {}
    scorer_record: dict[str, Any] = {}
    all_results: list[SampleResult] = []
    failures: list[dict[str, Any]] = []
    hists: dict[str, PixelHistograms] = {}

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

        tests = list_samples(dataset, layout, cls, "test", units=units)
        if not tests:
            raise ValueError(f"class {cls!r} of {dataset} has no test samples")
        picks = set(gallery_picks(tests, gallery_per_class))
        run = ClassRun()
        for i, s in enumerate(tqdm(tests, desc=f"score {cls}", disable=not progress, leave=False)):
            rel = s.path.relative_to(dataset).as_posix()
            mag = magnitudes.get(rel) or {}
            result = SampleResult(cls, f"{s.defect}/{s.stem}", s.defect, s.label, float("nan"),
                                  severity_bin(mag.get("severity")))
            frame, stage = None, "load"
            try:
                frame = s.load()
                stage = "score"
                t0, c0 = time.perf_counter(), time.process_time()
                fs, served = score_both(scorer, frame, pp, organized)
                run.secs.append(time.perf_counter() - t0)
                run.cpu_secs.append(time.process_time() - c0)
            except Exception as exc:  # one bad sample must not end the run
                log.warning("eval: %s could not be %s: %s", s.path, "loaded" if stage == "load" else "scored", exc)
                result.failed = True
                run.failures.append({"class": cls, "sample": rel, "defect": s.defect, "label": s.label, "stage": stage,
                                     "reason": f"{type(exc).__name__}: {exc}", "row": i})
                fs = served = None
            if fs is not None:
                for k, v in fs.timings.items():
                    run.stages[k] = run.stages.get(k, 0.0) + float(v)
                result.object_score = fs.object_score
            run.obj.append(result.object_score)
            run.labels.append(s.label)
            run.results.append(result)
            if frame is None:
                continue
            gt = frame.gt_mask if frame.gt_mask is not None else np.zeros(frame.points.shape[:-1], np.uint8)
            run.pixel_rows.append(i)
            run.maps.append(np.asarray(fs.anomaly_map, np.float32) if fs is not None else np.zeros(gt.shape, np.float32))
            if organized:
                run.served.append(np.asarray(served, np.float32) if served is not None else run.maps[-1])
            run.gts.append(gt)
            if not organized:
                run.pts.append(frame.points)
            if i in picks and fs is not None:
                view = frame.points[..., 2] if organized else frame.points
                gallery.append(GalleryItem(cls, f"{s.defect}/{s.stem}", s.label, fs.object_score, run.maps[-1], gt, view))
        worst_scores(run)
        for k, row in enumerate(run.pixel_rows):
            s = tests[row]
            path = score_file(out, s)
            path.parent.mkdir(parents=True, exist_ok=True)
            extra = {"failed": np.bool_(True)} if run.results[row].failed else {}
            np.savez(path, object_score=np.float64(run.obj[row]), label=np.int64(s.label),
                     **{"map" if organized else "point_scores": run.maps[k]}, **extra)
        for row, r in enumerate(run.results):
            if r.failed and row not in run.pixel_rows:
                path = score_file(out, tests[row])
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, object_score=np.float64(run.obj[row]), label=np.int64(tests[row].label),
                         failed=np.bool_(True))
        for f in run.failures:
            f["object_score"] = run.obj[f.pop("row")]
        failures += run.failures
        all_results += run.results
        pix_labels = [run.labels[row] for row in run.pixel_rows]
        m = compute_metrics(run.obj, run.labels, run.maps, run.gts, None if organized else run.pts)
        hists[cls] = pixel_histograms(run.maps, run.gts, pix_labels)
        per_class[cls] = {
            "i_auroc": _nan_to_none(m["i_auroc"]),
            "p_auroc": _nan_to_none(m["p_auroc"]),
            "aupro": _nan_to_none(m["aupro"]),
            "n_test": len(tests),
            "fit_seconds": round(fit_seconds, 4),
            "score_seconds_per_sample": round(float(np.mean(run.secs)), 4) if run.secs else None,
        }
        if organized:
            from workers.metrics import aupro

            per_class[cls]["aupro_served"] = _nan_to_none(aupro(run.served, run.gts, AUPRO_FPR_LIMIT))
        details[cls] = class_details(run, fit_classes, len(clouds), fit_cpu, len(tests), scorer)
        roc_data[cls], ranges[cls] = class_curves(run)
        del run

    metrics = METRICS + (("aupro_served",) if organized else ())
    br = breakdown(all_results, b=bootstrap)
    report: dict[str, Any] = {
        "dataset": str(dataset),
        "layout": layout,
        "scorer": scorer_name,
        "classes": per_class,
        "mean": {k: _nan_to_none(_mean([_none_to_nan(v.get(k)) for v in per_class.values()])) for k in metrics},
        "ci95": {"i_auroc": br["i_auroc"]["ci95"], "p_auroc": p_auroc_interval(hists, b=bootstrap)},
        "breakdown": br,
        "failures": failures,
        "train_failures": train_failures,
        "units": units,
        "zero_shot": bool(zero_shot),
        "enroll": enroll,
        "voxel_size": pp.voxel_size,
        "preprocess": asdict(pp),
        "scorer_params": scorer_record,
        "details": details,
        "metric_notes": metric_notes(layout),
        "dataset_info": dataset_info(dataset),
        "environment": environment(load_at_start),
        "command": command,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "report_version": REPORT_VERSION,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    draw_roc_curves(roc_data, per_class, out / "roc_curves.png", title=f"{scorer_name} on {dataset.name} ({layout})")
    draw_gallery(gallery, ranges, organized, out / "gallery.png")
    log.info("eval report written to %s", out / "report.json")
    return report


# --------------------------------------------------------------------------------------------
# recompute
# --------------------------------------------------------------------------------------------


def recompute_metrics(out: str | Path, dataset: str | Path | None = None) -> dict[str, Any]:
    """Recompute every metric of ``OUT/report.json`` from the saved ``OUT/scores`` files.

    Reads the per-sample ``.npz`` files and, from the dataset (``dataset`` or the report's
    ``dataset`` path), the ground truth and, for point clouds, the points (AUPRO regions).
    Returns ``{"classes": {cls: {"i_auroc", "p_auroc", "aupro"}}, "mean": {...}}`` (NaN where
    undefined). A missing score file, a label that disagrees with the dataset or a map whose
    shape does not match the sample raises ``ValueError``. A sample the eval could not load
    (saved without a map) counts in the I-AUROC only, as in the report.
    """
    out = Path(out)
    report = json.loads((out / "report.json").read_text())
    root = Path(dataset) if dataset is not None else Path(report["dataset"])
    layout = report["layout"]
    organized = layout == "mvtec3d"
    result: dict[str, Any] = {"classes": {}}
    for cls in report["classes"]:
        obj, labels, maps, gts, pts = [], [], [], [], []
        for s in list_samples(root, layout, cls, "test", units=report.get("units")):
            path = score_file(out, s)
            if not path.is_file():
                raise ValueError(f"no saved scores for test sample {s.path} (expected {path})")
            key = "map" if organized else "point_scores"
            with np.load(path) as z:
                score = z[key] if key in z.files else None
                obj.append(float(z["object_score"]))
                label = int(z["label"])
            if label != s.label:
                raise ValueError(f"{path}: label {label} but the dataset says {s.label}")
            labels.append(label)
            if score is None:  # the eval could not load this sample: no map
                continue
            frame = s.load()
            if score.shape != frame.points.shape[:-1]:
                raise ValueError(f"{path}: scores of shape {score.shape} for a sample of {frame.points.shape[:-1]}")
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


