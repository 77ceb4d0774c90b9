"""How much a few operator-confirmed defects improve detection: the ``fused-defects`` head with
N = 0, 1, 3, 10 confirmed defects per kind, on kinds seen in the confirmations and kinds not seen.

Two steps, so that the expensive part (fitting, FPFH, registration) runs once and every head
setting and every N reuses it:

    python scripts/few_defects.py describe --dataset D --pool P --layout real3d --split test \\
        --seen bulge,crack,hole,bending --out CACHE
    python scripts/few_defects.py report --cache CACHE [--grid] [--head '{"weight": 1}'] --out RESULT.json

``describe``: per class of D, fits ``fused-defects`` on D's train split (good parts only), then
describes (``FusedDefectsScorer.describe``: fused scores + head descriptors) the confirmation pool
(P's ``test`` split, only the ``--seen`` kinds, the first ``--pool-per-kind`` of each kind in a
seeded random order, so N = 1 is a part of random magnitude and the sets are nested: 1 ⊂ 3 ⊂ 10)
and D's ``--split`` (the parts scored). Confirmations are the operator's marks: the ground-truth
region of each pool part. ``report``: for each N, the bank from the first N pool parts per seen
kind, every scored part's object score with the head (exactly what ``FusedDefectsScorer.score``
returns), I-AUROC per kind with bootstrap 95 % intervals (tools.evaluation.breakdown), and the
**gain** over N = 0 per kind and for the seen / unseen groups with a paired bootstrap interval
(the same resampled parts for both). ``--grid`` evaluates a grid of head parameters (base_power × weight × radius × min_base) instead
(for tuning on seed 1's validation split).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sensors.datasets import list_classes, list_samples
from tools.evaluation.breakdown import SampleResult, breakdown, severity_bin
from tools.evaluation.protocol import preprocess_params
from tools.evaluation.scoring import sample_magnitudes
from workers.components.memory_bank import MemoryBank
from workers.defect_head import (
    HeadParams,
    bank_distance,
    bank_entries,
    evidence_from_distance,
    neighbours,
    voxel_mask,
)
from workers.fused_defects import FusedDefectsScorer
from workers.preprocess import prepare

NS = (0, 1, 3, 10)
BOOT = 2000


def _describe_to(path: Path, scorer: FusedDefectsScorer, sample, pp, extra: dict) -> None:
    frame = sample.load()
    cloud = prepare(frame, pp)
    base, desc = scorer.describe(cloud)
    region = voxel_mask(cloud.source_flat, cloud.voxel_of_source, len(cloud.points), frame.gt_mask.reshape(-1) != 0)
    np.savez(path, points=cloud.points.astype(np.float32), desc=desc.astype(np.float32),
             base=base.point_scores.astype(np.float32), region=region, obj=np.float64(base.object_score),
             failed=np.bool_(base.registration_failed), label=np.int64(sample.label), **extra)


def cmd_describe(a: argparse.Namespace) -> None:
    out = Path(a.out)
    pp = preprocess_params(a.layout)
    seen = a.seen.split(",")
    mags = sample_magnitudes(Path(a.dataset))
    rng = np.random.default_rng(a.seed)
    classes = list_classes(a.dataset, a.layout)[: a.classes] if a.classes else list_classes(a.dataset, a.layout)
    meta = {"dataset": a.dataset, "pool": a.pool, "split": a.split, "seen": seen, "classes": classes, "fit_s": {}}
    for cls in classes:
        t0 = time.process_time()
        train = [s.load() for s in list_samples(a.dataset, a.layout, cls, "train")]
        scorer = FusedDefectsScorer(voxel_size=pp.voxel_size)
        scorer.fit([prepare(f, pp) for f in train])
        meta["fit_s"][cls] = round(time.process_time() - t0, 1)
        (out / cls / "pool").mkdir(parents=True, exist_ok=True)
        (out / cls / "eval").mkdir(parents=True, exist_ok=True)
        pool = list_samples(a.pool, a.layout, cls, "test")
        for kind in seen:
            of_kind = [s for s in pool if s.defect == kind]
            order = rng.permutation(len(of_kind))[: a.pool_per_kind]
            for rank, i in enumerate(order):
                _describe_to(out / cls / "pool" / f"{kind}_{rank:02d}.npz", scorer, of_kind[i], pp,
                             {"defect": kind, "rank": np.int64(rank)})
        for s in list_samples(a.dataset, a.layout, cls, a.split):
            rel = str(s.path.relative_to(Path(a.dataset)))
            sev = (mags.get(rel) or {}).get("severity")
            _describe_to(out / cls / "eval" / f"{s.stem}.npz", scorer, s, pp,
                         {"defect": s.defect, "bin": severity_bin(sev) or ""})
        print(f"{cls}: described in {time.process_time() - t0:.0f} s CPU", flush=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def _load(cache: Path) -> tuple[dict, dict]:
    meta = json.loads((cache / "meta.json").read_text())
    data = {}
    for cls in meta["classes"]:
        pool = [dict(np.load(p)) for p in sorted((cache / cls / "pool").glob("*.npz"))]
        ev = [(p.stem, dict(np.load(p))) for p in sorted((cache / cls / "eval").glob("*.npz"))]
        for _, e in ev:
            e["nbr"] = neighbours(e["points"], HeadParams().smoothing_k)
        data[cls] = (pool, ev)
    return meta, data


def bank_for(pool: list[dict], n: int, head: HeadParams, draw: int = 0) -> MemoryBank | None:
    """The defect bank of ``n`` confirmed defects per seen kind (None when empty): the first ``n`` of
    the pool's order for draw 0, a seeded random ``n`` of the pool for draw k > 0."""
    if draw:
        rng = np.random.default_rng(draw)
        size = 1 + max(int(p["rank"]) for p in pool)
        picked = {k: set(rng.choice(size, n, replace=False).tolist()) for k in sorted({str(p["defect"]) for p in pool})}
        chosen = [p for p in pool if int(p["rank"]) in picked[str(p["defect"])]]
    else:
        chosen = [p for p in pool if int(p["rank"]) < n]
    entries = [bank_entries(p["desc"], p["base"], p["region"], head) for p in chosen]
    bank = np.concatenate(entries) if entries else np.zeros((0, 34), np.float32)
    return MemoryBank(bank) if len(bank) else None


