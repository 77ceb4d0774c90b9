#!/usr/bin/env python
"""IMRNet ablations (Li et al., CVPR 2024, Sec. 5.5) and the 30K-point timing, via ``inspectd eval``.

Every run is ``tools.evaluation.protocol.evaluate`` (the code behind ``inspectd eval``) with one scorer
parameter changed from the ``imrnet`` defaults, i.e. the same as::

    inspectd eval --dataset D --layout L --scorer imrnet --out OUT/<name> --scorer-param KEY=VALUE

Ablations (each refits the scorer, as the paper retrains per setting; fine-tuning uses the
ablated sampler / mask ratio too, the pretrained weights stay those shipped):

* ``sampler``: GPS (default) vs FPS vs random centre sampling (Table 4);
* ``iterations``: I = 1, 2, 3 reconstruction rounds at test time (Algorithm 1);
* ``mask_ratio``: 0.2, 0.4 (default), 0.6 (Fig. 5).

``--timing`` writes a one-class synthetic dataset whose test parts have 30 000 points
(``tools.synth.writer`` with its point count raised; single process so the override applies) and
evaluates it with ``--voxel-size 0.05`` (eval needs a positive voxel; at 0.05 mm practically no
two points share a voxel, so the scorer sees ~30 000 points; the count is reported):
``score_seconds_per_sample`` of that report is the time to score one 30K-point part.

Usage::

    python scripts/imrnet_ablations.py --dataset /tmp/imr/anomaly-shapenet --layout anomaly-shapenet \\
        --out out/imrnet-ablations [--ablation sampler iterations mask_ratio] [--classes a b] [--reuse]
    python scripts/imrnet_ablations.py --timing --out out/imrnet-timing

Writes ``OUT/ablations.json`` and ``OUT/ablations.md`` (mean I-AUROC / P-AUROC / AUPRO per setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "sampler": [("gps", {"sampler": "gps"}), ("fps", {"sampler": "fps"}), ("random", {"sampler": "random"})],
    "iterations": [("I=1", {"iterations": 1}), ("I=2", {"iterations": 2}), ("I=3", {"iterations": 3})],
    "mask_ratio": [("m=0.2", {"mask_ratio": 0.2}), ("m=0.4", {"mask_ratio": 0.4}), ("m=0.6", {"mask_ratio": 0.6})],
}
TIMING_VOXEL = 0.05
DEFAULT_RUN = {"sampler": "gps", "iterations": 3, "mask_ratio": 0.4}
"""The scorer defaults: runs equal to them are evaluated once and shared across ablations."""


def _key(params: dict[str, Any]) -> str:
    full = {**DEFAULT_RUN, **params}
    return "default" if full == DEFAULT_RUN else "_".join(f"{k}-{v}" for k, v in sorted(params.items()))


def run_ablations(dataset: str, layout: str, out: Path, which: list[str], classes: list[str] | None,
                  extra: dict[str, Any], reuse: bool = False) -> dict[str, Any]:
    """Evaluate every setting of ``which``; with ``reuse``, a run whose ``OUT/<run>/report.json``
    exists is read back instead of evaluated again (to resume an interrupted set)."""
    from tools.evaluation.protocol import evaluate

    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    table: dict[str, list[dict[str, Any]]] = {}
    for name in which:
        for label, params in ABLATIONS[name]:
            key = _key(params)
            done = out / key / "report.json"
            if key not in runs and reuse and done.exists():
                report = json.loads(done.read_text())
                runs[key] = {"mean": report["mean"], "classes": {c: v["i_auroc"] for c, v in report["classes"].items()},
                             "seconds": None, "command": report["command"], "reused": True}
            if key not in runs:
                t0 = time.perf_counter()
                report = evaluate(dataset, layout, "imrnet", classes=classes, out=out / key,
                                  scorer_params={**extra, **params}, progress=False,
                                  command=f"inspectd eval --dataset {dataset} --layout {layout} --scorer imrnet "
                                          f"--out {out / key} "
                                          + " ".join(f"--scorer-param {k}={json.dumps(v)}"
                                                     for k, v in {**extra, **params}.items()))
                runs[key] = {"mean": report["mean"], "classes": {c: v["i_auroc"] for c, v in report["classes"].items()},
                             "seconds": round(time.perf_counter() - t0, 1), "command": report["command"]}
                print(f"{name} {label}: {runs[key]['mean']}", flush=True)
            table.setdefault(name, []).append({"setting": label, "run": key, **runs[key]["mean"]})
    result = {"dataset": str(dataset), "layout": layout, "classes": classes, "extra_params": extra,
              "ablations": table, "runs": runs}
    (out / "ablations.json").write_text(json.dumps(result, indent=2))
    lines = [f"# IMRNet ablations on {dataset} ({layout})", ""]
    for name, rows in table.items():
        lines += [f"## {name}", "", "| setting | I-AUROC | P-AUROC | AUPRO@0.3 |", "|---|---:|---:|---:|"]
        for r in rows:
            f = [("—" if r[k] is None else f"{r[k]:.3f}") for k in ("i_auroc", "p_auroc", "aupro")]
            lines.append(f"| {r['setting']} | {f[0]} | {f[1]} | {f[2]} |")
        lines.append("")
    (out / "ablations.md").write_text("\n".join(lines))
    return result


def run_timing(out: Path, n_points: int, scorer: str, extra: dict[str, Any]) -> dict[str, Any]:
    import tools.synth.writer as synth
    from tools.evaluation.protocol import evaluate

    data = out / f"dense{n_points // 1000}k"
    if not (data / "dataset.json").exists() or "incomplete" in (data / "dataset.json").read_text():
        spec = synth.POINTS["anomaly-shapenet"]
        synth.POINTS["anomaly-shapenet"] = {"train": {**spec["train"], "n": n_points},
                                            "test": {**spec["test"], "n": n_points}}
        synth.synthesize(data, "anomaly-shapenet", 1, 0, n_test_good=2, n_test_per_defect=1, progress=False,
                         workers=1, kinds=["bulge", "hole"])
    report = evaluate(data, "anomaly-shapenet", scorer, out=out / f"eval-{scorer}", scorer_params=extra,
                      progress=False, voxel_size=TIMING_VOXEL,
                      command=f"inspectd eval --dataset {data} --layout anomaly-shapenet --scorer {scorer} "
                              f"--voxel-size {TIMING_VOXEL} --out {out / f'eval-{scorer}'}")
    from sensors.datasets import list_samples
    from tools.evaluation.protocol import preprocess_params
    from workers.preprocess import prepare

    cls_name = next(iter(report["classes"]))
    tests = list_samples(data, "anomaly-shapenet", cls_name, "test")
    scored = [len(prepare(s.load(), preprocess_params("anomaly-shapenet", TIMING_VOXEL)).points) for s in tests]
    cls = next(iter(report["classes"].values()))
    res = {"scorer": scorer, "n_points": n_points, "scored_points_mean": float(sum(scored) / len(scored)),
           "score_seconds_per_sample": cls["score_seconds_per_sample"],
           "score_seconds_max": next(iter(report["details"].values()))["score_seconds_max"],
           "fit_seconds": cls["fit_seconds"], "environment": report["environment"]}
    (out / f"timing-{scorer}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset")
    p.add_argument("--layout", default="anomaly-shapenet")
    p.add_argument("--out", required=True)
    p.add_argument("--ablation", nargs="+", choices=sorted(ABLATIONS), default=sorted(ABLATIONS))
    p.add_argument("--classes", nargs="+")
    p.add_argument("--scorer-param", action="append", metavar="KEY=VALUE", default=[],
                   help="extra imrnet parameter for every run (VALUE is JSON)")
    p.add_argument("--reuse", action="store_true", help="read back runs whose report.json already exists")
    p.add_argument("--timing", action="store_true", help="time one 30K-point part instead")
    p.add_argument("--timing-points", type=int, default=30000)
    p.add_argument("--timing-scorers", nargs="+", default=["imrnet", "patchcore-fpfh"])
    args = p.parse_args(argv)
    extra: dict[str, Any] = {}
    for item in args.scorer_param:
        k, _, v = item.partition("=")
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    out = Path(args.out)
    if args.timing:
        for scorer in args.timing_scorers:
            run_timing(out, args.timing_points, scorer, extra if scorer == "imrnet" else {})
        return 0
    if not args.dataset:
        p.error("--dataset is required for ablations")
    run_ablations(args.dataset, args.layout, out, args.ablation, args.classes, extra, args.reuse)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
