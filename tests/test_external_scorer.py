"""A scorer from another package plugs in through the ``inspectd.scorers`` entry points.

The package is tests/plugins/inspectd_example_scorer (its own pyproject.toml declares
``example-nearest``); ``make setup`` / scripts/setup.sh install it into the test environment.
It is then found by ``inspectd eval``, fitted by ``inspectd enroll`` from the config's
``products.<p>.scorer: {type: example-nearest, ...}`` and served by the daemon, all as separate
processes, as a user would run them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
import zmq

from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts

from conftest import daemon_config, launch_daemon, receive_verdicts

pytestmark = pytest.mark.slow
NAME = "example-nearest"
PRODUCT = "gear"


def inspectd(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    names = {ep.name for ep in entry_points(group="inspectd.scorers")}
    assert NAME in names, ("the example scorer package is not installed in this environment: run `make setup` "
                           "(or pip install -e tests/plugins/inspectd_example_scorer)")


def test_eval_finds_the_external_scorer(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "eval"
    inspectd("synth", str(data), "--layout", "anomaly-shapenet", "--classes", "1", "--seed", "3", "--train", "2",
             "--test-good", "3", "--test-per-defect", "1", "--validation", "0", "--kinds", "bulge,hole",
             "--workers", "1", "--no-progress")
    inspectd("eval", "--dataset", str(data), "--layout", "anomaly-shapenet", "--scorer", NAME, "--out", str(out),
             "--voxel-size", "2", "--scorer-param", "quantile=0.9", "--no-progress")
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == []
    assert report["scorer"] == NAME and report["scorer_params"]["quantile"] == 0.9
    assert 0.0 <= report["mean"]["i_auroc"] <= 1.0


@pytest.mark.timeout(600)  # three CLI processes, then a daemon with its embedded Ray, on a loaded 2-core box
def test_enroll_from_the_config_then_the_daemon_serves_it(tmp_path: Path) -> None:
    models, good = tmp_path / "models", tmp_path / "good"
    inspectd("simulate", str(good), "--product", PRODUCT, "--count", "6", "--seed", "4")
    products = {PRODUCT: {"scorer": {"type": NAME, "quantile": 0.95, "max_reference": 20000}}}
    cfg = daemon_config(models, tmp_path, products=products)
    cfg_path = tmp_path / "enroll.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = inspectd("enroll", "--product", PRODUCT, "--good", str(good), "--holdout", "4", "--target-frr", "0.05",
                   "--config", str(cfg_path), "--models", str(models))
    assert f"({NAME}, 2 good parts)" in out
    revision = (models / PRODUCT / "latest").read_text().strip()
    meta = json.loads((models / PRODUCT / "versions" / revision / "meta.json").read_text())
    assert meta["scorer"] == NAME and meta["params"]["quantile"] == 0.95 and meta["params"]["max_reference"] == 20000

    (tmp_path / "run").mkdir()
    with launch_daemon(models, tmp_path / "run", products=products) as d:
        ctx = zmq.Context()
        sub = d.subscriber(ctx)
        parts = iter(simulated_parts([PRODUCT], 50, 0.0, seed=91, good_only=True))
        with FramePusher(d.ingest) as push:
            for _ in range(3):
                push.send(next(parts))
            verdicts = receive_verdicts(sub, 3, timeout=120)
        ctx.destroy(linger=0)
    headers = [v.header for v in verdicts]
    assert len(headers) == 3
    assert all(h["verdict"] != "error" and h["scorer"] == NAME for h in headers), headers
    log = (tmp_path / "run" / "daemon.log").read_text()
    assert "fitted otherwise" not in log  # the served model is what the config asks for
