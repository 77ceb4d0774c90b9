"""Paired bootstrap of the mean I-AUROC difference between two `inspectd eval` runs on the same
dataset (per-sample object scores from each run's ``scores/<class>/*.npz``).

    python scripts/paired_iauroc_ci.py EVAL_A EVAL_B [--rounds 2000] [--seed 0]

Resamples the test parts of each class with replacement (the same draw for both runs), and
prints the mean I-AUROC of each run, their difference and its 95 % interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half); NaN when a class of labels is missing."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def load(run: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    out = {}
    for cls in sorted(p.name for p in (run / "scores").iterdir()):
        files = sorted((run / "scores" / cls).glob("*.npz"))
        s = np.array([float(np.load(f)["object_score"]) for f in files])
        y = np.array([int(np.load(f)["label"]) for f in files])
        out[cls] = ([f.name for f in files], s, y)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = load(Path(args.a)), load(Path(args.b))
    rng = np.random.default_rng(args.seed)
    point = [np.mean([auroc(r[c][1], r[c][2]) for c in a]) for r in (a, b)]
    diffs = []
    for _ in range(args.rounds):
        ma, mb = [], []
        for c in a:
            names, sa, y = a[c]
            assert names == b[c][0], f"{c}: the runs scored different samples"
            idx = rng.integers(0, len(y), len(y))
            ma.append(auroc(sa[idx], y[idx]))
            mb.append(auroc(b[c][1][idx], y[idx]))
        diffs.append(np.nanmean(mb) - np.nanmean(ma))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    print(f"mean I-AUROC A {point[0]:.3f}  B {point[1]:.3f}  B - A {point[1] - point[0]:+.3f}  "
          f"95 % CI [{lo:+.3f}, {hi:+.3f}] ({args.rounds} paired bootstrap rounds)")


if __name__ == "__main__":
    main()
