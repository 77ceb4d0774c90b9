"""Operator labels as data (the labels table and the label store's files), the review queue's
reads of a real result log, and the live feed's bound: a client that never reads costs the
emitter nothing and is told to resync."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.labels import Label, LabelStore
from daemon.resultlog import ResultLog
from daemon.review.feed import Feed
from daemon.review.queries import ReviewQueries


def header(i: int, verdict: str, product: str = "flange", zero_shot: bool = False, score: float = 1.0) -> dict:
    now = time.time()
    return {"part_id": f"{product}-{i}", "product": product, "sensor_id": "s1", "seq": i, "verdict": verdict,
            "score": score, "threshold": 2.0, "scorer": "patchcore-fpfh", "model_version": "m1", "zero_shot": zero_shot,
            "received_at": now - 1, "decided_at": now - 100 + i, "map_path": None}


def label(part_id: str, lab: str = "good", **kw: object) -> Label:
    fields = {"product": "flange", "part_id": part_id, "sensor_id": "s1", "seq": 1, "label": lab, "kind": None,
              "region": None, "user": "operator", "at": time.time(), "model_version": "m1", "object_score": 1.5}
    return Label(**{**fields, **kw})


def test_store_layout_list_export_and_correction(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "results.sqlite")
    store = LabelStore(tmp_path / "results.sqlite", tmp_path / "labels")
    pts = np.arange(30, dtype=np.float32).reshape(10, 3) + 1
    pts[3] = np.nan  # an invalid point is not stored; the mask stays aligned with the stored points
    stored = store.add(label("p-1", "defective", kind="dent", region=[2, 3, 4]), pts, verdict_id=log.append(header(1, "review")))
    npz = tmp_path / "labels" / "flange" / "defective" / "p-1.npz"
    assert stored.scan == str(npz.resolve())
    with np.load(npz) as z:
        assert z["points"].dtype == np.float32 and z["points"].shape == (9, 3)
        assert z["mask"].tolist() == [False, False, True, True, False, False, False, False, False]
    meta = json.loads(npz.with_suffix(".json").read_text())
    assert meta["label"] == "defective" and meta["kind"] == "dent" and meta["region"] == [2, 3, 4]
    assert meta["user"] == "operator" and meta["scan"] == stored.scan

    store.add(label("p-1", "good"), pts)  # a correction: the files move, both decisions stay in the table
    assert not npz.exists() and (tmp_path / "labels" / "flange" / "good" / "p-1.npz").exists()
    assert [x.label for x in store.list()] == ["defective", "good"]
    assert [x.part_id for x in store.list(label="defective")] == ["p-1"]
    assert store.list(product="gear") == [] and store.list(since=time.time() + 10) == []
    lines = store.export("jsonl").splitlines()
    assert [json.loads(x)["label"] for x in lines] == ["defective", "good"]
    csv = store.export("csv").splitlines()
    assert csv[0].startswith("product,part_id") and len(csv) == 3 and '"[2, 3, 4]"' in csv[1]

    for bad in (label("p-2", "broken"), label("../x"), label("p-2", "good", kind="dent"),
                label("p-2", "defective", region=[-1])):
        with pytest.raises(ValueError):
            store.add(bad, pts)
    with pytest.raises(ValueError, match="outside"):
        store.add(label("p-2", "defective", region=[10]), pts)
    store.close()
    log.close()


def test_queue_history_and_product_figures(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    log = ResultLog(db)
    store = LabelStore(db, tmp_path / "labels")
    ids = [log.append(header(0, "pass", score=0.5)), log.append(header(1, "review", score=1.9)),
           log.append(header(2, "pass", "washer", zero_shot=True)), log.append(header(3, "fail", score=3.0)),
           log.append(header(4, "review", score=2.1))]
    q = ReviewQueries(db)
    items, waiting = q.queue(time.time())
    assert [x["verdict_id"] for x in items] == [ids[1], ids[2], ids[4]] and waiting == 3  # cold start included
    assert q.queue(time.time(), product="washer")[1] == 1
    pts = np.ones((5, 3), np.float32)
    store.add(label("flange-1", "good"), pts, verdict_id=ids[1])
    store.add(label("flange-0", "defective", kind="crack"), pts, verdict_id=ids[0])  # an escape found downstream
    store.add(label("flange-3", "good"), pts, verdict_id=ids[3])  # a false reject
    assert q.queue(time.time())[1] == 2
    assert set(q.waiting(time.time())) == {"flange", "washer"}
    hist = q.history(product="flange")
    assert [x["verdict_id"] for x in hist] == [ids[4], ids[3], ids[1], ids[0]]
    assert hist[1]["label"]["label"] == "good" and hist[0]["label"] is None
    assert [x["verdict_id"] for x in q.history(verdict="review", part_id="lange-")] == [ids[4], ids[1]]
    p = q.product("flange", time.time())
    assert p["counts"] == {"pass": 1, "review": 2, "fail": 1, "error": 0}
    assert p["labelled"] == {"good": 2, "defective": 1}
    assert p["false_reject"]["k"] == 1 and p["false_reject"]["n"] == 2
    lo, hi = p["false_reject"]["ci95"]
    assert 0 < lo < 0.5 < hi < 1
    assert p["escape"] == {"k": 1, "n": 1, "rate": 1.0, "ci95": [pytest.approx(0.025), 1.0]}
    assert sum(p["histogram"]["good"]) == 2 and sum(p["histogram"]["defective"]) == 1
    assert q.latest_for_part("flange", "flange-3") == ids[3]
    q.close()
    store.close()
    log.close()


def test_feed_bounds_a_client_that_does_not_read() -> None:
    async def run() -> None:
        feed = Feed(max_clients=2, per_client=4)
        loop = asyncio.get_running_loop()
        slow, fast = feed.subscribe(loop), feed.subscribe(loop)
        assert slow is not None and fast is not None and feed.subscribe(loop) is None  # bounded clients
        t0 = time.perf_counter()
        for i in range(3):
            feed.publish(header(i, "review"))
        got, resync = await fast.take(1.0)
        assert [x["part_id"] for x in got] == ["flange-0", "flange-1", "flange-2"] and not resync
        for i in range(3, 1000):
            feed.publish(header(i, "review"))  # the slow client never reads
        publish_time = time.perf_counter() - t0
        assert len(slow.items) <= 4 and len(fast.items) <= 4  # the buffers never grow past their bound
        got, resync = await slow.take(1.0)
        assert resync and len(got) <= 4
        feed.unsubscribe(slow)
        assert feed.clients == 1 and publish_time < 5.0

    asyncio.run(run())


def test_labels_cli(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    log = ResultLog(db)
    store = LabelStore(db, tmp_path / "labels")
    store.add(label("p-9", "defective", kind="hole"), np.ones((4, 3), np.float32), verdict_id=log.append(header(9, "review")))
    store.close()
    log.close()

    def inspectd(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "daemon.cli", "labels", *args, "--log", str(db)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout

    listed = inspectd("list", "--label", "defective")
    assert "p-9" in listed and "hole" in listed
    out = tmp_path / "labels.csv"
    inspectd("export", "--format", "csv", "--out", str(out))
    assert out.read_text().splitlines()[1].startswith("flange,p-9,s1,1,defective,hole")


def test_region_runs_expand_and_are_bounded() -> None:
    from daemon.review.api import MAX_REGION, region_of

    assert region_of({"region_runs": [[10, 3], [2, 1]], "region": [11, 40]}) == [2, 10, 11, 12, 40]
    assert region_of({}) is None and region_of({"region": []}) is None
    for bad in ({"region_runs": [[1, -1]]}, {"region_runs": [[1]]}, {"region_runs": "1-3"},
                {"region_runs": [[0, MAX_REGION + 1]]}, {"region": "0,1"}):
        assert isinstance(region_of(bad), str), bad
