"""Where enrolled products live on disk: versioned, immutable model folders per product.

    <models_dir>/<product>/versions/<rev>/model.safetensors   the scorer's fitted tensors
    <models_dir>/<product>/versions/<rev>/meta.json           format, scorer, params, hashes, preprocess
    <models_dir>/<product>/versions/<rev>/calibration.json    threshold and the good-part scores behind it
    <models_dir>/<product>/latest                             the newest revision (enroll, calibrate)
    <models_dir>/<product>/current                            the revision the daemon serves

A revision (``0001``, ``0002``…) is written to a temporary folder and renamed into place, then
never changed: ``calibrate`` writes a new revision that shares the model file (hard link).
``enroll`` and ``calibrate`` move ``latest``; only the daemon moves ``current`` (at start and on
reload), each pointer replaced atomically. Every actor, also one Ray restarts, loads each
product's ``current`` revision, so all actors serve what the daemon switched to.

A model keeps the preprocessing it was fitted with (voxel size, plane removal), so serving
always matches training. A models folder of the unversioned format 1 is refused with the
command that migrates it (``migrate_models_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.base import FORMAT_VERSION, META_FILE, MIGRATE_HINT, MODEL_FILE, ArtifactError, Scorer, read_meta
from workers.preprocess import PreprocessParams
from workers.registry import load_scorer, scorer_from_bytes

CALIBRATION_FILE = "calibration.json"
VERSIONS = "versions"
LATEST = "latest"
CURRENT = "current"
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
    revision: str = ""
    """The folder under ``versions/`` this model was loaded from."""

    @property
    def model_version(self) -> str:
        """Scorer version plus the first 12 hex digits of the training-data hash."""
        return f"{self.meta['version']}+{self.meta['train_hash'][:12]}"


def product_dir(models_dir: str | Path, product: str) -> Path:
    return Path(models_dir) / product


def has_model(models_dir: str | Path, product: str) -> bool:
    """Whether ``product`` has at least one complete revision."""
    return (product_dir(models_dir, product) / LATEST).is_file()


def enrolled_products(models_dir: str | Path) -> list[str]:
    """Products with a model (the cold-start model and hidden folders excluded)."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / LATEST).is_file() and not p.name.startswith((".", "_")))


def legacy_products(models_dir: str | Path) -> list[str]:
    """Folders in the unversioned format 1 (``meta.json`` directly in the product folder)."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / META_FILE).is_file() and not p.name.startswith("."))


def check_models_dir(models_dir: str | Path) -> None:
    """Raise ``ArtifactError`` with the migrate command if ``models_dir`` holds format-1 folders."""
    old = legacy_products(models_dir)
    if old:
        raise ArtifactError(f"{models_dir} holds models in the old unversioned format 1 ({', '.join(old)}): "
                            + MIGRATE_HINT.replace("<models_dir>", str(models_dir)))


def _write_pointer(path: Path, revision: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(revision + "\n")
    os.replace(tmp, path)


def read_pointer(models_dir: str | Path, product: str, which: str = LATEST) -> str:
    """The revision named by ``latest`` or ``current`` (``current`` falls back to ``latest``)."""
    d = product_dir(models_dir, product)
    if (d / META_FILE).is_file():
        check_models_dir(models_dir)
    for name in (which, LATEST):
        path = d / name
        if path.is_file():
            return path.read_text().strip()
    raise FileNotFoundError(f"no model for {product!r} in {models_dir}")


def revision_dir(models_dir: str | Path, product: str, revision: str) -> Path:
    return product_dir(models_dir, product) / VERSIONS / revision


def _publish(models_dir: str | Path, product: str, tmp: Path) -> str:
    """Rename the finished folder ``tmp`` to the next free revision and point ``latest`` at it."""
    versions = product_dir(models_dir, product) / VERSIONS
    while True:
        taken = [int(p.name) for p in versions.iterdir() if p.name.isdigit()]
        revision = f"{max(taken, default=0) + 1:04d}"
        try:
            os.rename(tmp, versions / revision)
        except OSError:  # another writer took this number first: try the next one
            if (versions / revision).exists():
                continue
            raise
        _write_pointer(product_dir(models_dir, product) / LATEST, revision)
        return revision


def _new_tmp(models_dir: str | Path, product: str) -> Path:
    versions = product_dir(models_dir, product) / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=versions))


def save_product_model(
    models_dir: str | Path,
    product: str,
    scorer: Scorer,
    preprocess: PreprocessParams,
    train_hash: str,
    part_hashes: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write a new revision of the product's model (and its calibration, if given); returns its
    folder (now ``latest``). ``part_hashes`` (``workers.base.part_hash`` of each training
    part) let calibration refuse parts the model was fitted on."""
    check_models_dir(models_dir)
    tmp = _new_tmp(models_dir, product)
    try:
        extra = {"product": product, "preprocess": asdict(preprocess), "train_part_hashes": part_hashes}
        scorer.save(tmp, train_hash, extra=extra)
        if calibration is not None:
            (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2, sort_keys=True))
        revision = _publish(models_dir, product, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return revision_dir(models_dir, product, revision)


def read_bundle(
    models_dir: str | Path, product: str, which: str = LATEST, revision: str | None = None
) -> dict[str, Any]:
    """The product's ``latest`` or ``current`` revision (or the given ``revision``: a shadow,
    ``workers.model_versions``) as plain data: ``product``, ``revision``
    and ``files`` (file name → bytes: the model, its meta and calibration).

    This is what travels to the scoring actors through Ray's object store (``ray.put`` of a dict
    of bytes), so an actor on another node needs no shared filesystem; :func:`load_bundle` checks
    and loads it there."""
    revision = revision or read_pointer(models_dir, product, which)
    d = revision_dir(models_dir, product, revision)
    read_meta(d)  # a missing or unreadable meta.json fails here, with the folder named
    files = {name: (d / name).read_bytes() for name in (MODEL_FILE, META_FILE, CALIBRATION_FILE) if (d / name).is_file()}
    return {"product": product, "revision": revision, "files": files}


def load_bundle(bundle: dict[str, Any]) -> ProductModel:
    """Load a model from :func:`read_bundle`'s data, with the checks of ``load_scorer`` (format
    version, checksum, whole state); JSON and safetensors only, nothing unpickled."""
    product, revision, files = bundle["product"], bundle["revision"], bundle["files"]
    where = f"{product}/{VERSIONS}/{revision}"
    if MODEL_FILE not in files or META_FILE not in files:
        raise ArtifactError(f"model artifact {where} lacks {MODEL_FILE} or {META_FILE}: re-enroll")
    try:
        meta = json.loads(files[META_FILE])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{where}/{META_FILE} is not valid JSON ({e}): the artifact is damaged; re-enroll") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}/{META_FILE} is not a JSON object: the artifact is damaged; re-enroll")
    scorer = scorer_from_bytes(meta, files[MODEL_FILE], where)
    preprocess = PreprocessParams(**meta.get("preprocess", {}))
    calibration = json.loads(files[CALIBRATION_FILE]) if CALIBRATION_FILE in files else None
    return ProductModel(product, scorer, preprocess, meta, calibration, revision)


