"""Scoring time of fused enrolled on the train split alone against train + validation good parts.

    python scripts/enrollment_score_time.py DATASET LAYOUT CLASS

Fits two fused models of CLASS (``inspectd eval``'s two ``--enroll`` choices), then scores the
first 12 test parts with each, alternating, three rounds, in one process with one thread, and
prints the median thread CPU time per part of each and their ratio (docs/results/bench-preset.md,
"Enrollment"). Alternating in one process keeps the ratio meaningful on a loaded machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensors.datasets import list_samples  # noqa: E402
from tools.evaluation.protocol import preprocess_params, validation_good  # noqa: E402
from workers.preprocess import prepare  # noqa: E402
from workers.registry import scorer_class  # noqa: E402
from workers.score_frame import score_frame  # noqa: E402


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    dataset, layout, cls = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    pp = preprocess_params(layout, 1.0)
    train = [prepare(s.load(), pp) for s in list_samples(dataset, layout, cls, "train")]
    extra = [prepare(s.load(), pp) for s in validation_good(dataset, layout, cls, None)]
    models = {"train": scorer_class("fused")(voxel_size=1.0), "train+validation": scorer_class("fused")(voxel_size=1.0)}
    models["train"].fit(train)
    models["train+validation"].fit(train + extra)
    frames = [s.load() for s in list_samples(dataset, layout, cls, "test")[:12]]
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):
        for frame in frames:
            for name, model in models.items():
                t0 = time.thread_time()
                score_frame(model, frame, pp)
                cpu[name].append(time.thread_time() - t0)
    a, b = (float(np.median(cpu[k])) for k in models)
    print(f"{cls} ({layout}): enrolled parts {len(train)} / {len(train) + len(extra)}; thread CPU per part, median: "
          f"{1e3 * a:.1f} / {1e3 * b:.1f} ms, ratio {b / a:.2f}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
