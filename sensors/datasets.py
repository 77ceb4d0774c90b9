"""Loaders for the three public 3D anomaly-detection datasets, in their published layouts.

Why: evaluation and demos replay public benchmarks through the same :class:`sensors.frame.Frame`
the daemon gets from a sensor, so a model is scored on exactly what it would see in production.
Listing is cheap (directory scans only); :meth:`Sample.load` reads the files.

Layouts (``<root>/<class>/...``):

* ``"mvtec3d"`` (MVTec 3D-AD), organized frames::

      <class>/train/good/{xyz/*.tiff, rgb/*.png}
      <class>/validation/good/{xyz/*.tiff, rgb/*.png}
      <class>/test/<defect|good>/{xyz/*.tiff, rgb/*.png, gt/*.png}

  ``gt`` PNGs share the stem of the XYZ file (``000.tiff`` ↔ ``000.png``); a non-zero pixel
  (255 in the dataset) is anomalous. A ``good`` test sample without a gt file gets an all-zero
  mask. XYZ (0, 0, 0) pixels become NaN (see ``sensors.pointfiles.read_xyz_tiff``). Class folders
  are the subfolders holding ``train/``; other entries (``readme.txt``...) are ignored.

* ``"real3d"`` (Real3D-AD), unorganized frames::

      <class>/train/*.pcd        good templates
      <class>/test/*.pcd         test parts; good ones have "good" in the file name
      <class>/gt/<stem>.txt      one "x y z label" line per point (label 0/1)

* ``"anomaly-shapenet"`` (Anomaly-ShapeNet), unorganized frames::

      <class>/train/*template*.pcd
      <class>/test/*.pcd         normal ones have "positive" or "good" in the file name
      <class>/GT/<stem>.txt      same "x y z label" format

A ``validation`` split (good and defective parts for choosing defaults, ``inspectd synth
--preset bench``) is optional in every layout: mvtec3d ``<class>/validation/<defect|good>/...``
as its test split; the point-cloud layouts ``<class>/validation/*.pcd`` with their label files in
``<class>/validation/gt/`` (real3d) or ``<class>/validation/GT/`` (anomaly-shapenet).

Units (:data:`LAYOUT_UNITS`): MVTec 3D-AD stores XYZ in metres (a Zivid camera's frame),
Real3D-AD and Anomaly-ShapeNet in millimetres. A loaded frame carries its units
(``meta.units``); the preprocessing converts to mm. :func:`dataset_units` reads the units a
dataset declares in its ``dataset.json`` (``inspectd synth`` writes one), else the layout's.
An explicit ``units`` (``--units``) overrides both.

For both point-cloud layouts the sample label comes from the file name ("good"/"positive" →
0, else 1) and the defect name from the stem (``12_bulge`` / ``ashtray0_bulge3`` → ``bulge``).
**Points of a test sample with a label file come from that text file, not from the PCD**: the
published label files carry their own coordinates and their row order (and, in Real3D-AD, even
their point count) need not match the PCD's, so the txt is the only source where every label is
guaranteed to sit on its point. A test file without a label file (a normal sample) is read
from the PCD with an all-zero mask; an anomalous one without a label file is an error.
Separators in label files may be spaces or commas (both occur in the wild).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sensors.frame import Frame, FrameMeta
from sensors.pointfiles import PointFileError, read_labeled_txt, read_pcd, read_xyz_tiff

__all__ = ["GT_DIRS", "LAYOUTS", "LAYOUT_UNITS", "DatasetError", "Sample", "dataset_units", "list_classes", "list_samples"]

LAYOUTS = ("mvtec3d", "real3d", "anomaly-shapenet")
LAYOUT_UNITS = {"mvtec3d": "m", "real3d": "mm", "anomaly-shapenet": "mm"}
"""The unit each published layout stores its coordinates in."""
Split = Literal["train", "validation", "test"]

_SPLITS = {
    "mvtec3d": ("train", "validation", "test"),
    "real3d": ("train", "validation", "test"),
    "anomaly-shapenet": ("train", "validation", "test"),
}
GT_DIRS = {"real3d": "gt", "anomaly-shapenet": "GT"}
_GOOD_WORDS = {"real3d": ("good",), "anomaly-shapenet": ("positive", "good")}
_TIFF = (".tiff", ".tif")

_HINT = {
    "mvtec3d": "<root>/<class>/{train,validation}/good/{xyz,rgb}/ and <class>/test/<defect|good>/{xyz,rgb,gt}/",
    "real3d": "<root>/<class>/{train,test}/*.pcd and <class>/gt/*.txt",
    "anomaly-shapenet": "<root>/<class>/train/*template*.pcd, <class>/test/*.pcd and <class>/GT/*.txt",
}


class DatasetError(ValueError):
    """A dataset directory or file that does not match the expected layout."""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _require_dir(path: Path, layout: str, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: missing directory ({what}) for a {layout!r} dataset; expected {_HINT[layout]}")


def _defect_from_stem(stem: str, cls: str, layout: str) -> str:
    """'12_bulge' / 'ashtray0_bulge3' → 'bulge'; a normal file name → 'good'."""
    low = stem.lower()
    if any(w in low for w in _GOOD_WORDS[layout]):
        return "good"
    name = stem
    if name.lower().startswith(cls.lower()):
        name = name[len(cls) :]
    name = re.sub(r"^[\d_\-\s]+", "", name)  # Real3D-AD's numeric prefix
    name = re.sub(r"[\d_\-\s]+$", "", name)  # Anomaly-ShapeNet's numeric suffix
    return name or "anomalous"


@dataclass
class Sample:
    """One file of a dataset; ``load()`` turns it into a :class:`Frame`."""

    path: Path
    """The scan file: the XYZ TIFF (mvtec3d) or the PCD (real3d, anomaly-shapenet)."""
    cls: str
    split: Split
    defect: str
    """``'good'`` or the defect name (MVTec folder name / parsed from the file stem)."""
    label: int
    """0 good, 1 anomalous."""
    stem: str
    layout: str = "mvtec3d"
    gt_path: Path | None = None
    """The ground-truth file if one exists (gt PNG / label txt)."""
    rgb_path: Path | None = None
    """MVTec's RGB PNG if one exists."""
    units: str | None = None
    """Units of the stored coordinates; None: the layout's (:data:`LAYOUT_UNITS`)."""

    def load(self, seq: int = 0, capture_time: float | None = None) -> Frame:
        """Read the sample into a Frame (product = class, part_id = stem, sensor_id = "dataset").

        ``gt_mask`` (uint8, 1 = anomalous) is always set, aligned with ``points``; train and good
        samples get all zeros. ``capture_time`` defaults to now (a dataset has no capture clock).
        """
        try:
            if self.layout == "mvtec3d":
                points, rgb, gt = self._load_mvtec()
            else:
                points, rgb, gt = self._load_cloud()
        except PointFileError as exc:
            raise DatasetError(str(exc)) from exc
        meta = FrameMeta(
            sensor_id="dataset",
            product=self.cls,
            part_id=self.stem,
            seq=seq,
            capture_time=time.time() if capture_time is None else capture_time,
            units=self.units or LAYOUT_UNITS.get(self.layout, "mm"),
            truth={"defective": bool(self.label), "defect": self.defect},
        )
        return Frame(points=points, meta=meta, rgb=rgb, gt_mask=gt)

    def _load_mvtec(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        from PIL import Image

        points = read_xyz_tiff(self.path)
        lead = points.shape[:2]
        rgb = None
        if self.rgb_path is not None:
            with Image.open(self.rgb_path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if rgb.shape[:2] != lead:
                raise DatasetError(f"{self.rgb_path}: RGB image is {rgb.shape[1]}×{rgb.shape[0]}, XYZ is {lead[1]}×{lead[0]}")
        if self.gt_path is not None:
            with Image.open(self.gt_path) as im:
                gt = (np.asarray(im.convert("L")) > 0).astype(np.uint8)
            if gt.shape != lead:
                raise DatasetError(f"{self.gt_path}: gt mask is {gt.shape[1]}×{gt.shape[0]}, XYZ is {lead[1]}×{lead[0]}")
        elif self.label == 0:
            gt = np.zeros(lead, dtype=np.uint8)
        else:
            raise DatasetError(f"{self.path}: anomalous test sample has no gt mask (expected ../gt/{self.stem}.png)")
        return points, rgb, gt

    def _load_cloud(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        if self.gt_path is not None:  # the label file carries the points aligned with its labels
            points, gt = read_labeled_txt(self.gt_path)
            return points, None, gt
        if self.split != "train" and self.label == 1:
            raise DatasetError(
                f"{self.path}: anomalous test sample has no label file "
                f"(expected {self.path.parent.parent / GT_DIRS[self.layout] / (self.stem + '.txt')})"
            )
        points, extras = read_pcd(self.path)
        return points, extras.get("rgb"), np.zeros(points.shape[0], dtype=np.uint8)


def list_classes(root: str | Path, layout: str) -> list[str]:
    """Class folder names under ``root`` (subfolders holding ``train/``), sorted."""
    _check_layout(layout)
    root = Path(root)
    _require_dir(root, layout, "dataset root")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders (subfolders with train/) for a {layout!r} dataset; expected {_HINT[layout]}")
    return classes


def dataset_units(root: str | Path, layout: str) -> str:
    """The units of a dataset's coordinates: what its ``dataset.json`` declares (``"units"``),
    mm for an ``inspectd synth`` dataset that declares none (written before synth stored
    MVTec-layout TIFFs in metres), else the layout's (:data:`LAYOUT_UNITS`)."""
    import json

    _check_layout(layout)
    meta = Path(root) / "dataset.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            info = None
        if isinstance(info, dict):
            if isinstance(info.get("units"), str):
                return info["units"]
            if str(info.get("generator", "")).startswith("inspectd"):
                return "mm"
    return LAYOUT_UNITS[layout]


def list_samples(root: str | Path, layout: str, cls: str, split: str, units: str | None = None) -> list[Sample]:
    """All samples of one class and split, sorted by (defect, stem) for mvtec3d, by stem otherwise.

    ``units``: the units of the stored coordinates, for every sample (default: the layout's)."""
    _check_layout(layout)
    if split not in _SPLITS[layout]:
        raise DatasetError(f"layout {layout!r} has splits {', '.join(_SPLITS[layout])}, not {split!r}")
    root = Path(root)
    _require_dir(root, layout, "dataset root")
    split_dir = root / cls / split
    _require_dir(split_dir, layout, f"class {cls!r} split {split!r}")
    samples = _list_mvtec(split_dir, layout, cls, split) if layout == "mvtec3d" else _list_cloud(
        split_dir, layout, cls, split)
    for s in samples:
        s.units = units
    return samples


def _list_mvtec(split_dir: Path, layout: str, cls: str, split: str) -> list[Sample]:
    samples: list[Sample] = []
    defect_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not defect_dirs:
        raise DatasetError(f"{split_dir}: no defect/good folders for a {layout!r} dataset; expected {_HINT[layout]}")
    for ddir in defect_dirs:
        xyz_dir = ddir / "xyz"
        _require_dir(xyz_dir, layout, "XYZ TIFFs")
        label = 0 if ddir.name == "good" else 1
        for f in sorted(xyz_dir.iterdir()):
            if not (f.is_file() and f.suffix.lower() in _TIFF):
                continue
            rgb = ddir / "rgb" / f"{f.stem}.png"
            gt = ddir / "gt" / f"{f.stem}.png"
            samples.append(
                Sample(
                    path=f,
                    cls=cls,
                    split=split,  # type: ignore[arg-type]
                    defect=ddir.name,
                    label=label,
                    stem=f.stem,
                    layout=layout,
                    gt_path=gt if gt.is_file() else None,
                    rgb_path=rgb if rgb.is_file() else None,
                )
            )
    return samples


def _list_cloud(split_dir: Path, layout: str, cls: str, split: str) -> list[Sample]:
    gt_dir = (split_dir if split == "validation" else split_dir.parent) / GT_DIRS[layout]
    samples: list[Sample] = []
    for f in sorted(split_dir.iterdir()):
        if not (f.is_file() and f.suffix.lower() == ".pcd"):
            continue
        if split == "train":
            defect, gt = "good", None
        else:
            defect = _defect_from_stem(f.stem, cls, layout)
            txt = gt_dir / f"{f.stem}.txt"
            gt = txt if txt.is_file() else None
        samples.append(
            Sample(
                path=f,
                cls=cls,
                split=split,  # type: ignore[arg-type]
                defect=defect,
                label=0 if defect == "good" else 1,
                stem=f.stem,
                layout=layout,
                gt_path=gt,
            )
        )
    return samples
