"""Nobody in: one real daemon (embedded Ray) with CURVE on both sockets and a token on the HTTP API,
probed over loopback by real sensors, subscribers and raw HTTP connections. Marked slow."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from daemon.security import create_curve_keys, create_token, load_tokens
from sensors.curve import ClientKeys, apply_client_keys, load_client_keys
from sensors.publisher import FramePusher
from sensors.simulated import simulated_parts

from conftest import PRODUCT, RunningDaemon, launch_daemon, receive_verdicts

pytestmark = pytest.mark.slow
MAX_BODY = 4096


class Secured:
    """The running daemon and the keys and token to talk to it."""

    def __init__(self, d: RunningDaemon, keys: Path, allow: Path, token: str) -> None:
        self.d, self.keys, self.allow, self.token = d, keys, allow, token

    def client(self, name: str) -> ClientKeys:
        return load_client_keys(self.keys / f"{name}.key_secret", self.keys / "server.key")

    def subscriber(self, ctx: zmq.Context, keys: ClientKeys | None) -> zmq.Socket:
        sub = ctx.socket(zmq.SUB)
        apply_client_keys(sub, keys)
        sub.setsockopt(zmq.SUBSCRIBE, b"verdict/")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.d.publish)
        return sub

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.d.metrics().splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_metric(self, above: float, name: str, timeout: float = 20, **labels: str) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.metric(name, **labels)
            if v > above:
                return v
            time.sleep(0.3)
        return self.metric(name, **labels)

    def rows(self, sql: str, *args: object) -> list[tuple]:
        with sqlite3.connect(self.d.root / "results.sqlite") as c:
            return c.execute(sql, args).fetchall()


@pytest.fixture(scope="module")
def secured(enrolled_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    keys, allow = root / "keys", root / "allowed"
    for name in ("server", "sensor-a", "revokee", "stranger", "plc"):
        create_curve_keys(keys, name)
    allow.mkdir()
    for name in ("sensor-a", "revokee", "plc"):
        shutil.copy(keys / f"{name}.key", allow)
    tokens = root / "tokens"
    create_token(tokens, "operator")
    token = next(iter(load_tokens(tokens)))
    with launch_daemon(
        enrolled_models, root,
        security={"curve": True, "server_key": str(keys / "server.key_secret"), "allow_dir": str(allow)},
        http={"token_file": str(tokens), "max_body_bytes": MAX_BODY, "header_timeout_s": 5, "max_connections": 32},
        cold_start={"collect_dir": str(root / "collected")},
    ) as d:
        yield Secured(d, keys, allow, token)


def push(endpoint: str, keys: ClientKeys | None, seed: int, n: int, sensor_id: str) -> None:
    """Try to send ``n`` frames on a PUSH socket, then close; a refused sensor's sends time out."""
    pusher = FramePusher(endpoint, hwm=n + 1, send_timeout_ms=2000, keys=keys)
    try:
        for f in simulated_parts([PRODUCT], n, 0.0, seed=seed, sensor_id=sensor_id, good_only=True):
            try:
                pusher.send(f)
            except zmq.Again:  # no admitted connection to queue on
                break
        time.sleep(3.0)  # the handshakes (and their refusals) happen meanwhile
    finally:
        pusher.sock.setsockopt(zmq.LINGER, 0)
        pusher.close()


def test_curve_admits_only_allow_listed_keys(secured: Secured) -> None:
    ctx = zmq.Context()
    sub = secured.subscriber(ctx, secured.client("plc"))
    stranger_sub = secured.subscriber(ctx, None)  # no key: must receive nothing
    time.sleep(1.0)
    def refused_plain() -> float:
        # libzmq reports a client without CURVE as a protocol or (seen on a loaded machine) an
        # unspecified handshake failure
        return sum(secured.metric("inspectd_connections_refused_total", socket="ingest", reason=r)
                   for r in ("no_curve", "handshake"))

    before_plain = refused_plain()
    before_key = secured.metric("inspectd_connections_refused_total", socket="ingest", reason="unknown_key")

    push(secured.d.ingest, None, seed=201, n=2, sensor_id="nokey")
    push(secured.d.ingest, secured.client("stranger"), seed=202, n=2, sensor_id="stranger")
    deadline = time.time() + 60
    while refused_plain() <= before_plain and time.time() < deadline:
        time.sleep(0.3)
    assert refused_plain() > before_plain
    assert secured.wait_metric(before_key, "inspectd_connections_refused_total", socket="ingest",
                               reason="unknown_key") > before_key
    # libzmq reports the keyless subscriber as a protocol or an unspecified handshake failure
    assert secured.metric("inspectd_connections_refused_total", socket="verdicts") >= 1

    push(secured.d.ingest, secured.client("sensor-a"), seed=203, n=2, sensor_id="sensor-a")
    verdicts = receive_verdicts(sub, 2, timeout=60)
    assert [v.header["sensor_id"] for v in verdicts] == ["sensor-a", "sensor-a"]
    assert all(v.header["verdict"] != "error" for v in verdicts)
    assert stranger_sub.poll(1000) == 0  # the keyless subscriber got nothing
    ctx.destroy(linger=0)
    assert secured.rows("SELECT COUNT(*) FROM verdicts WHERE sensor_id IN ('nokey', 'stranger')") == [(0,)]
    log = (secured.d.root / "daemon.log").read_text()
    assert "refused a connection to ingest from 127.0.0.1" in log


