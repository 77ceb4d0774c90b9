"""The HTTP server and the ZAP gate in-process, on loopback: listeners, auth options, token rotation,
audit rows, and the ingest connection cap. The daemon-level checks are in test_security_e2e.py."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from daemon.audit import AuditLog
from daemon.config import HttpConfig
from daemon.http_api import HttpApi
from daemon.security import ZapGate, create_token, load_tokens


def get(url: str, token: str | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[HttpApi, Path, AuditLog, list]]:
    tokens = tmp_path / "tokens"
    create_token(tokens, "operator")
    audit = AuditLog(tmp_path / "results.sqlite")
    calls: list = []

    def api(method: str, path: str, body: object, who: str) -> tuple[int, dict]:
        calls.append((method, path, body))
        if path.startswith("/v1/boom"):
            raise RuntimeError("/secret/path/in/a/traceback")
        return 200, {"path": path}

    cfg = HttpConfig(port=0, api_port=0, token_file=tokens, metrics_auth=True)
    http = HttpApi(cfg, lambda: b"inspectd_ready 1\n", lambda: True, api, audit=lambda: audit)
    http.start()
    time.sleep(0.3)
    try:
        yield http, tokens, audit, calls
    finally:
        http.stop()
        audit.close()


def test_listeners_auth_rotation_and_audit(served: tuple[HttpApi, Path, AuditLog, list]) -> None:
    http, tokens, audit, calls = served
    main, api = f"http://127.0.0.1:{http.port}", f"http://127.0.0.1:{http.api_port}"
    assert http.port != http.api_port
    token = next(iter(load_tokens(tokens)))
    assert get(main + "/metrics")[0] == 401  # metrics_auth: true
    assert get(main + "/metrics", token) == (200, b"inspectd_ready 1\n")
    assert get(main + "/v1/products", token)[0] == 404  # the API lives on its own listener
    assert get(api + "/metrics", token)[0] == 404
    code, body = get(api + "/v1/verdicts?product=flange&limit=3", token)
    assert code == 200 and json.loads(body)["path"] == "/v1/verdicts?product=flange&limit=3"  # query kept

    assert get(api + "/v1/products/flange/reload", data=b"")[0] == 401
    assert get(api + "/v1/products/flange/reload", token, data=b"")[0] == 200
    code, body = get(api + "/v1/boom", token, data=b"{}")
    assert code == 500 and b"secret" not in body and b"Traceback" not in body
    assert get(api + "/v1/products/flange/good", token, data=b"{not json")[0] == 400

    new = create_token(tokens, "enroller")  # rotation: the file is re-read, no restart
    assert get(api + "/v1/products/flange/reload", new, data=b"")[0] == 200
    tokens.write_text(f"enroller:{new}\n")
    assert get(api + "/v1/products/flange/reload", token, data=b"")[0] == 401  # the old token is gone

    rows = [(r["who"], r["action"], r["status"]) for r in audit.rows()]
    assert rows == [
        ("unauthenticated", "POST /v1/products/flange/reload", 401),
        ("operator", "POST /v1/products/flange/reload", 200),
        ("operator", "POST /v1/boom", 500),
        ("operator", "POST /v1/products/flange/good", 400),
        ("enroller", "POST /v1/products/flange/reload", 200),
        ("unauthenticated", "POST /v1/products/flange/reload", 401),
    ]
    assert all(r["peer"].startswith("127.0.0.1:") for r in audit.rows())
    assert [c[0] for c in calls].count("POST") == 3  # refused calls never reached the service


def test_zap_gate_caps_ingest_connections() -> None:
    """``ingest.max_connections``: the gate admits that many sensors and refuses the next one."""
    refused: list[tuple[str, str]] = []
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    gate = ZapGate(ctx, None, lambda sock, reason: refused.append((sock, reason)))
    gate.serve(pull, "ingest", None, cap=2)
    gate.start()
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    clients = []
    try:
        for _ in range(2):
            c = ctx.socket(zmq.PUSH)
            c.connect(f"tcp://127.0.0.1:{port}")
            clients.append(c)
        deadline = time.time() + 10
        while gate.connections("ingest") < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert gate.connections("ingest") == 2
        extra = ctx.socket(zmq.PUSH)
        extra.connect(f"tcp://127.0.0.1:{port}")
        clients.append(extra)
        while not refused and time.time() < deadline:
            time.sleep(0.05)
        assert ("ingest", "max_connections") in refused
        clients.pop(0).close(linger=0)  # a sensor leaves: its slot frees
        while gate.connections("ingest") > 1 and time.time() < deadline:
            time.sleep(0.05)
        assert gate.connections("ingest") <= 2
    finally:
        for c in clients:
            c.close(linger=0)
        gate.stop()
        pull.close(linger=0)
        ctx.term()
