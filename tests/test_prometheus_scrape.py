"""A real Prometheus server scrapes the real daemon with deploy/'s scrape settings.

Needs Debian's ``prometheus`` binary (scripts/setup.sh installs it as root); without it the
test skips and says so."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tools.process import free_port

from conftest import RunningDaemon

pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Prometheus server not installed (Debian package prometheus)")
def test_prometheus_scrapes_the_daemon(daemon: RunningDaemon, tmp_path: Path) -> None:
    shipped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = shipped["scrape_configs"][0]
    job["static_configs"] = [{"targets": [daemon.http.removeprefix("http://")]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    cfg = {"global": {"scrape_interval": "1s"}, "rule_files": [str(DEPLOY / "alerts.yml")], "scrape_configs": [job]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        up, ready = [], []
        while time.time() < deadline:
            try:
                up = query(base, f'up{{job="{job["job_name"]}"}}')
                ready = query(base, "inspectd_ready")
                if up and up[0]["value"][1] == "1" and ready:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", (tmp_path / "prometheus.log").read_text()[-2000:]
        assert ready and ready[0]["value"][1] == "1", ready
        assert query(base, "inspectd_build_info")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