def test_revoking_a_key_needs_no_restart(secured: Secured) -> None:
    ctx = zmq.Context()
    sub = secured.subscriber(ctx, secured.client("plc"))
    time.sleep(1.0)
    pusher = FramePusher(secured.d.ingest, hwm=4, send_timeout_ms=2000, keys=secured.client("revokee"))
    try:
        pusher.send(next(simulated_parts([PRODUCT], 1, 0.0, seed=301, sensor_id="revokee-1", good_only=True)))
        assert [v.header["sensor_id"] for v in receive_verdicts(sub, 1, timeout=60)] == ["revokee-1"]

        before = secured.metric("inspectd_connections_refused_total", socket="ingest", reason="unknown_key")
        (secured.allow / "revokee.key").unlink()
        # the open connection is cut within about a second, and its reconnection is refused
        assert secured.wait_metric(before, "inspectd_connections_refused_total", socket="ingest",
                                   reason="unknown_key") > before
        try:
            pusher.send(next(simulated_parts([PRODUCT], 1, 0.0, seed=302, sensor_id="revokee-2", good_only=True)))
        except zmq.Again:
            pass
        assert receive_verdicts(sub, 1, timeout=5) == []
    finally:
        pusher.sock.setsockopt(zmq.LINGER, 0)
        pusher.close()
    before = secured.metric("inspectd_connections_refused_total", socket="ingest", reason="unknown_key")
    push(secured.d.ingest, secured.client("revokee"), seed=303, n=1, sensor_id="revokee-3")  # a new connection
    assert secured.wait_metric(before, "inspectd_connections_refused_total", socket="ingest",
                               reason="unknown_key") > before
    ctx.destroy(linger=0)
    assert secured.rows("SELECT COUNT(*) FROM verdicts WHERE sensor_id IN ('revokee-2', 'revokee-3')") == [(0,)]
    log = (secured.d.root / "daemon.log").read_text()
    assert "a key left the allow-list: closed" in log
    # and back: a key added to the directory is admitted at its next handshake
    shutil.copy(secured.keys / "revokee.key", secured.allow)


