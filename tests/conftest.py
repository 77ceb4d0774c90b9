"""Shared fixtures: an enrolled product and a real daemon process on loopback.

The daemon fixture starts ``inspectd run`` as its own process (with its embedded local Ray),
waits for /readyz, and stops it with SIGTERM at the end of the session, checking that it
exited cleanly. Everything binds to free ports on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
import zmq

from tools.process import DaemonProcess, free_port

PRODUCT = "flange"


@dataclass
class RunningDaemon:
    proc: subprocess.Popen
    ingest: str
    publish: str
    http: str
    root: Path
    config: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(self.http + "/metrics", timeout=5) as r:
            return r.read().decode()

    def subscriber(self, ctx: zmq.Context) -> zmq.Socket:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"verdict/")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.publish)
        time.sleep(0.5)
        return sub


@pytest.fixture(scope="session")
def enrolled_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with PRODUCT enrolled (patchcore-fpfh) and calibrated on simulated good parts."""
    from daemon.config import PreprocessConfig
    from daemon.enrollment import calibrate, enroll
    from sensors.simulated import simulated_parts

    models = tmp_path_factory.mktemp("models")
    good = list(simulated_parts([PRODUCT], 8, 0.0, seed=100, good_only=True))
    enroll(models, PRODUCT, good[:4], "patchcore-fpfh", PreprocessConfig().params(), progress=False)
    calibrate(models, PRODUCT, good[4:], target_frr=0.05, progress=False)  # 4 parts: min_parts(0.05)
    return models


def daemon_config(models: Path, root: Path, **sections: dict) -> dict:
    """A daemon config on free loopback ports, results and maps under ``root``; ``sections`` override."""
    cfg = {
        "ingest": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "queue_size": 8, "max_wait_ms": 20000},
        "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "storage": {
            "results": str(root / "results.sqlite"),
            "maps_dir": str(root / "maps"),
            "maps": "all",
            "models_dir": str(models),
        },
        "ray": {"num_cpus": 2, "object_store_mb": 128},
        "workers": {"actors": 2, "max_inflight_per_actor": 1, "retries": 2, "large_actors": 0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@contextmanager
def launch_daemon(models: Path, root: Path, **sections: dict) -> Iterator[RunningDaemon]:
    """Start ``inspectd run`` on free loopback ports; stop it with SIGTERM and check exit 0."""
    cfg = daemon_config(models, root, **sections)
    http_port = cfg["http"]["port"]
    path = root / "inspectd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    http = f"http://127.0.0.1:{http_port}"
    daemon = DaemonProcess(path, root / "daemon.log", http, ready_timeout=120).start()
    try:
        yield RunningDaemon(daemon.proc, cfg["ingest"]["endpoint"], cfg["publish"]["endpoint"], http, root, path)
    finally:
        code = daemon.stop()
        assert code == 0, daemon.log_tail()


@pytest.fixture(scope="session")
def daemon(enrolled_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """One daemon for the session, serving PRODUCT (2 actors, embedded Ray)."""
    with launch_daemon(enrolled_models, tmp_path_factory.mktemp("daemon")) as d:
        yield d


def receive_verdicts(sub: zmq.Socket, n: int, timeout: float) -> list:
    """Collect ``n`` verdict messages (or fewer if ``timeout`` seconds pass without one)."""
    from sensors.wire import decode_verdict

    out = []
    deadline = time.time() + timeout
    while len(out) < n and time.time() < deadline:
        if sub.poll(200):
            out.append(decode_verdict(sub.recv_multipart()))
            deadline = time.time() + timeout
    return out
