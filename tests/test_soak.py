"""Soak: a long run of small frames through a real daemon; its RSS and open file descriptors
must be flat after warm-up. The frames are small (a 128 x 128 camera) so that the run is cheap;
every one writes its map files (``storage.maps: all``) under a small retention budget, so file
writing and pruning are part of it.

``INSPECTD_SOAK_FRAMES`` sets the count (CI: 300; the release check runs 2000), and
``INSPECTD_SOAK_OUT`` a path for the figures as JSON (also printed)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from procstats import log_rows, open_fds, rss_mb, wait_rows

from sensors.publisher import FramePusher
from sensors.simcam import CameraParams
from sensors.simulated import simulated_parts

from conftest import PRODUCT, launch_daemon

FRAMES = int(os.environ.get("INSPECTD_SOAK_FRAMES", "300"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 + FRAMES)]  # a loaded 2-core machine: ~2 frames/s
RSS_DRIFT_MB = 40.0
FD_DRIFT = 4


def test_soak_rss_and_fds_flat(enrolled_models: Path, tmp_path: Path) -> None:
    camera = CameraParams(width=128, height=128)
    frames = list(simulated_parts([PRODUCT], 50, 0.1, seed=70, camera=camera))
    samples: list[dict] = []
    sections = {"storage": {"maps": "all", "maps_max_mb": 2}, "ingest": {"max_age_ms": 600_000}}
    t0 = time.monotonic()
    with launch_daemon(enrolled_models, tmp_path, **sections) as d:
        db = tmp_path / "results.sqlite"
        with FramePusher(d.ingest) as push:
            for i in range(FRAMES):
                f = frames[i % len(frames)]
                push.send(replace(f, meta=replace(f.meta, part_id=f"soak-{i}", seq=i, capture_time=time.time())))
                if (i + 1) % max(1, FRAMES // 10) == 0:
                    wait_rows(db, i + 1, timeout=60)
                    samples.append({"frames": i + 1, "rss_mb": round(rss_mb(d.proc.pid), 1),
                                    "fds": open_fds(d.proc.pid), "s": round(time.monotonic() - t0, 1)})
        rows = wait_rows(db, FRAMES, timeout=60)
        errors = log_rows(db, "verdict = 'error'")
        maps_mb = sum(p.stat().st_size for p in (tmp_path / "maps").rglob("*") if p.is_file()) / 2**20
    warm = samples[len(samples) // 4]
    last = samples[-1]
    figures = {"frames": FRAMES, "rows": rows, "errors": errors, "camera": "128x128", "maps_mb_at_end": round(maps_mb, 2),
               "rss_drift_mb": round(last["rss_mb"] - warm["rss_mb"], 1), "fd_drift": last["fds"] - warm["fds"],
               "samples": samples}
    print("soak:", json.dumps(figures))
    if os.environ.get("INSPECTD_SOAK_OUT"):
        Path(os.environ["INSPECTD_SOAK_OUT"]).parent.mkdir(parents=True, exist_ok=True)
        Path(os.environ["INSPECTD_SOAK_OUT"]).write_text(json.dumps(figures, indent=1) + "\n")
    assert rows == FRAMES and errors == 0
    assert abs(figures["rss_drift_mb"]) < RSS_DRIFT_MB
    assert abs(figures["fd_drift"]) <= FD_DRIFT
    assert maps_mb <= 2.0  # retention held the budget
