"""Where enrolled products live on disk: one self-describing folder per product.

    <models_dir>/<product>/model.safetensors   the scorer's fitted tensors
    <models_dir>/<product>/meta.json           scorer, version, params, train hash, preprocess
    <models_dir>/<product>/calibration.json    threshold and the good-part scores behind it

A model keeps the preprocessing it was fitted with (voxel size, plane removal), so serving
always matches training. A new model is written to a sibling temporary folder and renamed
into place, so a reader never sees half an artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.preprocess import PreprocessParams
from workers.scorer import META_FILE, Scorer, load_scorer, read_meta

CALIBRATION_FILE = "calibration.json"
ZERO_SHOT_MODEL = "_zeroshot"
"""Folder name of the cold-start model: scores products that have no model of their own.
It cannot clash with a product, whose names start with a letter or digit."""


@dataclass
class ProductModel:
    product: str
    scorer: Scorer
    preprocess: PreprocessParams
    meta: dict[str, Any]
    calibration: dict[str, Any] | None = None
    """The threshold record of ``inspectd calibrate``; it travels with the model so a verdict
    always uses the threshold of the model that scored the part."""

    @property
    def model_version(self) -> str:
        """Scorer version plus the first 12 hex digits of the training-data hash."""
        return f"{self.meta['version']}+{self.meta['train_hash'][:12]}"


def product_dir(models_dir: str | Path, product: str) -> Path:
    return Path(models_dir) / product


def enrolled_products(models_dir: str | Path) -> list[str]:
    """Products with a complete model folder."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / META_FILE).is_file() and not p.name.startswith((".", "_")))


def save_product_model(
    models_dir: str | Path, product: str, scorer: Scorer, preprocess: PreprocessParams, train_hash: str
) -> Path:
    """Write the product's model folder atomically (replacing an older one and its calibration)."""
    final = product_dir(models_dir, product)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{product}-", dir=final.parent))
    scorer.save(tmp, train_hash, extra={"product": product, "preprocess": asdict(preprocess)})
    old = final.with_name(f".{product}-old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_product_model(models_dir: str | Path, product: str) -> ProductModel:
    d = product_dir(models_dir, product)
    meta = read_meta(d)
    preprocess = PreprocessParams(**meta.get("preprocess", {}))
    return ProductModel(product, load_scorer(d), preprocess, meta, read_calibration(models_dir, product))


def read_calibration(models_dir: str | Path, product: str) -> dict[str, Any] | None:
    path = product_dir(models_dir, product) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_calibration(models_dir: str | Path, product: str, calibration: dict[str, Any]) -> Path:
    path = product_dir(models_dir, product) / CALIBRATION_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
