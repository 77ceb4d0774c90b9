"""Markdown tables comparing several ``inspectd eval`` reports (one per scorer) on the same dataset.

Prints, for each ``LABEL=REPORT_DIR``: per-class I-AUROC / P-AUROC, the means, the per-defect
I-AUROC averaged over classes, and the CPU seconds per sample. Usage::

    python scripts/compare_reports.py patchcore-fpfh=/tmp/ev/a template=/tmp/ev/b fused=/tmp/ev/c
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    runs = [(a.split("=", 1)[0], json.loads((Path(a.split("=", 1)[1]) / "report.json").read_text())) for a in argv]
    classes = list(runs[0][1]["classes"])
    print("| scorer | " + " | ".join(classes) + " | mean I-AUROC | mean P-AUROC | CPU s / sample |")
    print("|---|" + "---:|" * (len(classes) + 3))
    for label, r in runs:
        cells = [f"{r['classes'][c]['i_auroc']:.3f} / {r['classes'][c]['p_auroc']:.3f}" for c in classes]
        cpu = np.mean([r["details"][c]["score_cpu_seconds_per_sample"] for c in classes])
        print(f"| {label} | " + " | ".join(cells) + f" | **{r['mean']['i_auroc']:.3f}** | {r['mean']['p_auroc']:.3f} | "
              f"{cpu:.2f} |")
    kinds = sorted({k for _, r in runs for c in classes for k in r["details"][c]["i_auroc_per_defect"]})
    print()
    print("| scorer | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for label, r in runs:
        vals = [np.mean([r["details"][c]["i_auroc_per_defect"][k] for c in classes
                         if k in r["details"][c]["i_auroc_per_defect"]]) for k in kinds]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
