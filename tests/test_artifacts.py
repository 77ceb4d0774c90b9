"""Model artifacts: format version, strict loading, the versioned store, migration, pretrained weights.

Each failure must be a clear error, and nothing may be loaded half-way: a worker that cannot
load a new revision keeps serving the one it had.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.cli import main as inspectd
from daemon.config import PreprocessConfig
from daemon.enrollment import enroll
from sensors.simulated import simulated_parts
from workers.actor import ScoringWorker
from workers.base import META_FILE, MODEL_FILE, ArtifactError
from workers.model_store import (
    CURRENT,
    LATEST,
    check_models_dir,
    enrolled_products,
    load_bundle,
    load_product_model,
    read_bundle,
    read_pointer,
    revision_dir,
    save_product_model,
    switch_current,
    write_calibration,
)
from workers.patchcore import PatchCoreFPFHScorer
from workers.preprocess import PreprocessParams
from workers.registry import load_scorer

PRODUCT = "flange"


def bank_scorer(seed: int) -> PatchCoreFPFHScorer:
    """A patchcore-fpfh scorer with a random memory bank (no fit: these tests are about files)."""
    bank = np.random.default_rng(seed).random((64, 33), dtype=np.float32)
    return PatchCoreFPFHScorer.from_state(PatchCoreFPFHScorer().params(), {"memory_bank": bank})  # type: ignore[return-value]


def store(models: Path, seed: int) -> Path:
    return save_product_model(models, PRODUCT, bank_scorer(seed), PreprocessParams(), f"{seed:064x}", ["h"])


def test_revisions_and_pointers(tmp_path: Path) -> None:
    first = store(tmp_path, 1)
    assert first.name == "0001" and enrolled_products(tmp_path) == [PRODUCT]
    assert read_pointer(tmp_path, PRODUCT, CURRENT) == "0001"  # no daemon yet: current falls back to latest
    switch_current(tmp_path, PRODUCT)
    store(tmp_path, 2)
    cal = write_calibration(tmp_path, PRODUCT, {"threshold": 1.0})
    assert cal.name == "0003" and read_pointer(tmp_path, PRODUCT, LATEST) == "0003"
    assert read_pointer(tmp_path, PRODUCT, CURRENT) == "0001"  # only the daemon moves what is served
    assert (cal / MODEL_FILE).samefile(revision_dir(tmp_path, PRODUCT, "0002") / MODEL_FILE)  # hard link
    assert load_product_model(tmp_path, PRODUCT, CURRENT).revision == "0001"
    assert load_product_model(tmp_path, PRODUCT).calibration == {"threshold": 1.0}


def test_truncated_artifact_is_refused_and_the_worker_keeps_its_model(tmp_path: Path) -> None:
    store(tmp_path, 1)
    switch_current(tmp_path, PRODUCT)
    worker = ScoringWorker(str(tmp_path))
    assert worker.models[PRODUCT].revision == "0001"
    bad = store(tmp_path, 2)
    data = (bad / MODEL_FILE).read_bytes()
    (bad / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="checksum.*truncated"):
        load_scorer(bad)
    switch_current(tmp_path, PRODUCT)
    with pytest.raises(ArtifactError):
        worker.reload(PRODUCT)
    assert worker.models[PRODUCT].revision == "0001"  # the old model still serves
    # a truncated file whose checksum was "fixed" still fails cleanly, in safetensors' parser
    meta = json.loads((bad / META_FILE).read_text())
    from workers.base import file_sha256

    meta["model_sha256"] = file_sha256(bad / MODEL_FILE)
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="cannot be loaded"):
        load_scorer(bad)
    # a worker Ray would restart with current → the broken revision starts, and refuses that product's frames
    restarted = ScoringWorker(str(tmp_path))
    assert PRODUCT not in restarted.models and "ArtifactError" in restarted.failed[PRODUCT]
    frame = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=3, good_only=True)))
    with pytest.raises(RuntimeError, match="failed to load"):
        restarted.score(frame)


def test_a_model_shipped_as_bytes_is_checked_like_a_file(tmp_path: Path) -> None:
    """What reaches an actor through Ray's object store: the same checksum and format checks."""
    store(tmp_path, 1)
    bundle = read_bundle(tmp_path, PRODUCT, CURRENT)
    assert set(bundle["files"]) == {MODEL_FILE, META_FILE} and bundle["revision"] == "0001"
    model = load_bundle(bundle)
    assert model.revision == "0001" and model.model_version == load_product_model(tmp_path, PRODUCT).model_version
    data = bundle["files"][MODEL_FILE]
    cut = {**bundle, "files": {**bundle["files"], MODEL_FILE: data[: len(data) // 2]}}
    with pytest.raises(ArtifactError, match="checksum.*truncated"):
        load_bundle(cut)
    meta = json.loads(bundle["files"][META_FILE])
    newer = {**bundle, "files": {**bundle["files"], META_FILE: json.dumps({**meta, "format_version": 99}).encode()}}
    with pytest.raises(ArtifactError, match="format version 99"):
        load_bundle(newer)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_bundle({**bundle, "files": {**bundle["files"], META_FILE: b"\x80 not json"}})


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    d = store(tmp_path, 1)
    meta = json.loads((d / META_FILE).read_text())
    (d / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99.*newer inspectd"):
        load_scorer(d)
    (d / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    with pytest.raises(ArtifactError, match="format version 1.*inspectd models migrate"):
        load_scorer(d)
    (d / META_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_scorer(d)


def test_old_models_dir_is_refused_with_the_command_then_migrated(tmp_path: Path) -> None:
    old = tmp_path / PRODUCT  # format 1: the artifact directly in the product folder, no version key
    bank_scorer(1).save(old, "ab" * 32, extra={"product": PRODUCT, "preprocess": {}})
    meta = json.loads((old / META_FILE).read_text())
    for key in ("format_version", "model_sha256"):
        del meta[key]
    (old / META_FILE).write_text(json.dumps(meta))
    (old / "calibration.json").write_text(json.dumps({"threshold": 2.0}))
    with pytest.raises(ArtifactError, match=f"inspectd models migrate {tmp_path}"):
        check_models_dir(tmp_path)
    with pytest.raises(ArtifactError, match="migrate"):
        load_product_model(tmp_path, PRODUCT)
    assert inspectd(["models", "list", str(tmp_path)]) == 1
    assert inspectd(["models", "migrate", str(tmp_path)]) == 0
    check_models_dir(tmp_path)
    model = load_product_model(tmp_path, PRODUCT)
    assert model.revision == "0001" and model.calibration == {"threshold": 2.0}
    assert model.meta["train_part_hashes"] is None  # unknown for an old model
    assert inspectd(["models", "list", str(tmp_path)]) == 0


def test_missing_pretrained_weights_refused_at_enroll(tmp_path: Path) -> None:
    frames = list(simulated_parts([PRODUCT], 2, 0.0, seed=5, good_only=True))
    params = {"pretrained": str(tmp_path / "missing.safetensors")}
    with pytest.raises(ValueError, match="no pretrained weights.*--allow-random-init"):
        enroll(tmp_path / "models", PRODUCT, frames, "imrnet", PreprocessConfig().params(), params, progress=False)
    assert enrolled_products(tmp_path / "models") == []  # nothing written
    assert not list((tmp_path / "models").glob(f"{PRODUCT}/versions/*"))

