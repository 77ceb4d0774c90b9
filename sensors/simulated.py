"""A simulated structured-light camera on a line: a stream of parts of several products.

Exactly ``round(defect_rate * n)`` of the parts are defective, at seeded random positions, so
a demo run always has both kinds. Each frame carries its ground truth (``meta.truth`` and
``gt_mask``), which the daemon never uses to decide. This stands in for a physical camera,
which cannot run here; everything downstream of the frame is the real path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np

from sensors.frame import Frame
from sensors.simcam import CameraParams, simulate_frame


def simulated_parts(
    products: Sequence[str],
    n_parts: int,
    defect_rate: float,
    seed: int,
    camera: CameraParams | None = None,
    sensor_id: str = "simcam-0",
    good_only: bool = False,
) -> Iterator[Frame]:
    """Yield ``n_parts`` frames; products drawn at random, defects at exact rate (unless good_only)."""
    rng = np.random.default_rng(seed)
    n_def = 0 if good_only else int(round(defect_rate * n_parts))
    defective = np.zeros(n_parts, dtype=bool)
    defective[rng.choice(n_parts, size=n_def, replace=False)] = True
    which = rng.integers(0, len(products), size=n_parts)
    for i in range(n_parts):
        product = products[which[i]]
        part_rng = np.random.default_rng([seed, i])
        frame = simulate_frame(
            product, bool(defective[i]), part_rng, camera=camera, seq=i, sensor_id=sensor_id,
            part_id=f"{product}-{seed}-{i:05d}",
        )
        yield replace(frame, meta=replace(frame.meta, capture_time=time.time()))
