"""Would a second scorer add to a first? Late fusion of two `inspectd eval` runs' object scores.

    python scripts/late_fusion_study.py EVAL_A EVAL_B [--weights 0,0.1,0.25,0.5,1]

For every class both runs scored, each run's object scores are normalized by that class's good
test parts (median → 0, 95th percentile → 1), and ``A + w · B`` is ranked for each weight ``w``.
The normalization sees the test parts' labels: an oracle, so the figure is the most that a
fixed-weight fusion of the two could add. Run it on the seed the defaults are chosen on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.metrics import auroc  # noqa: E402


def normalized(x: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``x`` with its good parts' median at 0 and their 95th percentile at 1."""
    m, q = np.median(x[good]), np.percentile(x[good], 95)
    return (x - m) / max(q - m, 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--weights", default="0,0.1,0.25,0.5,1")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    per_weight: dict[float, list[float]] = {w: [] for w in weights}
    for cls in sorted(p.name for p in (args.a / "scores").iterdir()):
        pairs = [(f, args.b / "scores" / cls / f.name) for f in sorted((args.a / "scores" / cls).glob("*.npz"))]
        pairs = [(fa, fb) for fa, fb in pairs if fb.exists()]
        if not pairs:
            continue
        a = np.array([float(np.load(fa)["object_score"]) for fa, _ in pairs])
        b = np.array([float(np.load(fb)["object_score"]) for _, fb in pairs])
        labels = np.array([int(np.load(fa)["label"]) for fa, _ in pairs])
        good = labels == 0
        za, zb = normalized(a, good), normalized(b, good)
        cells = []
        for w in weights:
            per_weight[w].append(auroc(za + w * zb, labels))
            cells.append(f"w={w:g}: {per_weight[w][-1]:.3f}")
        print(f"{cls} ({len(pairs)} parts): " + ", ".join(cells) + f"; B alone {auroc(zb, labels):.3f}")
    print("mean I-AUROC by weight of B: " + ", ".join(f"{w:g}: {np.mean(v):.3f}" for w, v in per_weight.items() if v))


if __name__ == "__main__":
    main()
