"""``inspectd calibrate`` through the CLI: reused training parts and too few parts are refused
with their reason and a non-zero exit; other good parts calibrate and report the FRR interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def inspectd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=300)


def test_calibrate_refuses_training_parts_and_accepts_others(tmp_path: Path) -> None:
    models, train, other = tmp_path / "models", tmp_path / "train", tmp_path / "other"
    for folder, seed, count in ((train, "1", "4"), (other, "2", "5")):
        assert inspectd("simulate", str(folder), "--product", "flange", "--count", count, "--seed", seed).returncode == 0
    run = inspectd("enroll", "--product", "flange", "--good", str(train), "--models", str(models))
    assert run.returncode == 0, run.stderr

    reused = inspectd("calibrate", "--product", "flange", "--good", str(train), "--models", str(models),
                      "--target-frr", "0.05")
    assert reused.returncode != 0
    assert "were used to fit the model" in reused.stderr and "calibrate on other good parts" in reused.stderr

    few = inspectd("calibrate", "--product", "flange", "--good", str(other), "--models", str(models))
    assert few.returncode != 0 and "too few" in few.stderr and "at least 9" in few.stderr  # default 1 %, before scoring

    ok = inspectd("calibrate", "--product", "flange", "--good", str(other), "--models", str(models),
                  "--target-frr", "0.05")
    assert ok.returncode == 0, ok.stderr
    assert "expected false-reject rate" in ok.stdout and "95% CI" in ok.stdout and "n=5" in ok.stdout
    rec = json.loads((models / "flange" / "versions" / "0002" / "calibration.json").read_text())
    assert rec["n_good"] == 5 and rec["threshold"] > max(rec["good_scores"]) * 0.9
    assert (models / "flange" / "latest").read_text().strip() == "0002"
