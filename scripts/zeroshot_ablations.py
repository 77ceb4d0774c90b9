"""3DzAL zero-shot tables: the paper's per-pair protocol (Tables 1–2) and its ablations (Tables 3–4).

``inspectd eval --zero-shot`` fits on *all other* classes at once (leave-one-class-out). The
paper's protocol (3DzAL Sec. 4, "Experimental setting") is per pair: train on the normal data of
**one** class A, test on **another** class B, and use the **remaining** classes (neither A nor B)
as the task-irrelevant data for the pseudo anomalies ("leave-one-out"); with n classes that is
n·(n−1) experiments. This script runs that protocol:

* ``zeroshot``: ``ZeroShotScorer.fit_zero_shot(train=A's train split, auxiliary=the train splits
  of every class other than A and B)``; memory bank and normal patches from A only;
* ``patchcore-fpfh`` (the BTF baseline, as in the paper's tables): fitted on A's train split;

then scores every test sample of B through the production path
(``workers.score_frame.score_frame``) and computes the metrics with
``tools.evaluation.protocol.compute_metrics`` (I-AUROC, P-AUROC, AUPRO@0.3), exactly as ``inspectd eval``.

Ablations (Table 3 rows, cumulative as in the paper; Table 4 pseudo-anomaly kinds), one fitted
model per training configuration, test-time switches applied to the same fitted model:

====================  =========================  ===========================================
row                   trained configuration      at test time
====================  =========================  ===========================================
baseline              patchcore-fpfh             -
fpfh patches          no learning                784-patch FPFH map, upsampled + blurred
+ L_con               disentangle_weight = 0     distance score only (no classifier)
+ L_dis               full                       distance score only (no classifier)
+ classifier          full                       + classification score, no perturbation
+ IP (3DzAL)          full                       + input perturbation (Eq. 8, paper's sign)
IP, ODIN sign         full                       perturbation raising S_ŷ instead
adding only           pseudo_mix = adding        full scoring
removing only         pseudo_mix = removing      full scoring
λ_c = 5 (± IP)        full                       classification weight 5 instead of 1
classification only   full                       λ_d = 0 (± IP): the classifier's map alone
====================  =========================  ===========================================

Usage::

    python scripts/zeroshot_ablations.py --dataset /tmp/zs/mvtec --layout mvtec3d --out OUT \
        [--protocol pairs|loo] [--classes a b ...] [--rows all|paper|main|extra] [--scorer-param KEY=VALUE ...]

``--protocol loo`` runs the same rows under ``inspectd eval --zero-shot``'s protocol (fit on all
other classes) instead. Writes ``OUT/results.json`` (every metric of every row and pair) and
``OUT/tables.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensors.datasets import list_classes, list_samples  # noqa: E402
from sensors.frame import Frame  # noqa: E402
from tools.evaluation.protocol import compute_metrics, preprocess_params  # noqa: E402
from workers.base import Scorer  # noqa: E402
from workers.patchcore import PatchCoreFPFHScorer  # noqa: E402
from workers.preprocess import PreparedCloud, PreprocessParams, prepare  # noqa: E402
from workers.score_frame import score_frame  # noqa: E402
from workers.zeroshot import ZeroShotScorer  # noqa: E402

log = logging.getLogger("zeroshot_ablations")

TRAINED: dict[str, dict[str, Any]] = {
    "full": {},
    "no_dis": {"disentangle_weight": 0.0},
    "adding": {"pseudo_mix": "adding"},
    "removing": {"pseudo_mix": "removing"},
    "fpfh_patches": {"use_learned": False, "use_classifier": False},
}
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("baseline (patchcore-fpfh)", "patchcore", {}),
    ("fpfh patches (no learning)", "fpfh_patches", {}),
    ("+ L_con", "no_dis", {"use_classifier": False}),
    ("+ L_dis", "full", {"use_classifier": False}),
    ("+ classifier (no IP)", "full", {"use_perturbation": False}),
    ("+ IP = 3DzAL", "full", {}),
    ("3DzAL, IP with ODIN's sign", "full", {"perturbation_direction": "raise"}),
    ("adding-point only", "adding", {}),
    ("removing-point only", "removing", {}),
    ("3DzAL, λ_c = 5", "full", {"classifier_weight": 5.0}),
    ("3DzAL, λ_c = 5, no IP", "full", {"classifier_weight": 5.0, "use_perturbation": False}),
    ("classification map only (λ_d = 0)", "full", {"distance_weight": 0.0}),
    ("classification map only, no IP", "full", {"distance_weight": 0.0, "use_perturbation": False}),
]
EXTRA_ROWS = tuple(r[0] for r in ROWS[-4:])
"""Sensitivity rows (not in the paper's tables): the weight of the classification score."""
MAIN_ROWS = ("baseline (patchcore-fpfh)", "+ IP = 3DzAL")
TEST_SWITCHES = ("use_classifier", "use_perturbation", "perturbation_direction", "distance_weight",
                 "classifier_weight")


def _parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, VALUE parsed as JSON when it is JSON (as ``inspectd eval``)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _frames(dataset: Path, layout: str, cls: str, split: str) -> list[Frame]:
    return [s.load() for s in list_samples(dataset, layout, cls, split)]


def _labels(dataset: Path, layout: str, cls: str) -> list[int]:
    return [s.label for s in list_samples(dataset, layout, cls, "test")]


def _evaluate(scorer: Scorer, frames: Sequence[Frame], labels: Sequence[int], pp: PreprocessParams,
              organized: bool) -> dict[str, float]:
    obj, maps, gts, pts, secs = [], [], [], [], []
    for f in frames:
        t0 = time.perf_counter()
        fs = score_frame(scorer, f, pp, dense=f.organized)  # as inspectd eval
        secs.append(time.perf_counter() - t0)
        amap = np.asarray(fs.anomaly_map, dtype=np.float32)
        obj.append(fs.object_score)
        maps.append(amap)
        gts.append(f.gt_mask if f.gt_mask is not None else np.zeros(amap.shape, np.uint8))
        if not organized:
            pts.append(f.points)
    m = compute_metrics(obj, labels, maps, gts, None if organized else pts)
    m["score_seconds_per_sample"] = float(np.mean(secs))
    return {k: float(v) for k, v in m.items()}


def _set_switches(scorer: ZeroShotScorer, switches: dict[str, Any]) -> dict[str, Any]:
    old = {k: getattr(scorer, k) for k in TEST_SWITCHES}
    for k, v in switches.items():
        setattr(scorer, k, v)
    return old


def run(
    dataset: Path,
    layout: str,
    out: Path,
    protocol: str = "pairs",
    classes: Sequence[str] | None = None,
    rows: str = "all",
    params: dict[str, Any] | None = None,
    voxel_size: float = 1.0,
) -> dict[str, Any]:
    all_classes = list_classes(dataset, layout)
    selected = list(classes) if classes else all_classes
    pp = preprocess_params(layout, voxel_size)
    organized = layout == "mvtec3d"
    if rows == "all":
        wanted = list(ROWS)
    elif rows == "paper":
        wanted = [r for r in ROWS if r[0] not in EXTRA_ROWS]
    elif rows == "main":
        wanted = [r for r in ROWS if r[0] in MAIN_ROWS]
    elif rows == "extra":
        wanted = [r for r in ROWS if r[0] in EXTRA_ROWS or r[0] in MAIN_ROWS]
    else:
        raise ValueError(f"rows must be all, paper, main or extra, got {rows!r}")
    trained_needed = sorted({r[1] for r in wanted} - {"patchcore"})
    params = dict(params or {})

    t_start = time.perf_counter()
    train: dict[str, list[PreparedCloud]] = {}
    for c in all_classes:
        train[c] = [prepare(f, pp) for f in _frames(dataset, layout, c, "train")]
    tests = {c: (_frames(dataset, layout, c, "test"), _labels(dataset, layout, c)) for c in selected}

    if protocol == "pairs":
        experiments = [(a, b) for a in selected for b in selected if a != b]
    elif protocol == "loo":
        experiments = [(None, b) for b in selected]
    else:
        raise ValueError(f"protocol must be 'pairs' or 'loo', got {protocol!r}")

    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name, _, _ in wanted}
    fit_seconds: dict[str, list[float]] = {k: [] for k in ["patchcore", *trained_needed]}
    baseline_cache: dict[str | None, PatchCoreFPFHScorer] = {}
    for a, b in experiments:
        key = f"{a}->{b}" if a is not None else f"others->{b}"
        frames, labels = tests[b]
        others = [c for c in all_classes if c != b]
        fit_train = train[a] if a is not None else [x for c in others for x in train[c]]
        aux = [x for c in all_classes if c not in (a, b) for x in train[c]] if a is not None else None
        log.info("experiment %s: %d training clouds, %s auxiliary", key, len(fit_train),
                 len(aux) if aux is not None else "in-fit")
        if any(r[1] == "patchcore" for r in wanted):
            if a not in baseline_cache or a is None:
                t0 = time.perf_counter()
                bl = PatchCoreFPFHScorer(voxel_size=voxel_size)
                bl.fit(fit_train)
                fit_seconds["patchcore"].append(time.perf_counter() - t0)
                baseline_cache = {a: bl}
            m = _evaluate(baseline_cache[a], frames, labels, pp, organized)
            for name, conf, _ in wanted:
                if conf == "patchcore":
                    results[name][key] = m
        for conf in trained_needed:
            scorer = ZeroShotScorer(voxel_size=voxel_size, **{**params, **TRAINED[conf]})
            t0 = time.perf_counter()
            if aux is not None:
                scorer.fit_zero_shot(fit_train, aux)
            else:
                scorer.fit(fit_train)
            fit_seconds[conf].append(time.perf_counter() - t0)
            for name, c2, switches in wanted:
                if c2 != conf:
                    continue
                old = _set_switches(scorer, switches)
                results[name][key] = _evaluate(scorer, frames, labels, pp, organized)
                _set_switches(scorer, old)
                log.info("%s %s: AUPRO %.3f I-AUROC %.3f", key, name, results[name][key]["aupro"],
                         results[name][key]["i_auroc"])
    report = {
        "dataset": str(dataset),
        "layout": layout,
        "protocol": protocol,
        "classes": selected,
        "experiments": [f"{a}->{b}" if a is not None else f"others->{b}" for a, b in experiments],
        "zeroshot_params": ZeroShotScorer(voxel_size=voxel_size, **params).params(),
        "trained_configurations": TRAINED,
        "rows": [{"name": n, "trained": c, "test_switches": s} for n, c, s in wanted],
        "results": results,
        "fit_seconds_mean": {k: float(np.mean(v)) for k, v in fit_seconds.items() if v},
        "total_seconds": time.perf_counter() - t_start,
        "command": " ".join(["python", *sys.argv]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "tables.md").write_text(markdown(report))
    return report


def _fmt(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def pair_table(report: dict[str, Any], row: str, metric: str) -> str:
    """Train (rows) × test (columns) matrix of one result row, with the row means (Tables 1–2)."""
    classes = report["classes"]
    res = report["results"][row]
    lines = ["| train \\ test | " + " | ".join(classes) + " | mean |", "|---|" + "---:|" * (len(classes) + 1)]
    for a in classes:
        vals = [res.get(f"{a}->{b}", {}).get(metric) if a != b else None for b in classes]
        cells = ["–" if v is None else _fmt(v) for v in vals]
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {_fmt(_mean([v for v in vals if v is not None]))} |")
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """One line per row: mean AUPRO / I-AUROC / P-AUROC over all experiments (and per test class)."""
    classes = report["classes"]
    lines = [
        "| row | mean AUPRO | mean I-AUROC | mean P-AUROC | AUPRO per test class (" + ", ".join(classes) + ") |",
        "|---|---:|---:|---:|---|",
    ]
    for row in report["results"]:
        res = report["results"][row]
        per_test = []
        for b in classes:
            per_test.append(_fmt(_mean([m["aupro"] for k, m in res.items() if k.endswith(f"->{b}")])))
        lines.append(
            f"| {row} | {_fmt(_mean([m['aupro'] for m in res.values()]))} | "
            f"{_fmt(_mean([m['i_auroc'] for m in res.values()]))} | {_fmt(_mean([m['p_auroc'] for m in res.values()]))} | "
            + " / ".join(per_test) + " |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# 3DzAL zero-shot ({report['protocol']}) on `{report['dataset']}`", "", "```", report["command"], "```", ""]
    lines += ["## Summary (mean over all experiments, in %)", "", summary_table(report), ""]
    if report["protocol"] == "pairs":
        for row in report["results"]:
            if row in MAIN_ROWS:
                for metric, title in (("aupro", "AUPRO@0.3"), ("i_auroc", "I-AUROC")):
                    lines += [f"## {row}: {title} (%), train → test", "", pair_table(report, row, metric), ""]
    lines += [f"Fit seconds (mean per experiment): {json.dumps({k: round(v, 1) for k, v in report['fit_seconds_mean'].items()})}; "
              f"total {report['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--layout", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--protocol", default="pairs", choices=("pairs", "loo"))
    p.add_argument("--classes", nargs="+")
    p.add_argument("--rows", default="all", choices=("all", "paper", "main", "extra"),
                   help="paper: Tables 3-4 rows; main: baseline and 3DzAL; extra: + the λ_c sensitivity rows")
    p.add_argument("--voxel-size", type=float, default=1.0)
    p.add_argument("--scorer-param", action="append", metavar="KEY=VALUE", help="zeroshot parameter (JSON value)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args.dataset.resolve(), args.layout, args.out, args.protocol, args.classes, args.rows,
                 _parse_params(args.scorer_param), args.voxel_size)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
