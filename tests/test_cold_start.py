"""Cold start: a product with no model, configured for cold start, gets zero-shot verdicts
(review unless it opted in to pass / fail); any other unknown name gets ``unknown_product``. An
operator marks good parts; ``inspectd enroll --notify`` switches the product to a trained model
while a sensor streams, and no frame is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

from sensors.frame import Frame
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts
from sensors.wire import decode_verdict

from conftest import launch_daemon, receive_verdicts

pytestmark = pytest.mark.slow
NEW = "washer"  # the product that arrives without a model
COLD_START_SCORER = "zeroshot"  # 3DzAL, fitted on the other products only


def inspectd(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def cold_start_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding only the cold-start model, fitted and calibrated on other products."""
    root = tmp_path_factory.mktemp("cold")
    for product in ("gear", "nut"):
        inspectd("simulate", str(root / "aux" / product), "--product", product, "--count", "4", "--seed", "5")
    inspectd("enroll", "--cold-start", "--scorer", COLD_START_SCORER, "--good", str(root / "aux" / "gear"),
             "--good", str(root / "aux" / "nut"), "--holdout", "3", "--target-frr", "0.1", "--models", str(root / "models"))
    return root / "models"


def test_cold_start_routing_and_review_verdicts(cold_start_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(cold_start_models, models)
    with launch_daemon(models, tmp_path, products={NEW: {}},
                       cold_start={"products": ["bolt-*"], "pass_fail": ["bolt-a"]}) as d:
        ctx = zmq.Context()
        sub = d.subscriber(ctx)
        names = [NEW, "wahser", "bolt-a", "bolt-b"]  # configured, misspelled, opted in, pattern only
        washers = simulated_parts([NEW], len(names), 0.0, seed=3, good_only=True)
        with FramePusher(d.ingest) as push:
            for name, f in zip(names, washers, strict=True):  # washer scans sent under each name
                push.send(Frame(points=f.points, meta=replace(f.meta, product=name), rgb=f.rgb))
        got = {v.header["product"]: v.header for v in receive_verdicts(sub, len(names), timeout=90)}
        ctx.destroy(linger=0)
    assert set(got) == set(names)
    assert got["wahser"]["verdict"] == "error" and got["wahser"]["error"]["reason"] == "unknown_product"
    assert "not configured for cold start" in got["wahser"]["error"]["detail"]
    for name in (NEW, "bolt-b"):  # not opted in to pass / fail: a person decides, with the map
        h = got[name]
        assert h["zero_shot"] and h["verdict"] == "review" and h["map_path"], h
    h = got["bolt-a"]  # opted in: decided by the calibrated thresholds
    assert h["zero_shot"] and h["verdict"] == ("pass" if h["score"] < h["review_low"] else
                                               "fail" if h["score"] >= h["fail_from"] else "review")


def test_cold_start_to_enrolled_without_losing_a_frame(cold_start_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(cold_start_models, models)
    collect = tmp_path / "collected"
    with launch_daemon(models, tmp_path, cold_start={"collect_dir": str(collect), "products": [NEW]}) as d:
        ctx = zmq.Context()
        sub = d.subscriber(ctx)
        sensor = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "sensor", "sim", "--endpoint", d.ingest, "--products", NEW,
             "--parts", "300", "--defect-rate", "0", "--seed", "41", "--rate", "0.8"],
            stdout=subprocess.PIPE, text=True,
        )
        verdicts = receive_verdicts(sub, 6, timeout=60)
        assert len(verdicts) == 6
        assert all(v.header["verdict"] != "error" for v in verdicts), [v.header["error"] for v in verdicts]
        assert all(v.header["zero_shot"] and v.header["scorer"] == COLD_START_SCORER for v in verdicts)
        assert all(v.header["verdict"] == "review" for v in verdicts)  # cold start does not pass or fail parts
        with urllib.request.urlopen(d.http + "/v1/products", timeout=5) as r:
            assert NEW in json.loads(r.read())["held_cold_start"]

        ids = [v.header["part_id"] for v in verdicts]
        out = inspectd("mark-good", "--product", NEW, "--daemon", d.http, *sum((["--part-id", i] for i in ids), []))
        assert out.count("marked good") == 6
        out = inspectd("enroll", "--product", NEW, "--good", str(collect / NEW / "good"), "--holdout", "3",
                       "--target-frr", "0.1", "--scorer", "patchcore-fpfh", "--models", str(models), "--notify", d.http)
        assert "daemon now serves" in out
        assert sensor.poll() is None, "the stream ended before the switch: slow it down"
        time.sleep(2.0)  # the sensor keeps streaming across the switch
        sensor.terminate()  # stops between frames and reports how many it sent

        with FramePusher(d.ingest) as push:  # parts sent after the switch returned
            for f in simulated_parts([NEW], 2, 0.0, seed=77, good_only=True):
                push.send(f)
        sent = json.loads(sensor.communicate(timeout=120)[0].strip().splitlines()[-1])["sent"] + 2
        deadline = time.time() + 60
        while len(verdicts) < sent and time.time() < deadline:
            if sub.poll(200):
                verdicts.append(decode_verdict(sub.recv_multipart()))
        ctx.destroy(linger=0)

    assert len(verdicts) == sent  # lost = 0
    assert len({v.header["part_id"] for v in verdicts}) == sent
    assert all(v.header["verdict"] != "error" for v in verdicts), [v.header["error"] for v in verdicts if v.header["error"]]
    trained = [v.header for v in verdicts if not v.header["zero_shot"]]
    assert trained and all(h["scorer"] == "patchcore-fpfh" for h in trained)
    assert {h["part_id"] for h in trained} >= {f"{NEW}-77-{i:05d}" for i in range(2)}
    assert {h["model_version"] for h in trained}.isdisjoint({v.header["model_version"] for v in verdicts[:6]})