def http(secured: Secured, method: str, path: str, body: bytes | None = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(secured.d.http + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw.startswith(b"{") else {"raw": raw.decode()}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_write_api_needs_the_token_and_is_audited(secured: Secured) -> None:
    reloads = secured.metric("inspectd_model_reloads_total")
    for path, body in ((f"/v1/products/{PRODUCT}/reload", None),
                       (f"/v1/products/{PRODUCT}/good", b'{"part_id": "flange-1-00000"}')):
        assert http(secured, "POST", path, body)[0] == 401
        assert http(secured, "POST", path, body, token="x" * 43)[0] == 401
    assert http(secured, "GET", "/v1/products")[0] == 401  # verdict reads are as sensitive as the PUB socket
    assert secured.metric("inspectd_model_reloads_total") == reloads
    assert not (secured.d.root / "collected").exists()

    code, reply = http(secured, "GET", "/v1/products?x=1", token=secured.token)
    assert code == 200 and PRODUCT in reply["enrolled"]
    code, reply = http(secured, "POST", f"/v1/products/{PRODUCT}/reload", token=secured.token)
    assert code == 200 and reply["product"] == PRODUCT, reply
    assert secured.metric("inspectd_model_reloads_total") == reloads + 1
    with urllib.request.urlopen(secured.d.http + "/healthz", timeout=5) as r:  # health: no token needed
        assert r.status == 200

    rows = secured.rows("SELECT who, peer, action, status FROM audit ORDER BY id")
    assert ("unauthenticated", f"POST /v1/products/{PRODUCT}/reload", 401) in [(w, a, s) for w, _, a, s in rows]
    assert rows[-1][0] == "operator" and rows[-1][2] == f"POST /v1/products/{PRODUCT}/reload" and rows[-1][3] == 200
    assert rows[-1][1].startswith("127.0.0.1:")
    assert len([r for r in rows if r[3] == 401]) == 4


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_body_limits_and_strict_content_length(secured: Secured) -> None:
    port = int(secured.d.http.rsplit(":", 1)[1])
    code, reply = http(secured, "POST", f"/v1/products/{PRODUCT}/good", b"{" + b" " * (MAX_BODY + 10) + b"}",
                       token=secured.token)
    assert code == 413 and "body over" in reply["error"]
    head = (f"POST /v1/products/{PRODUCT}/good HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secured.token}\r\n"
            "Content-Type: application/json\r\n")
    for bad in ("-1", "abc", "1e3"):
        t0 = time.time()
        answer = raw_request(port, (head + f"Content-Length: {bad}\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 400"), (bad, answer[:200])
        assert time.time() - t0 < 2.0, bad  # at once, not after a read timeout
    answer = raw_request(port, (head + "Content-Length: 100000000\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413")  # refused from the header, before any body is read
    answer = raw_request(port, (head + "Content-Length: 2\r\n\r\n{").encode(), timeout=15)
    assert answer.startswith(b"HTTP/1.1 408")  # body timeout
    assert b"Traceback" not in answer


def test_half_open_connections_stay_bounded(secured: Secured) -> None:
    port = int(secured.d.http.rsplit(":", 1)[1])
    daemon = psutil.Process(secured.d.proc.pid)
    threads_before = daemon.num_threads()
    conns = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            conns.append(s)
        time.sleep(1.0)
        t0 = time.time()
        with urllib.request.urlopen(secured.d.http + "/healthz", timeout=10) as r:
            assert r.status == 200
        healthz_s = time.time() - t0
        threads_during = daemon.num_threads()
        open_conns = sum(1 for c in daemon.net_connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")
    finally:
        for s in conns:
            s.close()
    print(f"healthz under 300 half-open connections: {healthz_s * 1000:.0f} ms; threads {threads_before} -> "
          f"{threads_during}; daemon-side connections open {open_conns}")
    assert healthz_s < 3.0
    assert threads_during <= threads_before + 4
    assert open_conns <= 32 + 2  # http.max_connections (+ the healthz probe)


TRAVERSALS = ["..", "../etc", "/etc", "flange\n", "fl\x00ange", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", "a/../../b"]
BAD_PARTS = ["../../evil", "/tmp/evil", "part\x00x", "part-1\n", "a/b", "..", ""]


def test_traversal_attempts_get_400_and_write_nothing(secured: Secured, tmp_path: Path) -> None:
    root = secured.d.root
    before = files_under(root)
    for product in TRAVERSALS:
        quoted = urllib.request.quote(product, safe="%/")
        for action, body in (("good", b'{"part_id": "flange-1-00000"}'), ("reload", None)):
            code, reply = http(secured, "POST", f"/v1/products/{quoted}/{action}", body, token=secured.token)
            assert code in (400, 404), (product, action, code, reply)
            if "/" not in product.replace("%2F", "/"):
                assert code == 400, (product, action, code, reply)
            assert "Traceback" not in json.dumps(reply)
    for part_id in BAD_PARTS:
        code, reply = http(secured, "POST", f"/v1/products/{PRODUCT}/good", json.dumps({"part_id": part_id}).encode(),
                           token=secured.token)
        assert code == 400, (part_id, code, reply)
    written = files_under(root) - before
    allowed = (root / "maps", root / "collected")
    assert all(p.name.startswith("results.sqlite") or any(a in p.parents for a in allowed) for p in written), written
    assert not Path("/tmp/evil").exists() and not (root.parent / "evil").exists()


def test_embedded_ray_listens_on_loopback_only(secured: Secured) -> None:
    daemon = psutil.Process(secured.d.proc.pid)
    listening = []
    for p in [daemon, *daemon.children(recursive=True)]:
        try:
            conns = p.net_connections("inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    names = {n for n, _, _ in listening}
    print("listening:", sorted(listening))
    assert {"gcs_server", "raylet"} <= names, names  # the check sees Ray's own processes
    exposed = [x for x in listening if x[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert exposed == []
