"""Replay recorded scans as a sensor: a plain folder of PCD / PLY / XYZ-TIFF files, or the
test split of a dataset in one of the public layouts (MVTec 3D-AD, Real3D-AD, Anomaly-ShapeNet).

Units: a folder replay sends ``units`` (default mm); a dataset replay sends the dataset's
(``sensors.datasets.dataset_units``: metres for MVTec 3D-AD) unless ``units`` overrides it. The
daemon converts to mm, so a metre-scale MVTec scan is scored like a millimetre one.

Dataset samples carry their ground truth (``meta.truth``, ``gt_mask``), so a replay through
the daemon can be scored the same way as the simulated camera.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from sensors.frame import Frame, FrameMeta
from sensors.pointfiles import SCAN_SUFFIXES, read_scan


def replay_frames(
    path: str | Path,
    layout: str = "folder",
    product: str | None = None,
    split: str = "test",
    sensor_id: str = "replay-0",
    units: str | None = None,
) -> Iterator[Frame]:
    """Frames from ``path``, in sorted order, stamped with the send time as capture time.

    ``units``: the units of the stored coordinates (see the module doc; None: the default)."""
    root = Path(path)
    if layout == "folder":
        if not product:
            raise ValueError("folder replay needs --product")
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in SCAN_SUFFIXES) if root.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no scan files ({', '.join(SCAN_SUFFIXES)}) in {root}")
        for seq, f in enumerate(files):
            points, rgb = read_scan(f)
            meta = FrameMeta(sensor_id=sensor_id, product=product, part_id=f.stem, seq=seq, capture_time=time.time(),
                             units=units or "mm")
            yield Frame(points=points, meta=meta, rgb=rgb)
        return
    from sensors.datasets import dataset_units, list_classes, list_samples

    seq = 0
    units = units or dataset_units(root, layout)
    for cls in [product] if product else list_classes(root, layout):
        for sample in list_samples(root, layout, cls, split, units=units):
            frame = sample.load()
            meta = replace(frame.meta, sensor_id=sensor_id, seq=seq, capture_time=time.time())
            seq += 1
            yield replace(frame, meta=meta)
