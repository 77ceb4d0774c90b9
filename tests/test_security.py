"""Security without processes: key and token files, the start-up exposure rule, name and path checks.
The end-to-end checks (CURVE, HTTP hardening, Ray on loopback) are in test_security_e2e.py."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zmq

from daemon.config import Config, ConfigError, load_config
from daemon.security import (
    SecurityError,
    create_curve_keys,
    create_token,
    enforce_safe_defaults,
    exposure_problems,
    inside,
    is_loopback_endpoint,
    load_tokens,
    ray_init_kwargs,
    token_name,
    valid_part_id,
    valid_product,
)
from sensors.curve import apply_client_keys, load_client_keys
from tools.process import free_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow  # starts an inspectd process
def test_keys_command_writes_owner_only_secrets(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "keys", "curve", str(keys), "server", "sensor-1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert mode(keys) == 0o700
    for name in ("server", "sensor-1"):
        assert mode(keys / f"{name}.key_secret") == 0o600
        assert mode(keys / f"{name}.key") == 0o644
    with pytest.raises(FileExistsError):
        create_curve_keys(keys, "server")  # never overwrite a key silently
    ck = load_client_keys(keys / "sensor-1.key_secret", keys / "server.key")
    assert len(ck.public) == len(ck.secret) == len(ck.server_public) == 40
    with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as s:
        apply_client_keys(s, ck)
        assert s.getsockopt(zmq.MECHANISM) == zmq.CURVE
    with pytest.raises(ValueError, match="no secret"):
        load_client_keys(keys / "sensor-1.key", keys / "server.key")


def test_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    a = create_token(path, "operator")
    b = create_token(path, "enroller")
    assert mode(path) == 0o600
    tokens = load_tokens(path)
    assert token_name(tokens, a) == "operator" and token_name(tokens, b) == "enroller"
    assert token_name(tokens, "x" * 43) is None
    path.chmod(0o644)
    with pytest.raises(SecurityError, match="readable or writable by others"):
        load_tokens(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(SecurityError, match="shorter"):
        load_tokens(path)


def test_names_and_paths(tmp_path: Path) -> None:
    for bad in ("../x", "/etc", "a/b", "x\x00", "flange\n", "", ".hidden", "a" * 65):
        assert not valid_product(bad), bad
    assert valid_product("flange") and valid_product("gear_2.b-1")
    for bad in ("../../etc/passwd", "/abs", "a\x00b", "part-1\n", "a/b", "a" * 200, 7):
        assert not valid_part_id(bad), bad
    assert valid_part_id("flange-7-00001") and valid_part_id("cam1:000042")
    assert inside(tmp_path, "a", "b.npz") == (tmp_path / "a" / "b.npz").resolve()
    for escape in (("..", "x"), ("/etc",), ("a", "../../x")):
        with pytest.raises(ValueError, match="leaves"):
            inside(tmp_path, *escape)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ValueError):
        inside(tmp_path, "link", "x")


def test_exposure_rule() -> None:
    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("ipc:///run/x")
    assert is_loopback_endpoint("tcp://[::1]:5555") and is_loopback_endpoint("tcp://localhost:1")
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://eth0:5555", "tcp://10.0.0.5:5555"):
        assert not is_loopback_endpoint(ep), ep
    assert exposure_problems(Config(), environ={}) == []  # the defaults: loopback, open
    open_cfg = Config.model_validate({"ingest": {"endpoint": "tcp://0.0.0.0:5555"}, "http": {"host": "0.0.0.0"},
                                      "ray": {"address": "ray://10.0.0.2:10001"}})
    problems = exposure_problems(open_cfg, environ={})
    assert len(problems) == 3
    assert any("security.curve" in p for p in problems) and any("http.token_file" in p for p in problems)
    assert any("RAY_AUTH_MODE=token" in p for p in problems)
    assert len(exposure_problems(open_cfg, environ={"RAY_AUTH_MODE": "token"})) == 2
    secured = Config.model_validate({
        "ingest": {"endpoint": "tcp://0.0.0.0:5555"}, "publish": {"endpoint": "tcp://0.0.0.0:5556"},
        "http": {"host": "0.0.0.0", "token_file": "/etc/inspectd/tokens"},
        "security": {"curve": True, "server_key": "/k/server.key_secret", "allow_dir": "/k/allowed"},
    })
    assert exposure_problems(secured, environ={}) == []


def test_allow_insecure_warns(caplog: pytest.LogCaptureFixture) -> None:
    exposed = {"ingest": {"endpoint": "tcp://0.0.0.0:5555"}}
    with pytest.raises(SecurityError, match="allow_insecure"):
        enforce_safe_defaults(Config.model_validate(exposed))
    with caplog.at_level(logging.WARNING, logger="inspectd.security"):
        enforce_safe_defaults(Config.model_validate({**exposed, "security": {"allow_insecure": True}}))
    assert "INSECURE" in caplog.text


def test_config_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"security": {"curve": True}}))
    with pytest.raises(ConfigError, match="server_key and allow_dir"):
        load_config(path)
    path.write_text(yaml.safe_dump({"http": {"tokens": "x"}}))
    with pytest.raises(ConfigError, match="http.tokens: unknown key"):
        load_config(path)
    kwargs = ray_init_kwargs(Config())
    assert kwargs["_node_ip_address"] == "127.0.0.1" and kwargs["include_dashboard"] is False
    assert kwargs["address"] == "local"  # embedded: never a cluster `ray start` left on this machine
    assert "_node_ip_address" not in ray_init_kwargs(Config.model_validate({"ray": {"address": "auto"}}))


@pytest.mark.slow  # starts an inspectd process
def test_run_refuses_an_exposed_bind_at_once(tmp_path: Path) -> None:
    """``inspectd run`` on 0.0.0.0 without security exits non-zero before it starts anything."""
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump({
        "ingest": {"endpoint": f"tcp://0.0.0.0:{free_port()}"},
        "http": {"port": free_port()},
        "storage": {"results": str(tmp_path / "r.sqlite"), "models_dir": str(tmp_path / "models")},
    }))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    elapsed = time.time() - t0
    assert run.returncode == 2, run.stderr
    assert "refusing to start" in run.stderr and "ingest.endpoint tcp://0.0.0.0" in run.stderr
    assert "security.curve: true" in run.stderr and "inspectd keys curve" in run.stderr
    assert "allow_insecure" in run.stderr
    assert "Started a local Ray" not in run.stderr and not (tmp_path / "r.sqlite").exists()
    assert elapsed < 30  # imports only: no Ray, no actors


@pytest.mark.slow  # starts an inspectd process
def test_token_file_readable_by_others_refuses_start(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    create_token(tokens, "operator")
    tokens.chmod(0o644)
    path = tmp_path / "inspectd.yaml"
    path.write_text(yaml.safe_dump({"http": {"port": free_port(), "token_file": str(tokens)},
                                    "storage": {"results": str(tmp_path / "r.sqlite")}}))
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "readable or writable by others" in run.stderr, run.stderr
