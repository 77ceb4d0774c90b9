"""Safe model updates end to end: a second model version enrolled with ``--shadow`` while a
sensor streams scores beside the live one without deciding; ``promote`` then ``rollback``
switch what decides, live. Every frame gets exactly one verdict throughout, each naming the
revision that decided it.

Real parts throughout: the daemon process with its embedded Ray, ZeroMQ on loopback, the
``inspectd`` CLI (run in this process, to save its start-up) talking to the daemon's HTTP API."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq

from daemon.cli import main
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts
from sensors.wire import decode_verdict

from conftest import PRODUCT, launch_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RATE_HZ = 1.5


def inspectd(*args: str) -> str:
    """Run the ``inspectd`` command line; its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Line:
    """A sensor streaming at RATE_HZ and a subscriber collecting verdicts, each in its own thread."""

    def __init__(self, ingest: str, publish: str) -> None:
        self.ctx = zmq.Context()
        self.sent: dict[str, float] = {}
        self.verdicts: list[dict] = []
        self.stop_sending = threading.Event()
        self.stop_receiving = threading.Event()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"verdict/")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(publish)
        time.sleep(0.5)
        self.threads = [threading.Thread(target=self._send, args=(ingest,)), threading.Thread(target=self._receive)]
        for t in self.threads:
            t.start()

    def _send(self, ingest: str) -> None:
        parts = simulated_parts([PRODUCT], 10_000, 0.3, seed=77)
        with FramePusher(ingest) as push:
            while not self.stop_sending.is_set():
                frame = next(parts)
                push.send(frame)
                self.sent[frame.meta.part_id] = time.time()
                time.sleep(1.0 / RATE_HZ)

    def _receive(self) -> None:
        while not self.stop_receiving.is_set():
            if self.sub.poll(100):
                self.verdicts.append(decode_verdict(self.sub.recv_multipart()).header)

    def after(self, t: float) -> list[dict]:
        """Verdicts of the frames sent after ``t``."""
        return [v for v in self.verdicts if self.sent.get(v["part_id"], 0.0) > t]

    def wait_for(self, n: int, t: float, timeout: float = 60.0) -> list[dict]:
        """Wait until ``n`` frames sent after ``t`` have their verdicts; returns those verdicts."""
        deadline = time.time() + timeout
        while len(self.after(t)) < n and time.time() < deadline:
            time.sleep(0.2)
        return self.after(t)

    def finish(self, timeout: float = 60.0) -> None:
        self.stop_sending.set()
        self.threads[0].join()
        deadline = time.time() + timeout
        while len({v["part_id"] for v in self.verdicts}) < len(self.sent) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # a duplicate verdict would arrive now
        self.stop_receiving.set()
        self.threads[1].join()
        self.ctx.destroy(linger=0)


def test_shadow_promote_rollback_while_streaming(enrolled_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(enrolled_models, models)
    good = tmp_path / "good"
    inspectd("simulate", str(good), "--product", PRODUCT, "--count", "6", "--seed", "41")
    with launch_daemon(models, tmp_path) as d:
        live = (models / PRODUCT / "current").read_text().strip()
        line = Line(d.ingest, d.publish)
        try:
            first = line.wait_for(2, 0.0)
            assert {v["model_revision"] for v in first} == {live}

            out = inspectd("enroll", "--product", PRODUCT, "--good", str(good), "--holdout", "4", "--target-frr",
                           "0.05", "--scorer", "patchcore-fpfh", "--models", str(models), "--notify", d.http, "--shadow")
            shadow = out.split("(revision ")[1].split(")")[0]
            t_shadow = time.time()
            assert shadow != live and "daemon scores" in out
            shadowed = line.wait_for(4, t_shadow)
            assert {v["model_revision"] for v in shadowed} == {live}  # the shadow never decides
            assert all("shadow" in v["stage_ms"] for v in shadowed)  # its cost, measured per verdict
            deadline = time.time() + 30
            while (report := get_json(f"{d.http}/v1/shadow?product={PRODUCT}")[1]).get("n", 0) < 3:
                assert time.time() < deadline, report
                time.sleep(0.5)
            assert report["live_revision"] == live and report["shadow_revision"] == shadow
            assert 0.0 <= report["agreement"] <= 1.0 and report["scores"]["shadow"]["n"] >= 3
            assert "inspectd_shadow_agreement_total" in d.metrics()

            out = inspectd("promote", "--product", PRODUCT, "--daemon", d.http)
            t_promote = time.time()
            assert f"(revision {shadow})" in out
            promoted = line.wait_for(3, t_promote)
            assert {v["model_revision"] for v in promoted} == {shadow}
            assert not any("shadow" in v["stage_ms"] for v in promoted)
            assert get_json(f"{d.http}/v1/shadow?product={PRODUCT}")[0] == 404  # promoted: no shadow left

            out = inspectd("rollback", "--product", PRODUCT, "--daemon", d.http)
            t_back = time.time()
            assert f"(revision {live})" in out
            back = line.wait_for(3, t_back)
            assert {v["model_revision"] for v in back} == {live}

            # refused switches change nothing: nothing left to roll back to, a shadow that cannot load
            assert main(["rollback", "--product", PRODUCT, "--daemon", d.http]) == 2
            broken = models / PRODUCT / "versions" / "0099"
            shutil.copytree(models / PRODUCT / "versions" / live, broken)
            (broken / "model.safetensors").write_bytes(b"truncated")
            assert main(["shadow", "start", "--product", PRODUCT, "--revision", "0099", "--daemon", d.http]) == 2
            assert not (models / PRODUCT / "shadow").exists()
            assert main(["promote", "--product", PRODUCT, "--daemon", d.http]) == 2  # no shadow to promote
            assert main(["shadow", "stop", "--product", PRODUCT, "--daemon", d.http]) == 2
            assert get_json(f"{d.http}/v1/shadow?product={PRODUCT}")[0] == 404
            t_refused = time.time()
            assert {v["model_revision"] for v in line.wait_for(2, t_refused)} == {live}
        finally:
            line.finish()

    headers = line.verdicts
    ids = [v["part_id"] for v in headers]
    assert sorted(ids) == sorted(line.sent), "every frame sent gets exactly one verdict"
    assert all(v["verdict"] != "error" for v in headers), [v["error"] for v in headers if v["error"]]
    assert {v["model_revision"] for v in headers} == {live, shadow}
    assert all(v["model_version"] for v in headers)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        rows = db.execute("SELECT v.part_id, json_extract(v.header_json, '$.model_revision'), s.live_revision, s.shadow_revision, s.live_verdict,"
                          " v.verdict FROM shadow_scores s JOIN verdicts v ON v.id = s.verdict_id").fetchall()
    assert len(rows) >= 3
    assert all(r[1] == r[2] == live and r[3] == shadow and r[4] == r[5] for r in rows)  # recorded beside the live verdict
    assert inspectd("models", "list", str(models)).strip() == f"{PRODUCT}: latest {shadow}, served {live}"
