"""The text of an ``inspectd eval`` report: ``report.md``, metric notes, environment.

Why separate: ``tools.evaluation.protocol`` runs the protocol; this module only formats what it
measured (and ``tools.evaluation.breakdown`` adds the per-kind / per-magnitude tables with their
bootstrap intervals).
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["breakdown_markdown", "dataset_info", "environment", "load_average", "markdown", "markdown_table",
           "metric_notes"]

AUPRO_FPR_LIMIT = 0.3


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(load_at_start: list[float] | None) -> dict[str, Any]:
    import open3d
    import scipy
    import torch

    return {
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "open3d": open3d.__version__,
    }



def metric_notes(layout: str) -> dict[str, str]:
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


def dataset_info(dataset: Path) -> dict[str, Any] | None:
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


def _fmt(x: float | None, nd: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The per-class table as the papers print it (organized data: plus the served map's AUPRO)."""
    served = "aupro_served" in report["mean"]
    rows = [
        "| Class | I-AUROC | P-AUROC | AUPRO@0.3 |" + (" AUPRO@0.3 served |" if served else "")
        + " n_test | fit s | s / sample |",
        "|---|---:|---:|---:|" + ("---:|" if served else "") + "---:|---:|---:|",
    ]
    cl = report["classes"]
    for cls, r in cl.items():
        rows.append(
            f"| {cls} | {_fmt(r['i_auroc'])} | {_fmt(r['p_auroc'])} | {_fmt(r['aupro'])} | "
            + (f"{_fmt(r.get('aupro_served'))} | " if served else "")
            + f"{r['n_test']} | {_fmt(r['fit_seconds'], 1)} | {_fmt(r['score_seconds_per_sample'], 2)} |"
        )
    mean = report["mean"]
    n = sum(r["n_test"] for r in cl.values())
    fit = _nanmean([r["fit_seconds"] for r in cl.values()])
    sps = _nanmean([r["score_seconds_per_sample"] for r in cl.values()])
    rows.append(
        f"| **Mean** | **{_fmt(mean['i_auroc'])}** | **{_fmt(mean['p_auroc'])}** | **{_fmt(mean['aupro'])}** | "
        + (f"**{_fmt(mean.get('aupro_served'))}** | " if served else "")
        + f"{n} | {_fmt(fit, 1)} | {_fmt(sps, 2)} |"
    )
    ci = report.get("ci95") or {}
    if ci:
        rows.append("| 95 % CI of the mean | " + " | ".join(
            f"{_fmt(ci[k][0])}–{_fmt(ci[k][1])}" if ci.get(k) else "" for k in ("i_auroc", "p_auroc"))
            + " | |" + (" |" if served else "") + " | | |")
    return "\n".join(rows)


def _nanmean(values: list[float | None]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def breakdown_markdown(report: dict[str, Any]) -> list[str]:
    """Per defect kind, per magnitude bin and per kind × bin I-AUROC tables, and the failed samples."""
    br = report.get("breakdown")
    if not br:
        return []
    lines = [
        f"I-AUROC of each group of defective test parts against the good ones: mean over classes, with a "
        f"bootstrap 95 % interval ({br['bootstrap']['replicates']} replicates, "
        f"{br['bootstrap']['method']}); n = defective parts in the group.",
        "",
        "| Group | I-AUROC | 95 % CI | n |",
        "|---|---:|---|---:|",
    ]

    def row(name: str, g: dict[str, Any]) -> str:
        lo, hi = g["ci95"]
        return f"| {name} | {_fmt(g['mean'])} | {_fmt(lo)}–{_fmt(hi)} | {g['n_defective']} |"

    lines.append(row("all defects", br["i_auroc"]))
    lines += [row(f"kind: {k}", g) for k, g in br["per_defect"].items()]
    lines += [row(f"magnitude: {m}", g) for m, g in br["per_magnitude"].items()]
    bins = list(br["per_magnitude"])
    if br.get("per_defect_magnitude") and bins:
        lines += ["", "I-AUROC per defect kind and magnitude bin (mean over classes):", "",
                  "| Kind | " + " | ".join(bins) + " |", "|---|" + "---:|" * len(bins)]
        for k, per in br["per_defect_magnitude"].items():
            lines.append(f"| {k} | " + " | ".join(_fmt(per.get(m)) for m in bins) + " |")
    fails = report.get("failures") or []
    lines += ["", f"Samples that could not be scored: {len(fails)} (each takes the worst score: below every "
              "scored part if defective, above every one if good; its map likewise per pixel)."]
    if fails:
        lines += ["", "| Class | Sample | Stage | Reason |", "|---|---|---|---|"]
        lines += [f"| {f['class']} | `{f['sample']}` | {f['stage']} | {f['reason']} |" for f in fails]
    lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    info = report.get("dataset_info") or {}
    env = report["environment"]
    lines = [
        f"# {report['scorer']} on `{Path(report['dataset']).name}` ({report['layout']})",
        "",
    ]
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    with_validation = report.get("enroll") == "train+validation"
    if report["zero_shot"]:
        proto = (f"zero-shot: fitted on the train splits{' and validation good parts' if with_validation else ''} "
                 "of all other classes (3DzAL)")
    else:
        proto = f"fitted on each class's train split{' and its validation good parts' if with_validation else ''}"
    lines += [
        f"Dataset: `{report['dataset']}`"
        + (f" (synthetic, generator {info.get('generator')} v{info.get('generator_version')}, seed {info.get('seed')})"
           if info.get("generator") else ""),
        f"Protocol: {proto}; coordinates stored in {report.get('units', 'mm')}, scored in mm; "
        f"voxel size {report['voxel_size']} mm; plane removal "
        f"{'on' if report['preprocess']['remove_plane'] else 'off'}.",
        "",
        markdown_table(report),
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
        lines.append(f"| {cls} | {_fmt(row['fit_seconds'], 2)} | {_fmt(det.get('fit_cpu_seconds'), 2)} | "
                     f"{_fmt(row['score_seconds_per_sample'])} | {_fmt(det.get('score_cpu_seconds_per_sample'))} "
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
    lines += ["", *breakdown_markdown(report)]
    lines += [
        "",
        "![ROC curves](roc_curves.png)",
        "",
        "![Anomaly maps](gallery.png)",
        "",
        f"Per-sample scores: `scores/<class>/<stem>.npz`{' (`<defect>_<stem>.npz`)' if report['layout'] == 'mvtec3d' else ''}"
        "; `tools.evaluation.protocol.recompute_metrics(OUT)` recomputes every number above from them.",
        "",
    ]
    return "\n".join(lines)
