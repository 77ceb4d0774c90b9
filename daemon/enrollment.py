"""Enroll a product (fit its scorer on good parts) and calibrate its threshold.

Both read a folder of scans (PCD, PLY or XYZ TIFF) of one product. Calibration must use good
parts the scorer was NOT fitted on: a memory bank scores its own training parts near zero,
which would put the threshold far too low.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from daemon.decision import calibrate_threshold
from sensors.frame import Frame, FrameMeta
from sensors.pointfiles import SCAN_SUFFIXES, read_scan
from workers.frame_scoring import score_frame
from workers.model_store import load_product_model, save_product_model, write_calibration
from workers.preprocess import PreprocessParams, prepare
from workers.scorer import hash_training_data, scorer_class

log = logging.getLogger("inspectd.enroll")


def scan_files(folder: str | Path) -> list[Path]:
    """Scan files in ``folder`` (not recursive), sorted; an error if there are none."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a folder")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in SCAN_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no scan files ({', '.join(SCAN_SUFFIXES)}) in {d}")
    return files


def load_frames(folder: str | Path, product: str) -> list[Frame]:
    frames = []
    for i, path in enumerate(scan_files(folder)):
        points, rgb = read_scan(path)
        meta = FrameMeta(sensor_id="file", product=product, part_id=path.stem, seq=i, capture_time=path.stat().st_mtime)
        frames.append(Frame(points=points, meta=meta, rgb=rgb))
    return frames


def enroll(
    models_dir: str | Path,
    product: str,
    frames: Sequence[Frame],
    scorer_name: str,
    preprocess: PreprocessParams,
    scorer_params: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Fit ``scorer_name`` on good ``frames`` and write the product's model folder."""
    clouds = [prepare(f, preprocess) for f in tqdm(frames, desc=f"prepare {product}", disable=not progress)]
    params = {"voxel_size": preprocess.voxel_size, **(scorer_params or {})}
    scorer = scorer_class(scorer_name)(**params)
    scorer.fit(clouds, progress=progress)
    path = save_product_model(models_dir, product, scorer, preprocess, hash_training_data(clouds))
    log.info("enrolled %s with %s on %d good parts → %s", product, scorer_name, len(frames), path)
    return path


def calibrate(
    models_dir: str | Path, product: str, frames: Sequence[Frame], target_frr: float, progress: bool = True
) -> dict[str, Any]:
    """Score held-out good ``frames`` and write the product's threshold (calibration.json)."""
    model = load_product_model(models_dir, product)
    scores = [
        score_frame(model.scorer, f, model.preprocess).object_score
        for f in tqdm(frames, desc=f"calibrate {product}", disable=not progress)
    ]
    record = calibrate_threshold(scores, target_frr)
    record["model_version"] = model.model_version
    write_calibration(models_dir, product, record)
    log.info("calibrated %s: threshold %.4g from %d good parts", product, record["threshold"], len(scores))
    return record
