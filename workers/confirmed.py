"""Operator-confirmed parts from the label store, as frames a scorer or a calibration can use.

The label store (written by the review station) keeps one file pair per decision:
``<labels>/<product>/<good|defective>/<part_id>.npz`` with ``points`` (float32 N×3, mm) and an
optional ``mask`` (bool N, the defect region the operator marked), and ``<part_id>.json`` with
``{product, part_id, sensor_id, seq, label, kind, region, user, at, model_version,
object_score, scan}``. This module only reads that layout from a directory; it does not depend
on the code that writes it. Nothing is unpickled (``allow_pickle=False``); a file that does not
follow the layout raises ``ValueError`` naming it, so a damaged label store is noticed, not
silently half-used.

``confirmed_dir`` accepts the label store's root (``<labels>``, with ``product``), a product
folder (``<labels>/<product>``) or the ``defective`` / ``good`` folder itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensors.frame import Frame, FrameMeta

LABELS = ("good", "defective")


@dataclass
class ConfirmedPart:
    """One operator decision: the scan's points (mm), the marked region if any, and its record."""

    part_id: str
    product: str
    label: str
    kind: str | None
    points: np.ndarray
    mask: np.ndarray | None
    record: dict[str, Any] = field(default_factory=dict)

    def frame(self, seq: int = 0) -> Frame:
        """The part as a :class:`Frame` (mm); the marked region, if any, is its ``gt_mask``."""
        meta = FrameMeta(sensor_id=str(self.record.get("sensor_id", "labels")), product=self.product,
                         part_id=self.part_id, seq=seq, capture_time=float(self.record.get("at_unix", 0.0) or 0.0),
                         truth={"defective": self.label == "defective", "defect": self.kind or self.label})
        gt = None if self.mask is None else self.mask.astype(np.uint8)
        return Frame(points=self.points, meta=meta, gt_mask=gt)


def confirmed_dir(directory: str | Path, product: str | None = None, label: str = "defective") -> Path:
    """The folder holding ``label``'s parts, from the store root, a product folder or the folder itself."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    d = Path(directory)
    for cand in ([d / product / label] if product else []) + [d / label, d]:
        if cand.is_dir() and (cand == d or cand.name == label):
            return cand
    raise FileNotFoundError(f"{d} is not a folder of confirmed {label} parts")


def _load_part(npz_path: Path, label: str, product: str | None) -> ConfirmedPart:
    side = npz_path.with_suffix(".json")
    record: dict[str, Any] = {}
    if side.is_file():
        try:
            record = json.loads(side.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{side}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{side}: not a JSON object")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            points = np.asarray(z["points"])
            mask = np.asarray(z["mask"]) if "mask" in z.files else None
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{npz_path}: not a label-store scan ({type(e).__name__}: {e})") from None
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or not np.isfinite(points).all():
        raise ValueError(f"{npz_path}: 'points' must be a finite N×3 array, got shape {points.shape}")
    if mask is not None and (mask.shape != (len(points),) or mask.dtype.kind not in "biu"):
        raise ValueError(f"{npz_path}: 'mask' must be bool (or 0/1) with one value per point, got {mask.dtype} {mask.shape}")
    if mask is not None:
        mask = mask.astype(bool)
    rec_label = record.get("label", label)
    if rec_label != label:
        raise ValueError(f"{side}: label {rec_label!r} in a {label!r} folder")
    rec_product = record.get("product", product)
    if product is not None and rec_product not in (None, product):
        raise ValueError(f"{side}: product {rec_product!r}, expected {product!r}")
    kind = record.get("kind")
    return ConfirmedPart(part_id=str(record.get("part_id", npz_path.stem)), product=str(rec_product or ""),
                         label=label, kind=str(kind) if kind else None, points=points.astype(np.float32),
                         mask=mask, record=record)


def read_confirmed(directory: str | Path, product: str | None = None, label: str = "defective") -> list[ConfirmedPart]:
    """Every confirmed ``label`` part under ``directory`` (see :func:`confirmed_dir`), sorted by file
    name; an empty list when the folder has none."""
    folder = confirmed_dir(directory, product, label)
    return [_load_part(p, label, product) for p in sorted(folder.glob("*.npz"))]


def write_confirmed(directory: str | Path, part: ConfirmedPart) -> Path:
    """Write ``part`` in the label-store layout under ``directory/<product>/<label>/`` (for tests
    and the few-defects experiment; the review station has its own writer)."""
    d = Path(directory) / part.product / part.label
    d.mkdir(parents=True, exist_ok=True)
    arrays = {"points": part.points.astype(np.float32)}
    if part.mask is not None:
        arrays["mask"] = part.mask.astype(bool)
    np.savez(d / f"{part.part_id}.npz", **arrays)
    record = {"product": part.product, "part_id": part.part_id, "label": part.label, "kind": part.kind, **part.record}
    (d / f"{part.part_id}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    return d / f"{part.part_id}.npz"
