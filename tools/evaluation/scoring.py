"""Scoring one class's test split for ``inspectd eval``: one sample at a time, surviving bad ones.

Why separate: ``tools.evaluation.protocol`` runs the protocol over classes; this module holds what is
done per sample (score it with the production path, keep both the dense and the served map of
an organized frame) and per class (give failed samples the worst score, per-class details, ROC
curves), so the protocol stays readable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.evaluation.breakdown import SampleResult
from tools.evaluation.plots import thin_curve
from workers.preprocess import PreprocessParams

__all__ = ["ClassRun", "class_curves", "class_details", "sample_magnitudes", "score_both", "worst_scores"]


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class ClassRun:
    """What scoring one class's test split produced."""

    obj: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    served: list[np.ndarray] = field(default_factory=list)
    gts: list[np.ndarray] = field(default_factory=list)
    pts: list[np.ndarray] = field(default_factory=list)
    secs: list[float] = field(default_factory=list)
    cpu_secs: list[float] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    results: list[SampleResult] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pixel_rows: list[int] = field(default_factory=list)
    """Index into ``obj`` of every sample that has a map (a sample that failed to load has none)."""


def score_both(scorer: Any, frame: Any, pp: PreprocessParams, organized: bool) -> tuple[Any, np.ndarray | None]:
    """``score_frame``'s result (dense map for organized frames) and, for organized frames, the map
    the daemon serves (``dense=False``), from one preprocessing and one scoring."""
    from workers.preprocess import prepare
    from workers.score_frame import FrameScore, map_back, preprocess_device

    t0 = time.perf_counter()
    cloud = prepare(frame, pp, preprocess_device(scorer))
    t1 = time.perf_counter()
    result = scorer.score(cloud)
    t2 = time.perf_counter()
    amap = map_back(cloud, result.point_scores, frame, dense=organized)
    t3 = time.perf_counter()
    served = map_back(cloud, result.point_scores, frame, dense=False) if organized else None
    timings = {"preprocess": t1 - t0, "score": t2 - t1, "map_back": t3 - t2, **result.timings}
    return FrameScore(float(result.object_score), amap, timings, len(cloud.points)), served


def worst_scores(run: ClassRun) -> None:
    """Give every failed sample the worst score for it: below every scored sample when it is
    defective, above every one when it is good; its map (when its frame loaded) likewise per pixel."""
    ok = [i for i, r in enumerate(run.results) if not r.failed]
    scored = np.asarray([run.obj[i] for i in ok], np.float64)
    lo, hi = (float(scored.min()) - 1.0, float(scored.max()) + 1.0) if scored.size else (0.0, 1.0)
    finite = [m[np.isfinite(m)] for k, m in enumerate(run.maps) if not run.results[run.pixel_rows[k]].failed]
    vals = np.concatenate(finite) if finite else np.zeros(0)
    mlo, mhi = (float(vals.min()) - 1.0, float(vals.max()) + 1.0) if vals.size else (0.0, 1.0)
    for i, r in enumerate(run.results):
        if r.failed:
            run.obj[i] = r.object_score = lo if r.label else hi
    for k, row in enumerate(run.pixel_rows):
        if run.results[row].failed:
            worst = np.where(run.gts[k] != 0, np.float32(mlo), np.float32(mhi)).astype(np.float32)
            run.maps[k] = worst
            if run.served:
                run.served[k] = worst


def sample_magnitudes(dataset: Path) -> dict[str, dict[str, Any]]:
    """Per-sample defect magnitude records of a synthetic dataset (``dataset.json``), by file."""
    f = dataset / "dataset.json"
    try:
        info = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    samples = info.get("samples") if isinstance(info, dict) else None
    return {s["file"]: s["magnitude"] for s in samples or [] if isinstance(s, dict) and s.get("magnitude")}


def class_details(run: ClassRun, fit_classes: list[str], n_train: int, fit_cpu: float, n_tests: int,
                   scorer: Any) -> dict[str, Any]:
    from workers.metrics import auroc

    labels_a = np.asarray(run.labels)
    obj_a = np.asarray(run.obj, dtype=np.float64)
    defects = np.asarray([r.defect for r in run.results])
    good = labels_a == 0
    per_defect = {}
    for d in sorted(set(defects.tolist()) - {"good"}):
        sel = good | (defects == d)
        per_defect[d] = _nan_to_none(auroc(obj_a[sel], labels_a[sel]))
    return {
        "fit_classes": fit_classes,
        "n_train": n_train,
        "n_good": int(good.sum()),
        "n_defective": int((~good).sum()),
        "n_failed": len(run.failures),
        "i_auroc_per_defect": per_defect,
        "score_seconds_max": round(float(np.max(run.secs)), 4) if run.secs else None,
        "fit_cpu_seconds": round(fit_cpu, 4),
        "score_cpu_seconds_per_sample": round(float(np.mean(run.cpu_secs)), 4) if run.cpu_secs else None,
        "score_seconds_per_stage": {k: round(v / max(len(run.secs), 1), 4) for k, v in run.stages.items()},
        "memory_bank_size": getattr(scorer, "memory_bank_size", None),
    }


def class_curves(run: ClassRun) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """The class's image and pixel ROC curves (thinned) and its map colour range."""
    from workers.metrics import roc_curve

    flat_s = np.concatenate([np.ravel(a) for a in run.maps]) if run.maps else np.zeros(0, np.float32)
    flat_g = np.concatenate([np.ravel(g) for g in run.gts]) if run.gts else np.zeros(0, np.uint8)
    fpr_i, tpr_i, _ = roc_curve(np.asarray(run.obj, np.float64), np.asarray(run.labels))
    fpr_p, tpr_p, _ = roc_curve(flat_s, flat_g)
    finite = flat_s[np.isfinite(flat_s)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(np.quantile(finite, 0.999)) if finite.size else 1.0
    return {"image": np.stack([fpr_i, tpr_i]), "pixel": thin_curve(fpr_p, tpr_p)}, (lo, hi if hi > lo else lo + 1.0)