def distances(data: dict, n: int, head: HeadParams, draw: int = 0) -> dict[str, list[np.ndarray | None]]:
    """Per class, every scored part's bank distances (None: no bank or a failed registration)."""
    out = {}
    for cls, (pool, ev) in data.items():
        bank = bank_for(pool, n, head, draw)
        out[cls] = [None if bank is None or bool(e["failed"]) else bank_distance(e["desc"], bank) for _, e in ev]
    return out


def scores_for(data: dict, dist: dict, head: HeadParams) -> list[SampleResult]:
    """Every scored part's object score with the head (what ``FusedDefectsScorer.score`` returns)."""
    out = []
    for cls, (_, ev) in data.items():
        for (stem, e), d in zip(ev, dist[cls], strict=True):
            obj = float(e["obj"])
            if d is not None:
                obj += evidence_from_distance(d, e["base"], e["nbr"], head)[0]
            out.append(SampleResult(cls, stem, str(e["defect"]), int(e["label"]), obj, str(e.get("bin", "")) or None))
    return out


def paired_gain(base: list[SampleResult], new: list[SampleResult], select, seed: int = 0) -> dict:
    """Mean over classes of I-AUROC(new) − I-AUROC(base) for the defective parts ``select`` picks,
    with a paired bootstrap 95 % interval (good and defective parts resampled within each class)."""
    rng = np.random.default_rng(seed)
    diffs, reps = [], []
    for cls in sorted({r.cls for r in base}):
        rows = [(b, n) for b, n in zip(base, new, strict=True) if b.cls == cls]
        g = [(b.object_score, n.object_score) for b, n in rows if b.label == 0]
        d = [(b.object_score, n.object_score) for b, n in rows if b.label == 1 and select(b)]
        if not g or not d:
            continue
        ga, da = np.array(g), np.array(d)
        cs = [(da[None, :, j] > ga[:, None, j]) + 0.5 * (da[None, :, j] == ga[:, None, j]) for j in (0, 1)]
        c = cs[1].astype(np.float64) - cs[0].astype(np.float64)
        wg = rng.multinomial(len(g), np.full(len(g), 1 / len(g)), size=BOOT).astype(np.float64)
        wd = rng.multinomial(len(d), np.full(len(d), 1 / len(d)), size=BOOT).astype(np.float64)
        diffs.append(float(c.mean()))
        reps.append(np.einsum("bi,ij,bj->b", wg, c, wd) / (len(g) * len(d)))
    if not diffs:
        return {"gain": None, "ci95": [None, None]}
    r = np.mean(reps, axis=0)
    lo, hi = np.quantile(r, [0.025, 0.975])
    return {"gain": round(float(np.mean(diffs)), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "within_noise": bool(lo <= 0 <= hi)}


def _draws(data: dict, base: list[SampleResult], n: int, head: HeadParams, draws: int, groups: dict) -> dict:
    """Per group, the gain of each of ``draws`` draws of ``n`` confirmed defects per seen kind."""
    out: dict[str, list] = {name: [] for name in groups}
    for k in range(draws):
        new = scores_for(data, distances(data, n, head, k), head)
        for name, sel in groups.items():
            out[name].append(paired_gain(base, new, sel)["gain"])
    return out


def evaluate(meta: dict, data: dict, head: HeadParams, ns=NS, draws: int = 5) -> dict:
    """Per N: I-AUROC per kind, the paired gain per kind and group, and (N = 1, 3) the seen / unseen
    gains of ``draws`` different draws of the confirmed defects (draw 0 is the one reported)."""
    seen = set(meta["seen"])
    base = scores_for(data, distances(data, 0, head), head)
    kinds = sorted({r.defect for r in base if r.label == 1})
    res = {"head": asdict(head), "seen": sorted(seen), "unseen": [k for k in kinds if k not in seen], "by_n": {}}
    for n in ns:
        new = base if n == 0 else scores_for(data, distances(data, n, head), head)
        bd = breakdown(new)
        groups = {"all": lambda r: True, "seen": lambda r: r.defect in seen, "unseen": lambda r: r.defect not in seen}
        groups.update({k: (lambda r, k=k: r.defect == k) for k in kinds})
        res["by_n"][n] = {
            "i_auroc": bd["i_auroc"], "per_defect": bd["per_defect"],
            "gain": {name: paired_gain(base, new, sel) for name, sel in groups.items()} if n else {},
            "draws": _draws(data, base, n, head, draws, dict(list(groups.items())[1:3])) if 0 < n < 10 else {},
            "group_i_auroc": {name: breakdown([r for r in new if r.label == 0 or sel(r)])["i_auroc"]
                              for name, sel in list(groups.items())[:3]},
        }
    return res


def _ci(v: dict) -> str:
    lo, hi = v["ci95"]
    return "n/a" if lo is None else f"{lo:.3f}–{hi:.3f}"


def markdown(res: dict) -> str:
    """The per-kind tables of ``evaluate``'s result: I-AUROC at N = 0 and the gain at each N."""
    ns = [n for n in res["by_n"] if int(n)]
    zero = res["by_n"]["0"] if "0" in res["by_n"] else res["by_n"][0]
    head = "| group | I-AUROC, N = 0 (95 % CI) | " + " | ".join(f"gain, N = {n} (95 % CI)" for n in ns) + " |"
    lines = [head, "|---|---|" + "---|" * len(ns)]
    rows = [("all defects", "all"), ("seen kinds", "seen"), ("unseen kinds", "unseen")]
    rows += [(f"{k} (seen)", k) for k in res["seen"]] + [(f"{k} (unseen)", k) for k in res["unseen"]]
    for label, key in rows:
        base = zero["per_defect"].get(key)
        if key in ("all", "seen", "unseen"):
            base = zero["group_i_auroc"][key]
        cell0 = f"{base['mean']:.3f} ({_ci(base)})"
        cells = []
        for n in ns:
            g = res["by_n"][n]["gain"][key]
            mark = "" if not g.get("within_noise") else " ≈"
            cells.append(f"{g['gain']:+.3f} ({_ci(g)}){mark}")
        lines.append(f"| {label} | {cell0} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cmd_report(a: argparse.Namespace) -> None:
    meta, data = _load(Path(a.cache))
    head = HeadParams(**json.loads(a.head or "{}"))
    if a.grid:
        rows = []
        seen = set(meta["seen"])
        groups = (("seen", lambda x: x.defect in seen), ("unseen", lambda x: x.defect not in seen))
        base = scores_for(data, distances(data, 0, head), head)
        for mb in (0.5, 1.0, 1.5):
            dists = {n: distances(data, n, replace(head, min_base=mb)) for n in NS[1:]}
            for gamma, w, r in itertools.product((0.0, 1.0), (2.0, 4.0, 8.0), (0.25, 0.5, 1.0)):
                h = replace(head, weight=w, radius=r, min_base=mb, base_power=gamma)
                row = {"base_power": gamma, "weight": w, "radius": r, "min_base": mb}
                for n in NS[1:]:
                    new = scores_for(data, dists[n], h)
                    for name, sel in groups:
                        row[f"{name}_{n}"] = paired_gain(base, new, sel)["gain"]
                row["score"] = round(float(np.mean([row[f"{g}_{n}"] for g, _ in groups for n in NS[1:]])), 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
        result = {"meta": meta, "grid": sorted(rows, key=lambda x: -x["score"])}
    else:
        result = {"meta": meta, **evaluate(meta, data, head)}
    Path(a.out).write_text(json.dumps(result, indent=2))
    if not a.grid:
        Path(a.out).with_suffix(".md").write_text(markdown(json.loads(json.dumps(result))))
    print(f"wrote {a.out}")


def cmd_calibration(a: argparse.Namespace) -> None:
    """The cost rule of ``daemon.defect_calibration`` on the base model (N = 0): per class, half the
    good scored parts calibrate (with the pool's confirmed defects), the other half and the scored
    defective parts measure the FRR and escape rate it actually gets."""
    from daemon.decision import clopper_pearson
    from daemon.defect_calibration import EscapeCost, calibrate_with_defects

    meta, data = _load(Path(a.cache))
    rows = []
    for cls, (pool, ev) in data.items():
        good = [float(e["obj"]) for _, e in ev if int(e["label"]) == 0]
        cal, held = good[0::2], good[1::2]
        confirmed = [float(p["obj"]) for p in pool]
        for r_cost in a.escape_costs:
            rec = calibrate_with_defects(cal, confirmed, a.target_frr, cost=EscapeCost(r_cost, a.defect_rate))
            t = rec["threshold"]
            fr = sum(x > t for x in held)
            row = {"class": cls, "escape_cost": r_cost, "threshold": round(t, 4),
                   "frr_only_threshold": round(rec["defects"]["frr_only_threshold"], 4),
                   "expected_frr": round(rec["expected_frr"], 4), "expected_frr_ci95": [round(x, 4) for x in rec["expected_frr_ci95"]],
                   "confirmed_escape_rate": round(rec["defects"]["escape_rate"], 3),
                   "confirmed_escape_rate_ci95": [round(x, 3) for x in rec["defects"]["escape_rate_ci95"]],
                   "held_out_frr": f"{fr}/{len(held)}", "held_out_frr_ci95": [round(x, 3) for x in clopper_pearson(fr, len(held))]}
            for name, sel in (("seen", lambda d: d in meta["seen"]), ("unseen", lambda d: d not in meta["seen"])):
                d = [float(e["obj"]) for _, e in ev if int(e["label"]) == 1 and sel(str(e["defect"]))]
                k = sum(x < t for x in d)
                row[f"test_escape_{name}"] = f"{k}/{len(d)}"
                row[f"test_escape_{name}_ci95"] = [round(x, 3) for x in clopper_pearson(k, len(d))]
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "target_frr": a.target_frr, "defect_rate": a.defect_rate,
                                       "rows": rows}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe")
    d.add_argument("--dataset", required=True)
    d.add_argument("--pool", required=True, help="dataset whose test split holds the confirmation pool")
    d.add_argument("--layout", default="real3d")
    d.add_argument("--split", default="test")
    d.add_argument("--seen", default="bulge,crack,hole,bending")
    d.add_argument("--pool-per-kind", type=int, default=max(NS))
    d.add_argument("--classes", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_describe)
    r = sub.add_parser("report")
    r.add_argument("--cache", required=True)
    r.add_argument("--head", help="HeadParams overrides as JSON")
    r.add_argument("--grid", action="store_true", help="evaluate the tuning grid (weight × radius × min_base)")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_report)
    c = sub.add_parser("calibration", help="the cost rule on the base model: FRR and escapes, calibrated and held out")
    c.add_argument("--cache", required=True)
    c.add_argument("--target-frr", type=float, default=0.05)
    c.add_argument("--defect-rate", type=float, default=0.01)
    c.add_argument("--escape-costs", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_calibration)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
