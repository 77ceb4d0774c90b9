"""Every Grafana panel and every alert expression, evaluated by a real Prometheus that scraped a
real daemon while it gave pass, review, fail and error verdicts, refused malformed frames,
lost a scoring actor, and a person labelled a review part at the review station's API.

Verdicts are made deterministic by serving one enrolled model under four product names whose
configured thresholds force the outcome (``flange`` keeps its calibrated threshold). The picture
of the panels is written to $INSPECTD_DASHBOARD_PNG when set (docs/dashboard-panels.png is made
that way), else to the test's temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
import zmq

from sensors.frame import Frame
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts
from sensors.wire import decode_verdict
from tools.process import free_port

from conftest import PRODUCT, launch_daemon
from malformed import BAD_MESSAGES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="Prometheus server not installed (Debian package prometheus)"),
]
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
_spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "scripts" / "render_dashboard.py")
rd = sys.modules.setdefault("render_dashboard", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(rd)

FORCED = {  # product → (threshold, review_band) that force its verdict whatever the score
    "flange-pass": (1e9, 0.1),
    "flange-review": (1000.0, 0.99),
    "flange-fail": (1e-9, 0.0),
}
PANELS_MAY_BE_EMPTY: dict[str, str] = {}
"""Panel title → why it may legitimately return nothing here. Empty: the test causes every condition."""
ALERTS_MAY_BE_EMPTY = {
    "InspectdNotReady": ("inspectd_ready", "the daemon stays ready throughout: one of two actors is killed, the other serves"),
    "InspectdQueueNearLimit": (
        "inspectd_queue_depth",
        "the threshold is 0.8 x the default ingest.queue_size 64; the test daemon's queue holds 8",
    ),
    "InspectdLatencyOverBudget": (
        "histogram_quantile(0.99, sum by (job, instance, product, le) (rate(inspectd_latency_seconds_bucket[5m])))",
        "p99 above the 2 s placeholder budget depends on this machine's load; the latency itself must be there",
    ),
    "InspectdDiskSpaceLow": (
        "inspectd_storage_free_bytes / inspectd_storage_size_bytes",
        "this machine's disk is not 90 % full (tests/test_hostile_input.py fills a disk with /dev/full instead)",
    ),
    "InspectdReviewQueueLong": (
        "inspectd_review_queue_parts",
        "the stream leaves 5 review parts waiting; the threshold is 50 (deploy/prometheus/alerts_test.yml fires it)",
    ),
    "InspectdReviewWaitLong": (
        "inspectd_review_oldest_wait_seconds",
        "the oldest review part waits about a minute here; the threshold is 4 h (alerts_test.yml fires it)",
    ),
    "InspectdResultLogFailing": (
        "inspectd_log_failures_total",
        "the log commits here; tests/test_hostile_input.py makes a commit fail and checks the counter",
    ),
}
"""Alert → (probe that must return data, why the alert's own condition may not hold in this test).
InspectdDown is checked after the daemon is stopped."""


def start_prometheus(target: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    shipped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = shipped["scrape_configs"][0]
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(DEPLOY / "alerts.yml")],
           "scrape_configs": [job]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"),  # noqa: SIM115
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_for(base: str, promql: str, timeout: float) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if res := rd.api(base, "query", query=promql):
                return res
        except OSError:
            pass
        time.sleep(0.5)
    return []


def messages() -> list[tuple[str, object]]:
    """The stream: scored parts of every product, parts of a product without a model, malformed messages."""
    clouds = [f for f in simulated_parts([PRODUCT], 6, 0.5, seed=71)]
    frames = [Frame(points=f.valid_points()[::16].copy(), meta=replace(f.meta, sensor_id="line-1")) for f in clouds]
    out: list[tuple[str, object]] = []
    plan = [PRODUCT] * 12 + ["flange-fail"] * 16 + ["flange-review"] * 6 + ["flange-pass"] * 6 + ["gear"] * 4
    for i, product in enumerate(plan):
        f = frames[i % len(frames)]
        sensor = "line-2" if product == "gear" else "line-1"
        out.append(("frame", replace(f, meta=replace(f.meta, product=product, part_id=f"{product}-{i:03d}", seq=i,
                                                      sensor_id=sensor))))
        out.append(("bad", BAD_MESSAGES["header_not_json"]()))  # enough of one reason for InspectdFramesRefused
    out += [("bad", make(f"bad-{reason}")) for reason, make in BAD_MESSAGES.items()]
    return out


def test_every_panel_and_alert_returns_data_from_a_live_prometheus(enrolled_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for product in [PRODUCT, *FORCED]:
        shutil.copytree(enrolled_models / PRODUCT, models / product)
    products = {p: {"threshold": t, "review_band": b} for p, (t, b) in FORCED.items()}
    stream = messages()
    with launch_daemon(models, tmp_path, products=products) as daemon:
        prom, base = start_prometheus(daemon.http.removeprefix("http://"), tmp_path)
        try:
            assert wait_for(base, 'up{job="inspectd"} == 1', 60), (tmp_path / "prometheus.log").read_text()[-2000:]
            start = time.time()
            ctx = zmq.Context()
            sub = daemon.subscriber(ctx)

            def send() -> None:
                with FramePusher(daemon.ingest) as push:
                    for kind, msg in stream:  # a frame is captured when it is sent (older ones are 'overloaded')
                        if kind == "frame":
                            push.send(replace(msg, meta=replace(msg.meta, capture_time=time.time())))
                        else:
                            push.send_parts(msg)
                        time.sleep(0.15)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            verdicts: list[dict] = []
            killed = False
            deadline = time.time() + 150
            while len(verdicts) < len(stream) and time.time() < deadline:
                if sub.poll(200):
                    verdicts.append(decode_verdict(sub.recv_multipart()).header)
                    scored = [v for v in verdicts if v.get("worker_pid")]
                    if not killed and len(scored) >= 8:
                        os.kill(scored[-1]["worker_pid"], signal.SIGKILL)  # an actor dies mid-stream
                        killed = True
            sender.join(timeout=30)
            ctx.destroy(linger=0)
            assert len(verdicts) == len(stream), f"{len(verdicts)} verdicts for {len(stream)} messages"
            assert {v["verdict"] for v in verdicts} == {"pass", "review", "fail", "error"}
            assert killed
            assert wait_for(base, "sum(inspectd_actor_restarts_total) > 0", 30)
            review = next(v for v in verdicts if v["verdict"] == "review")  # a person decides on one part
            req = urllib.request.Request(f"{daemon.http}/v1/review/parts/{review['verdict_id']}/label",
                                         data=b'{"label": "good"}', method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read())["label"] == "good"
            assert wait_for(base, "sum(inspectd_labels_total) > 0", 30)
            time.sleep(3.0)  # two more scrapes
            end = time.time()

            targets = rd.fetch(base, rd.dashboard_targets(), start, end)
            empty = [t.panel for t in targets if not rd.finite_values(t.instant) and t.panel not in PANELS_MAY_BE_EMPTY]
            assert not empty, f"panels without data: {empty}"
            by_panel = {t.panel: t for t in targets}
            assert {s["metric"]["verdict"] for s in by_panel["Throughput by verdict"].instant} >= {
                "pass", "review", "fail", "error"}
            reasons = {s["metric"]["reason"] for s in by_panel["Refused frames by reason"].instant}
            assert reasons >= set(BAD_MESSAGES) | {"unknown_product"}, reasons
            restarts = [t for t in targets if t.legend == "restarts"][0]
            assert max(rd.finite_values(restarts.instant)) > 0
            out = Path(os.environ.get("INSPECTD_DASHBOARD_PNG") or tmp_path / "dashboard-panels.png")
            assert rd.render(targets, out, start).stat().st_size > 10_000

            rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
            fired, explained = [], []
            for rule in rules:
                if rule["alert"] == "InspectdDown":
                    continue
                if rd.api(base, "query", query=rule["expr"], time=end):
                    fired.append(rule["alert"])
                    continue
                assert rule["alert"] in ALERTS_MAY_BE_EMPTY, f"{rule['alert']} returned nothing: {rule['expr']}"
                probe, _why = ALERTS_MAY_BE_EMPTY[rule["alert"]]
                assert rd.finite_values(rd.api(base, "query", query=probe, time=end)), probe
                explained.append(rule["alert"])
            assert {"InspectdHighErrorRate", "InspectdFramesRefused", "InspectdActorRestarts",
                    "InspectdFailRateSpike"} <= set(fired), fired
        except BaseException:
            prom.terminate()
            prom.wait(timeout=30)
            raise
    try:  # the daemon is stopped now: the scrape fails and InspectdDown's expression holds
        down = next(r for r in rules if r["alert"] == "InspectdDown")
        assert wait_for(base, down["expr"], 30), "InspectdDown's expression never held after the daemon stopped"
    finally:
        prom.terminate()
        prom.wait(timeout=30)
    print(f"alerts whose expression held: {fired + ['InspectdDown']}; explained empty: {explained}")
