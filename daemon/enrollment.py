"""Enroll a product (fit its scorer on good parts) and calibrate its threshold.

Both read a folder of scans (PCD, PLY or XYZ TIFF) of one product. Calibration must use good
parts the scorer was NOT fitted on: a memory bank scores its own training parts near zero,
which would put the threshold far too low. So enrollment stores a content hash of every
training part in the model, and calibration refuses a part whose hash is among them, besides
the checks of ``daemon.decision.calibrate_threshold`` (domain, spread, number of parts).

Confirmed defects (``workers.confirmed``, the label store's ``defective`` parts) serve twice: a
scorer that learns from them (``fit_defects``, e.g. ``fused-defects``) takes them at enrollment,
and calibration scores them to trade false rejects against escapes
(``daemon.defect_calibration``). A part the model was fitted on, good or defective, is refused
for calibration (its hash is in the model's ``train_part_hashes``): a confirmed defect in the
defect bank scores high by construction and would make the escape rate look better than it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from daemon.config import Config
from daemon.decision import CalibrationRefused, check_part_count
from daemon.defect_calibration import EscapeCost, calibrate_with_defects
from sensors.frame import Frame, FrameMeta
from sensors.pointfiles import SCAN_SUFFIXES, read_scan
from workers.base import Scorer, hash_training_data, part_hash
from workers.model_store import load_product_model, save_product_model, write_calibration
from workers.preprocess import PreprocessParams, prepare
from workers.registry import DEFAULT_SCORER, scorer_class, spec_params
from workers.score_frame import score_frame

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


def load_defect_frames(folder: str | Path, product: str) -> list[Frame]:
    """The confirmed-defect parts of ``product`` under ``folder`` (the label store's root, the
    product's folder or its ``defective`` folder; see ``workers.confirmed``) as frames."""
    from workers.confirmed import read_confirmed

    parts = read_confirmed(folder, product, "defective")
    if not parts:
        raise FileNotFoundError(f"no confirmed defects (*.npz) of {product} in {folder}")
    return [p.frame(i) for i, p in enumerate(parts)]


def enroll_scorer(cfg: Config, product: str, flag: str | None = None) -> tuple[str, dict[str, Any]]:
    """The scorer ``inspectd enroll`` fits and its parameters: the product's ``scorer:`` in the
    config (``{type, ...params}``), else ``DEFAULT_SCORER``. ``flag`` (``--scorer``) names another
    scorer: it wins, with its default parameters when it is not the configured one (logged)."""
    spec = cfg.products[product].scorer if product in cfg.products else None
    if flag is None:
        return (spec.type, spec_params(spec)) if spec is not None else (DEFAULT_SCORER, {})
    if spec is not None and spec.type != flag:
        log.warning("--scorer %s overrides products.%s.scorer (%s) of the config, and its parameters", flag,
                    product, spec.type)
        return flag, {}
    return flag, spec_params(spec) if spec is not None else {}


def enroll(
    models_dir: str | Path,
    product: str,
    frames: Sequence[Frame],
    scorer_name: str,
    preprocess: PreprocessParams,
    scorer_params: dict[str, Any] | None = None,
    progress: bool = True,
    allow_random_init: bool = False,
    holdout: Sequence[Frame] = (),
    target_frr: float = 0.01,
    defects: Sequence[Frame] = (),
) -> Path:
    """Fit ``scorer_name`` on good ``frames`` and write a new revision of the product's model.

    With ``holdout`` frames the model is calibrated on them before it is written, so a refused
    calibration (``CalibrationRefused``) leaves no new revision behind. A learned scorer whose
    pretrained weights are missing refuses to fit from random weights unless ``allow_random_init``.
    ``defects``: confirmed-defect frames (their ``gt_mask`` the marked region, if any) for a scorer
    with ``fit_defects``; any other scorer refuses them. They are then part of the model's training
    parts, so the holdout calibration does not use them (``inspectd calibrate --defects`` with
    other confirmed defects measures the escape rate)."""
    if holdout:
        check_part_count(len(holdout), target_frr)  # refuse before the fit, not after
    scorer_type = scorer_class(scorer_name)
    preprocess = replace(preprocess, **scorer_type.preprocess_overrides)
    clouds = [prepare(f, preprocess) for f in tqdm(frames, desc=f"prepare {product}", disable=not progress)]
    params = {"voxel_size": preprocess.voxel_size, **(scorer_params or {})}
    scorer = scorer_type(**params)
    if allow_random_init:
        scorer.allow_random_init = True
    if defects and not hasattr(scorer, "fit_defects"):
        raise ValueError(f"scorer {scorer_name!r} does not learn from confirmed defects; use --scorer fused-defects")
    scorer.fit(clouds, progress=progress)
    if defects:
        d_clouds = [prepare(f, preprocess) for f in defects]
        masks = [None if f.gt_mask is None else f.gt_mask.reshape(-1) != 0 for f in defects]
        n_entries = scorer.fit_defects(d_clouds, masks)
        log.info("%s: %d confirmed defects gave %d defect-bank entries", product, len(defects), n_entries)
    hashes = [part_hash(f.points) for f in [*frames, *defects]]
    train_hash = hash_training_data(clouds)
    record = None
    if holdout:
        record = calibration_record(scorer, preprocess, hashes, holdout, target_frr, progress, product)
        record["model_version"] = f"{scorer.version}+{train_hash[:12]}"
    path = save_product_model(models_dir, product, scorer, preprocess, train_hash, hashes, record)
    if record is not None:
        record["revision"] = path.name
    log.info("enrolled %s with %s on %d good parts → %s", product, scorer_name, len(frames), path)
    return path


def calibration_record(
    scorer: Scorer,
    preprocess: PreprocessParams,
    train_part_hashes: list[str] | None,
    frames: Sequence[Frame],
    target_frr: float,
    progress: bool = True,
    product: str = "",
    defects: Sequence[Frame] = (),
    cost: EscapeCost | None = None,
) -> dict[str, Any]:
    """Score good ``frames`` (and confirmed-defect ``defects``) with ``scorer`` and calibrate;
    refuses (``CalibrationRefused``) parts the scorer was fitted on and the cases of
    ``daemon.decision.calibrate_threshold``; with defects, the cost rule of
    ``daemon.defect_calibration``."""
    check_part_count(len(frames), target_frr)  # before scoring: no minutes of work for a refusal
    if train_part_hashes is None:
        log.warning("the model of %s does not list its training parts (migrated from format 1, or saved by "
                    "`inspectd train`): calibration cannot check that these parts were not used to fit it", product)
    trained = set(train_part_hashes or [])
    reused_defects = [str(f.meta.part_id) for f in defects if part_hash(f.points) in trained]
    if reused_defects:
        raise CalibrationRefused(
            f"{len(reused_defects)} of the {len(defects)} confirmed defects were used to fit the model "
            f"({', '.join(reused_defects[:5])}{'…' if len(reused_defects) > 5 else ''}): a defect in the model's "
            "defect bank scores high by construction, which would make the escape rate look better than it is; "
            "calibrate with confirmed defects the model did not learn from")
    reused = [str(f.meta.part_id) for f in frames if part_hash(f.points) in trained]
    if reused:
        raise CalibrationRefused(
            f"{len(reused)} of the {len(frames)} calibration parts were used to fit the model "
            f"({', '.join(reused[:5])}{'…' if len(reused) > 5 else ''}): a model scores its own "
            "training parts near zero, which would put the threshold far too low; calibrate on other good "
            "parts (or `inspectd enroll --holdout K`, which keeps K parts out of the fit)")
    scores = [
        score_frame(scorer, f, preprocess).object_score
        for f in tqdm(frames, desc=f"calibrate {product}", disable=not progress)
    ]
    d_scores = [
        score_frame(scorer, f, preprocess).object_score
        for f in tqdm(defects, desc=f"score confirmed defects of {product}", disable=not progress or not defects)
    ]
    return calibrate_with_defects(scores, d_scores, target_frr, scorer.score_domain, cost,
                                  [str(f.meta.part_id) for f in frames], [str(f.meta.part_id) for f in defects])


def calibrate(
    models_dir: str | Path, product: str, frames: Sequence[Frame], target_frr: float, progress: bool = True,
    defects: Sequence[Frame] = (), cost: EscapeCost | None = None,
) -> dict[str, Any]:
    """Score held-out good ``frames`` with the product's latest model and write its threshold (a
    new revision with calibration.json). Raises ``CalibrationRefused`` (a ValueError) saying what to do."""
    model = load_product_model(models_dir, product)
    record = calibration_record(model.scorer, model.preprocess, model.meta.get("train_part_hashes"), frames,
                                target_frr, progress, product, defects, cost)
    record["model_version"] = model.model_version
    record["calibrated_revision"] = model.revision
    record["revision"] = write_calibration(models_dir, product, record).name
    log.info("calibrated %s: threshold %.4g from %d good parts", product, record["threshold"], len(frames))
    return record
