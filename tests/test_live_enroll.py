"""A product enrolled live survives an actor restart: a Ray-restarted actor loads the revision
the daemon switched to, so every verdict comes from the new model, the same on every actor.

Real processes throughout: the daemon with its embedded Ray, the ``inspectd`` CLI, SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts

from conftest import launch_daemon, receive_verdicts

pytestmark = pytest.mark.slow
NEW = "gear"


def inspectd(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_live_enroll_then_actor_kill_serves_the_new_model_everywhere(enrolled_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(enrolled_models, models)  # the session's models stay as they are
    good = tmp_path / "good"
    inspectd("simulate", str(good), "--product", NEW, "--count", "8", "--seed", "3")
    with launch_daemon(models, tmp_path) as d:
        ctx = zmq.Context()
        sub = d.subscriber(ctx)
        out = inspectd("enroll", "--product", NEW, "--good", str(good), "--holdout", "4", "--target-frr", "0.05", "--scorer", "patchcore-fpfh",
                       "--models", str(models), "--notify", d.http)
        assert "daemon now serves" in out
        enrolled_version = out.split(" with model ")[1].split()[0]
        served = (models / NEW / "current").read_text().strip()

        parts = iter(simulated_parts([NEW], 200, 0.0, seed=90, good_only=True))
        verdicts = []
        with FramePusher(d.ingest) as push:
            for _ in range(4):
                push.send(next(parts))
            verdicts += receive_verdicts(sub, 4, timeout=60)
            before = {v.header["worker_pid"] for v in verdicts}
            victim = sorted(before)[0]
            os.kill(victim, signal.SIGKILL)  # Ray restarts it with its original constructor arguments
            after: list = []
            deadline = time.time() + 120
            while time.time() < deadline:  # until the restarted actor has scored parts of the new product
                for _ in range(2):
                    push.send(next(parts))
                after += receive_verdicts(sub, 2, timeout=60)
                if any(v.header["worker_pid"] not in before for v in after) and len(after) >= 6:
                    break
        ctx.destroy(linger=0)

    headers = [v.header for v in verdicts + after]
    late = [v.header for v in after]
    assert all(h["verdict"] != "error" for h in headers), [h["error"] for h in headers if h["error"]]
    assert {h["worker_pid"] for h in late} - before, "the restarted actor scored no part"
    assert all(not h["zero_shot"] and h["scorer"] == "patchcore-fpfh" for h in headers)
    assert {h["model_version"] for h in headers} == {enrolled_version}
    assert {h["model_revision"] for h in headers} == {served}
    assert victim not in {h["worker_pid"] for h in late[-2:]}
