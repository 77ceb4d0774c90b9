"""Checks for the deployment files under deploy/: they parse, they only query metrics the daemon
exports, and Prometheus' own tool accepts them (when promtool, Debian package prometheus, is installed).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "inspectd-dashboard.json"
PROM_DIR = DEPLOY / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
UNIT = DEPLOY / "systemd" / "inspectd.service"
COMPOSE = DEPLOY / "container" / "compose.yaml"

# The metrics inspectd exports (names as exposed, without the histogram series suffixes).
COUNTERS = {
    "inspectd_frames_received_total",
    "inspectd_frames_refused_total",
    "inspectd_verdicts_total",
    "inspectd_actor_restarts_total",
    "inspectd_handover_calls_total",
    "inspectd_map_write_failures_total",
    "inspectd_log_failures_total",
    "inspectd_maps_pruned_total",
    "inspectd_labels_total",
}
GAUGES = {
    "inspectd_queue_depth",
    "inspectd_inflight_frames",
    "inspectd_actors",
    "inspectd_ready",
    "inspectd_build_info",
    "inspectd_emit_queue",
    "inspectd_storage_free_bytes",
    "inspectd_storage_size_bytes",
    "inspectd_review_queue_parts",
    "inspectd_review_oldest_wait_seconds",
}
HISTOGRAMS = {"inspectd_latency_seconds", "inspectd_stage_seconds", "inspectd_frame_age_seconds",
              "inspectd_review_wait_seconds"}
SERIES = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}
)
LABELS = {"sensor_id", "reason", "product", "verdict", "stage", "backend", "version", "le", "job", "instance",
          "volume", "lane", "label", "way"}
LABEL_VALUES = {
    "verdict": {"pass", "fail", "review", "error"},
    "stage": {"decode", "queue", "preprocess", "score", "map_back", "decision", "log", "maps", "publish"},
}

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?")
_GRAFANA_VAR = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and label names excluded)."""
    s = _STRING.sub('""', expr)
    s = _GRAFANA_VAR.sub("", s)
    s = _MATCHERS.sub("", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = _GROUPING.sub(" ", s)
    return {m.group(1) for m in _IDENT.finditer(s) if not m.group(2) and m.group(1) not in _KEYWORDS}


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_* clauses."""
    names = set()
    for block in _MATCHERS.findall(_STRING.sub(lambda m: m.group(0).replace("}", ""), expr)):
        names |= {m.group(1) for m in _MATCHER.finditer(block)}
    for _, labels in _GROUPING.findall(_STRING.sub('""', expr)):
        names |= {x.strip() for x in labels.split(",") if x.strip()}
    return names


def check_expr(expr: str) -> list[str]:
    problems = [f"unknown metric {name!r}" for name in sorted(metric_names(expr) - SERIES)]
    problems += [f"unknown label {name!r}" for name in sorted(label_names(expr) - LABELS)]
    for label, op, value in _MATCHER.findall(expr):
        if label in LABEL_VALUES and op in ("=", "!=", "=~", "!~") and "$" not in value:
            wrong = set(value.split("|") if op in ("=~", "!~") else [value]) - LABEL_VALUES[label]
            problems += [f"unknown {label} value {v!r}" for v in sorted(wrong)]
    for hist in HISTOGRAMS:
        if re.search(rf"\b{hist}\b(?!_)", expr):
            problems.append(f"{hist} used without _bucket/_sum/_count")
    return problems


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (job, product, le) (rate(inspectd_latency_seconds_bucket"
        '{instance=~"$instance", product="a{b}"}[$__rate_interval]))) > 0.8 * 64 '
        "and on (instance) up offset 5m"
    )
    assert metric_names(expr) == {"inspectd_latency_seconds_bucket", "up"}
    assert label_names(expr) == {"job", "product", "le", "instance"}
    assert check_expr(expr) == []
    assert check_expr('rate(inspectd_frames_total{verdict="maybe"}[5m])') == [
        "unknown metric 'inspectd_frames_total'",
        "unknown verdict value 'maybe'",
    ]


# ---------------------------------------------------------------------------------------- Grafana


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    panels = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in panels if p.get("type") != "row"]


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in all_panels(dash) for t in p.get("targets", [])]


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 38
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dash):
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]
    titles = " | ".join(p["title"].lower() for p in all_panels(dash))
    for word in ("throughput", "verdict share", "latency", "stage", "queue", "refused", "actors", "ready"):
        assert word in titles, f"no panel about {word!r}"


def test_dashboard_queries_use_known_metrics() -> None:
    dash = load_dashboard()
    problems, used = [], set()
    for title, expr in dashboard_exprs(dash):
        problems += [f"{title}: {p}" for p in check_expr(expr)]
        used |= metric_names(expr)
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: unexpected query {query!r}"
        assert m.group(2) in LABELS
        if m.group(1):
            problems += [f"variable {var['name']}: {p}" for p in check_expr(m.group(1))]
    assert not problems, "\n".join(problems)
    # Every exported series family has a panel.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert (COUNTERS | GAUGES | HISTOGRAMS) - families == set()


# ------------------------------------------------------------------------------------- Prometheus


def load_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_use_known_metrics() -> None:
    rules = load_rules()
    problems = [f"{r.get('alert')}: {p}" for r in rules for p in check_expr(r["expr"])]
    assert not problems, "\n".join(problems)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    names = {r["alert"] for r in rules}
    assert {
        "InspectdDown",
        "InspectdNotReady",
        "InspectdHighErrorRate",
        "InspectdFramesRefused",
        "InspectdQueueNearLimit",
        "InspectdLatencyOverBudget",
        "InspectdActorRestarts",
        "InspectdFailRateSpike",
    } <= names


def test_alert_unit_tests_cover_alerts() -> None:
    doc = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]}
    assert {"InspectdDown", "InspectdHighErrorRate", "InspectdActorRestarts"} <= tested
    assert len(tested) >= 3


def test_prometheus_configs_scrape_inspectd() -> None:
    for path, target in (
        (PROM_DIR / "prometheus.yml", "127.0.0.1:9108"),
        (DEPLOY / "container" / "prometheus.yml", "inspectd:9108"),
    ):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["rule_files"] == ["alerts.yml"], path
        job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "inspectd")
        assert job["scrape_interval"] == "5s", path
        assert job["static_configs"][0]["targets"] == [target], path


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return exe


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", ALERTS)


def test_promtool_check_config() -> None:
    run_promtool("check", "config", PROM_DIR / "prometheus.yml")


def test_promtool_check_compose_config(tmp_path: Path) -> None:
    # In the compose stack alerts.yml is mounted next to the container's prometheus.yml.
    shutil.copy(DEPLOY / "container" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    run_promtool("check", "config", tmp_path / "prometheus.yml")


def test_promtool_test_rules() -> None:
    run_promtool("test", "rules", PROM_DIR / "alerts_test.yml")


def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs(load_dashboard())):
        expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
        rules.append({"record": f"dashboard:query_{i}", "expr": _GRAFANA_VAR.sub(".*", expr)})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", path)


# ---------------------------------------------------------------------------------------- systemd


def unit_directives() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit() -> None:
    unit = unit_directives()
    service = unit["Service"]
    assert service["ExecStart"] == [
        "/opt/inspectd/.venv/bin/inspectd run --config /etc/inspectd/inspectd.yaml"
    ]
    assert service["User"] == ["inspectd"]
    assert service["Restart"] == ["on-failure"]
    assert service["StateDirectory"] == ["inspectd"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert "/var/lib/inspectd" in service["ReadWritePaths"][0].split()
    assert service["KillMode"] == ["mixed"]
    assert int(service["TimeoutStopSec"][0]) >= 30
    assert_stop_timeout(int(service["TimeoutStopSec"][0]), DEPLOY / "systemd" / "inspectd.yaml")
    assert int(service["LimitNOFILE"][0]) >= 4096
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian: systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit. ExecStart's venv does not exist here, so the
    copy that is verified points it at this interpreter (verify checks that it is executable)."""
    text = (DEPLOY / "systemd" / "inspectd.service").read_text()
    exe = "/opt/inspectd/.venv/bin/inspectd"
    assert exe in text
    unit = tmp_path / "inspectd.service"
    unit.write_text(text.replace(exe, str(Path(shutil.which("python3") or "/usr/bin/python3").resolve())))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "inspectd.service" not in run.stderr, run.stderr  # no warning about the unit itself


def assert_stop_timeout(seconds: int, config: Path) -> None:
    """systemd / docker wait longer than the daemon's drain deadline plus Ray's shutdown (~20 s)."""
    from daemon.config import load_config

    drain = load_config(config).shutdown.drain_timeout_s
    assert seconds >= drain + 20, f"stop timeout {seconds}s, drain deadline {drain}s in {config.name}"


# ------------------------------------------------------------------------------- daemon configs


@pytest.mark.parametrize(
    ("path", "host"),
    [
        (DEPLOY / "systemd" / "inspectd.yaml", "127.0.0.1"),
        (DEPLOY / "container" / "inspectd.yaml", "0.0.0.0"),
    ],
)
def test_example_configs_load(path: Path, host: str) -> None:
    from daemon.config import load_config

    cfg = load_config(path)  # the daemon's own loader: unknown keys and bad values fail here
    assert cfg.ingest.endpoint == f"tcp://{host}:5555"
    assert cfg.publish.endpoint == f"tcp://{host}:5556"
    assert (cfg.http.host, cfg.http.port) == (host, 9108)
    assert cfg.storage.results == Path("/var/lib/inspectd/results.sqlite")
    assert cfg.storage.maps_dir == Path("/var/lib/inspectd/maps")
    assert cfg.storage.models_dir == Path("/var/lib/inspectd/models")
    # Security on: CURVE with the daemon's key and an allow-list, a token on the API, Ray on loopback,
    # and nothing the start-up rule would refuse (it refuses an exposed bind without these).
    from daemon.security import exposure_problems

    assert cfg.security.curve and not cfg.security.allow_insecure
    assert cfg.security.server_key == Path("/etc/inspectd/secrets/server.key_secret")
    assert cfg.security.allow_dir == Path("/etc/inspectd/secrets/allowed")
    assert cfg.http.token_file == Path("/etc/inspectd/secrets/api_tokens")
    assert cfg.ray.address is None and cfg.ray.node_ip == "127.0.0.1"
    assert exposure_problems(cfg, environ={}) == []
    # InspectdQueueNearLimit is written against the configured queue size.
    queue_rule = next(r for r in load_rules() if r["alert"] == "InspectdQueueNearLimit")
    m = re.search(r"\*\s*(\d+)\s*$", queue_rule["expr"].strip())
    assert m and int(m.group(1)) == cfg.ingest.queue_size


# -------------------------------------------------------------------------------------- container


def test_dockerfile() -> None:
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in text and "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "libusb-1.0-0" in text and "libgomp1" in text
    assert re.search(r"^USER inspectd$", text, re.M)
    assert re.search(r"^EXPOSE 5555 5556 9108$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib.*/healthz", text, re.M)
    assert 'CMD ["inspectd", "run", "--config", "/etc/inspectd/inspectd.yaml"]' in text


def test_compose_file() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"inspectd", "prometheus", "grafana"} <= set(services)
    build = services["inspectd"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve().is_file()
    # Every bind-mounted file or directory of the repository exists (${...} ones are the operator's).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")) and "${" not in source:
                assert (COMPOSE.parent / source).exists(), f"{name}: missing {source}"
    secrets = [v for v in services["inspectd"]["volumes"] if isinstance(v, dict) and v["target"] == "/etc/inspectd/secrets"]
    assert secrets and secrets[0]["read_only"], "the container config needs its keys and token mounted"
    grafana_mounts = [v.split(":")[1] for v in services["grafana"]["volumes"] if isinstance(v, str)]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/inspectd.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert any(m.startswith(path + "/") and m.endswith(".json") for m in grafana_mounts)
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    grace = re.fullmatch(r"(\d+)s", services["inspectd"]["stop_grace_period"])
    assert grace, services["inspectd"]["stop_grace_period"]
    assert_stop_timeout(int(grace.group(1)), DEPLOY / "container" / "inspectd.yaml")


# -------------------------------------------------------------------------------------------- Ray


def test_ray_cluster_config() -> None:
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert any("inspectd" in cmd and "pip install" in cmd for cmd in cfg["setup_commands"])
    spec = importlib.util.find_spec("ray")  # locates ray without importing it
    jsonschema = pytest.importorskip("jsonschema") if spec else None
    if spec is None or spec.origin is None:
        return
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if schema_path.is_file():
        jsonschema.validate(cfg, json.loads(schema_path.read_text()))