def load_product_model(
    models_dir: str | Path, product: str, which: str = LATEST, revision: str | None = None
) -> ProductModel:
    """Load the product's ``latest`` (enroll, calibrate) or ``current`` (serving) revision, or
    the given ``revision`` (a shadow, ``workers.model_versions``)."""
    return load_bundle(read_bundle(models_dir, product, which, revision))


def read_calibration(models_dir: str | Path, product: str, which: str = LATEST) -> dict[str, Any] | None:
    path = revision_dir(models_dir, product, read_pointer(models_dir, product, which)) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_calibration(models_dir: str | Path, product: str, calibration: dict[str, Any]) -> Path:
    """A new revision: the ``latest`` model (hard-linked, not copied) with this calibration."""
    src = revision_dir(models_dir, product, read_pointer(models_dir, product, LATEST))
    tmp = _new_tmp(models_dir, product)
    try:
        for name in (MODEL_FILE, META_FILE):
            try:
                os.link(src / name, tmp / name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(src / name, tmp / name)
        (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2, sort_keys=True))
        revision = _publish(models_dir, product, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return revision_dir(models_dir, product, revision)


def switch_current(models_dir: str | Path, product: str, revision: str | None = None) -> str:
    """Point ``current`` at ``revision`` (default: ``latest``); the daemon does this at start and
    on reload, and points it back when the new revision cannot be loaded."""
    revision = revision or read_pointer(models_dir, product, LATEST)
    if not revision_dir(models_dir, product, revision).is_dir():
        raise FileNotFoundError(f"{product!r} has no revision {revision!r} in {models_dir}")
    _write_pointer(product_dir(models_dir, product) / CURRENT, revision)
    return revision


def migrate_models_dir(models_dir: str | Path) -> list[str]:
    """Upgrade every format-1 folder in ``models_dir`` to revision 0001 of the versioned layout.

    The artifact gains ``format_version``, the model checksum and ``train_part_hashes: null``
    (the training parts of an old model are unknown: calibration cannot check reuse for it).
    Each product is rebuilt in a temporary folder and swapped in by renames."""
    from workers.base import file_sha256

    root = Path(models_dir)
    done = []
    for name in legacy_products(root):
        old = root / name
        new = Path(tempfile.mkdtemp(prefix=f".migrate-{name}-", dir=root))
        try:
            rev = new / VERSIONS / "0001"
            rev.mkdir(parents=True)
            for f in (MODEL_FILE, META_FILE, CALIBRATION_FILE):
                if (old / f).is_file():
                    shutil.copy2(old / f, rev / f)
            meta = read_meta(rev)
            meta.update(format_version=FORMAT_VERSION, model_sha256=file_sha256(rev / MODEL_FILE),
                        train_part_hashes=meta.get("train_part_hashes"))
            (rev / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            load_scorer(rev)  # refuse to migrate what would not load
            _write_pointer(new / LATEST, "0001")
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        retired = root / f".{name}-format1"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(old, retired)
        os.replace(new, old)
        shutil.rmtree(retired, ignore_errors=True)
        done.append(name)
    return done
