"""Serving history, shadow pointer and shadow scoring, without a daemon: what rollback walks
back, what a restart serves, what a worker returns for a shadow, and what the report says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.decision import Thresholds
from daemon.metrics import DaemonMetrics
from daemon.resultlog import LogReader, ResultLog
from daemon.shadow import judge_shadow, shadow_report
from sensors.simulated import simulated_parts
from workers.actor import ScoringWorker
from workers.base import MODEL_FILE
from workers.model_store import CURRENT, read_pointer, revision_dir, save_product_model
from workers.model_versions import (
    HISTORY_FILE,
    clear_shadow,
    read_shadow,
    roll_back,
    rollback_target,
    serve,
    served_stack,
    set_shadow,
    start_revision,
)
from workers.patchcore import PatchCoreFPFHScorer
from workers.preprocess import PreprocessParams

PRODUCT = "flange"


def store(models: Path, seed: int, threshold: float | None = None) -> str:
    bank = np.random.default_rng(seed).random((64, 33), dtype=np.float32)
    scorer = PatchCoreFPFHScorer.from_state(PatchCoreFPFHScorer().params(), {"memory_bank": bank})
    cal = {"threshold": threshold, "normalization": {"center": 0.1, "scale": 0.05}} if threshold else None
    return save_product_model(models, PRODUCT, scorer, PreprocessParams(), f"{seed:064x}", ["h"], cal).name


def test_history_rollback_and_restart(tmp_path: Path) -> None:
    r1 = store(tmp_path, 1)
    assert start_revision(tmp_path, PRODUCT) == r1  # first start: the newest
    assert rollback_target(tmp_path, PRODUCT) is None
    with pytest.raises(LookupError):
        roll_back(tmp_path, PRODUCT)
    r2 = store(tmp_path, 2)
    assert start_revision(tmp_path, PRODUCT) == r2  # a new revision enrolled offline serves at the next start
    r3 = store(tmp_path, 3)
    serve(tmp_path, PRODUCT, action="reload")
    assert served_stack(tmp_path, PRODUCT) == [r1, r2, r3]
    assert roll_back(tmp_path, PRODUCT) == r2 and roll_back(tmp_path, PRODUCT) == r1  # two back, in order
    assert read_pointer(tmp_path, PRODUCT, CURRENT) == r1
    assert start_revision(tmp_path, PRODUCT) == r1  # a restart does not undo the rollbacks
    assert rollback_target(tmp_path, PRODUCT) is None
    actions = [json.loads(x)["action"] for x in (tmp_path / PRODUCT / HISTORY_FILE).read_text().splitlines()]
    assert actions.count("rollback") == 2


def test_history_starts_from_a_folder_served_before_it_existed(tmp_path: Path) -> None:
    r1 = store(tmp_path, 1)
    (tmp_path / PRODUCT / CURRENT).write_text(r1 + "\n")  # served by a daemon that kept no history
    r2 = store(tmp_path, 2)
    assert start_revision(tmp_path, PRODUCT) == r2
    assert rollback_target(tmp_path, PRODUCT) == r1


def test_shadow_pointer_is_not_promoted_by_a_restart(tmp_path: Path) -> None:
    r1 = store(tmp_path, 1)
    start_revision(tmp_path, PRODUCT)
    with pytest.raises(ValueError, match="serving"):
        set_shadow(tmp_path, PRODUCT, r1)
    r2 = store(tmp_path, 2)
    assert set_shadow(tmp_path, PRODUCT) == r2 and read_shadow(tmp_path, PRODUCT) == r2
    assert start_revision(tmp_path, PRODUCT) == r1  # the newest is the shadow: it does not serve
    serve(tmp_path, PRODUCT, r2, action="promote")
    assert read_shadow(tmp_path, PRODUCT) is None  # promoted: no longer a shadow
    assert roll_back(tmp_path, PRODUCT) == r1
    assert start_revision(tmp_path, PRODUCT) == r1
    clear_shadow(tmp_path, PRODUCT)  # no error without one


def test_worker_scores_the_shadow_after_the_live_model(tmp_path: Path) -> None:
    r1 = store(tmp_path, 1, threshold=0.3)
    start_revision(tmp_path, PRODUCT)
    r2 = store(tmp_path, 2, threshold=0.2)
    set_shadow(tmp_path, PRODUCT, r2)
    worker = ScoringWorker(str(tmp_path))
    assert worker.shadows[PRODUCT].revision == r2 and worker.models[PRODUCT].revision == r1
    frame = next(iter(simulated_parts([PRODUCT], 1, 0.0, seed=5, good_only=True)))
    out = worker.score(frame)
    assert out["model_revision"] == r1 and out["threshold"] == 0.3  # the live result is the live model's
    s = out["shadow"]
    assert s["model_revision"] == r2 and s["threshold"] == 0.2 and s["error"] is None and s["object_score"] >= 0

    def boom(cloud: object) -> None:
        raise RuntimeError("shadow broke")

    worker.shadows[PRODUCT].scorer.score = boom  # a shadow failing on a frame: recorded, live result intact
    failed = worker.score(frame)
    assert failed["shadow"]["error"] == "RuntimeError: shadow broke" and failed["shadow"]["object_score"] is None
    assert failed["object_score"] == out["object_score"] and failed["model_revision"] == r1
    clear_shadow(tmp_path, PRODUCT)
    assert worker.reload(PRODUCT)["shadow_revision"] is None and worker.score(frame)["shadow"] is None

    r3 = store(tmp_path, 3)  # a broken shadow: dropped and named, the live model untouched
    (revision_dir(tmp_path, PRODUCT, r3) / MODEL_FILE).write_bytes(b"broken")
    set_shadow(tmp_path, PRODUCT, r3)
    reply = worker.reload(PRODUCT)
    assert reply["shadow_revision"] is None and "ArtifactError" in reply["shadow_error"]
    assert reply["model_revision"] == r1 and worker.score(frame)["shadow"] is None


def test_judge_record_and_report(tmp_path: Path) -> None:
    metrics = DaemonMetrics("t", products=[PRODUCT])
    log = ResultLog(tmp_path / "r.sqlite")
    t = Thresholds(1.0, 0.1, 0.0)  # pass below 0.9, fail from 1.1
    for i, (live_verdict, shadow_score) in enumerate([("pass", 0.5), ("pass", 2.0), ("fail", 3.0), ("pass", None)]):
        live = {"product": PRODUCT, "part_id": f"p{i}", "verdict": live_verdict, "score": 0.5,
                "model_version": "a", "model_revision": "0001", "score_normalized": 0.0}
        shadow = {"object_score": shadow_score, "model_version": "b", "model_revision": "0002", "threshold": 1.0,
                  "normalization": {"center": 0.0, "scale": 0.5},
                  "error": None if shadow_score is not None else "RuntimeError: boom"}
        row = judge_shadow(shadow, live, lambda cal: t, metrics)
        log.append_shadow({**row, "verdict_id": i + 1, "decided_at": float(i)})
    reader = LogReader(tmp_path / "r.sqlite")
    report = shadow_report(reader, PRODUCT, {"revision": "0001", "version": "a"}, {"revision": "0002", "version": "b"})
    assert report["n"] == 3 and report["agreement"] == pytest.approx(2 / 3) and report["shadow_errors"] == 1
    assert [d["part_id"] for d in report["disagreements"]] == ["p1"]
    assert report["disagreements"][0]["shadow_verdict"] == "fail"
    assert report["scores"]["shadow"]["n"] == 3
    text = metrics.render().decode()
    assert 'inspectd_shadow_agreement_total{agree="yes",product="flange"} 2.0' in text
    assert 'inspectd_shadow_errors_total{product="flange"} 1.0' in text
    empty = shadow_report(reader, PRODUCT, {"revision": "0003", "version": "c"}, {"revision": "0002", "version": "b"})
    assert empty["n"] == 0 and empty["agreement"] is None
    reader.close()
    log.close()
