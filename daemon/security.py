"""Who may talk to the daemon: CurveZMQ keys and the ZAP gate, HTTP tokens, safe defaults, Ray on loopback.

* ``ZapGate`` is the daemon's ZAP handler (one per ZeroMQ context). It admits CURVE clients whose
  public key is in the allow-list directory (re-read whenever the directory changes, so adding
  or removing a key needs no restart), caps the number of connections per socket (a socket
  monitor counts handshakes and disconnects), and counts and logs every refused handshake with
  the peer's address.
* ``exposure_problems`` is the start-up rule: a listener off loopback needs authentication
  (CURVE for ZeroMQ, a token for HTTP, Ray's token for a remote Ray) unless
  ``security.allow_insecure`` says otherwise.
* Keys and tokens are created here (``inspectd keys``) with owner-only permissions.

Design, threat model and operations: docs/security.md.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from daemon.config import Config
from sensors.curve import ClientKeys, load_client_keys
from sensors.frame import PRODUCT_NAME

log = logging.getLogger("inspectd.security")

PART_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
"""Part ids accepted from HTTP and the CLI (matched whole: no separators, NUL or newline)."""

INGEST_DOMAIN = "ingest"
VERDICTS_DOMAIN = "verdicts"


class SecurityError(RuntimeError):
    """The configuration would expose the daemon, or a key or token file is unusable."""


# ------------------------------------------------------------------------------------------ names


def valid_product(name: object) -> bool:
    """A product name as the whole string (``$`` would accept a trailing newline)."""
    return isinstance(name, str) and PRODUCT_NAME.fullmatch(name) is not None


def valid_part_id(part_id: object) -> bool:
    return isinstance(part_id, str) and PART_ID.fullmatch(part_id) is not None


def inside(base: str | Path, *parts: str) -> Path:
    """``base/parts...``, refused unless it resolves inside ``base`` (no ``..``, absolute part or link out)."""
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{'/'.join(parts)!r} leaves {root}")
    return path


# ---------------------------------------------------------------------------------------- exposure


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a hostname: assume reachable


def is_loopback_endpoint(endpoint: str) -> bool:
    """ZeroMQ endpoints: ipc:// and inproc:// stay on the machine; tcp:// by its host."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0]
    return is_loopback_host(host.split(";")[-1])


def ray_is_remote(address: str | None) -> bool:
    if address is None:
        return False
    if address == "auto":
        return True  # an existing cluster node: its other nodes reach it over the network
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return not is_loopback_host(host)


def exposure_problems(cfg: Config, environ: dict[str, str] | None = None) -> list[str]:
    """Every listener or peer that is reachable off this machine without authentication."""
    env = os.environ if environ is None else environ
    problems = []
    for key, endpoint in (("ingest.endpoint", cfg.ingest.endpoint), ("publish.endpoint", cfg.publish.endpoint)):
        if not is_loopback_endpoint(endpoint) and not cfg.security.curve:
            problems.append(
                f"{key} {endpoint} is reachable from the network without authentication: set security.curve: true "
                "with security.server_key and security.allow_dir (create them with 'inspectd keys curve')"
            )
    if not is_loopback_host(cfg.http.host) and cfg.http.token_file is None:
        problems.append(
            f"http.host {cfg.http.host} serves the /v1/ API to the network without authentication: set "
            "http.token_file (create it with 'inspectd keys token FILE')"
        )
    if cfg.ray.address is None and not is_loopback_host(cfg.ray.node_ip) and env.get("RAY_AUTH_MODE") != "token":
        problems.append(f"ray.node_ip {cfg.ray.node_ip} exposes the embedded Ray: set RAY_AUTH_MODE=token")
    if ray_is_remote(cfg.ray.address) and env.get("RAY_AUTH_MODE") != "token":
        problems.append(
            f"ray.address {cfg.ray.address} joins a cluster without Ray's token authentication: set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (deploy/ray/README.md)"
        )
    return problems


def enforce_safe_defaults(cfg: Config) -> None:
    """Refuse to start on an exposed, unauthenticated listener, unless ``security.allow_insecure``."""
    problems = exposure_problems(cfg)
    if not problems:
        return
    if cfg.security.allow_insecure:
        for p in problems:
            log.warning("INSECURE (security.allow_insecure: true): %s", p)
        return
    raise SecurityError(
        "refusing to start:\n  " + "\n  ".join(problems)
        + "\n  (or bind 127.0.0.1, or accept the risk with security.allow_insecure: true)"
    )


# ------------------------------------------------------------------------------------------ Ray


def prepare_ray_environment(cfg: Config) -> None:
    """Keep an embedded Ray on ``ray.node_ip``, and the daemon's Ray client on loopback when it
    joins a cluster on this machine (``ray.address`` on loopback); call before ``ray`` is imported.

    On Linux Ray ignores a loopback ``_node_ip_address`` and picks the host's outward address
    (and binds every interface) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read at import."""
    embedded = cfg.ray.address is None and is_loopback_host(cfg.ray.node_ip)
    if embedded or (cfg.ray.address not in (None, "auto") and not ray_is_remote(cfg.ray.address)):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ray_init_kwargs(cfg: Config) -> dict[str, Any]:
    """``ray.init`` arguments: the embedded Ray on ``ray.node_ip`` with no dashboard.

    ``ray.address: null`` passes ``address="local"``: Ray's own default (None) would join any
    cluster ``ray start`` left on this machine (``/tmp/ray/ray_current_cluster``, ``RAY_ADDRESS``)
    and then refuse the embedded object store size, so the daemon would not start."""
    kwargs: dict[str, Any] = {"address": cfg.ray.address or "local", "include_dashboard": False}
    if cfg.ray.address is None:
        kwargs["_node_ip_address"] = cfg.ray.node_ip
    return kwargs


# ------------------------------------------------------------------------------------ keys, tokens


def create_curve_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0644) and ``NAME.key_secret`` (0600) into ``directory`` (0700)."""
    if not valid_product(name):
        raise ValueError(f"key name {name!r} must match {PRODUCT_NAME.pattern}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    if (d / f"{name}.key_secret").exists():
        raise FileExistsError(f"{d / name}.key_secret exists; remove it first to replace the key")
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    Path(secret).chmod(0o600)
    Path(public).chmod(0o644)
    return Path(public), Path(secret)


def create_token(path: str | Path, name: str) -> str:
    """Append a new ``name:token`` line to a token file (created 0600); returns the token."""
    if not valid_product(name):
        raise ValueError(f"token name {name!r} must match {PRODUCT_NAME.pattern}")
    token = secrets.token_urlsafe(32)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name}:{token}\n")
    return token


def check_private(path: Path, what: str) -> None:
    """A secret file must exist and be unreadable by others (group may read: a service group)."""
    try:
        st = path.stat()
    except OSError as e:
        raise SecurityError(f"{what} {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise SecurityError(f"{what} {path} is readable or writable by others: chmod o-rw {path}")


def load_tokens(path: Path) -> dict[str, str]:
    """Token → name, from ``name:token`` or bare-token lines (bare ones are named after the file)."""
    check_private(path, "http.token_file")
    tokens = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = path.stem, name
        if len(token) < 16:
            raise SecurityError(f"http.token_file {path}: a token shorter than 16 characters")
        tokens[token] = name
    if not tokens:
        raise SecurityError(f"http.token_file {path} holds no token")
    return tokens


def token_name(tokens: dict[str, str], presented: str) -> str | None:
    """The name of a presented token, compared in constant time."""
    found = None
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = name
    return found


def client_keys(cfg: Config) -> ClientKeys | None:
    """The keys the sensors, subscribers and tools started from this config present (None: no CURVE)."""
    s = cfg.security
    if not s.curve:
        return None
    if s.client_key is None or s.server_key is None:
        raise ValueError("security.curve is on: security.client_key and security.server_key are needed")
    return load_client_keys(s.client_key, s.server_key)


# -------------------------------------------------------------------------------------- ZAP gate


class ZapGate(ThreadAuthenticator):
    """The ZAP handler of the daemon's context: allow-list, connection caps, refusal accounting.

    ``on_refused(socket, reason)`` is called once per refused handshake. Reasons: ``unknown_key``
    (CURVE key not allowed), ``max_connections``, ``no_curve`` (a client without CURVE, or with
    the wrong server key), ``handshake`` (a connection dropped before it completed one)."""

    def __init__(
        self, ctx: zmq.Context, allow_dir: Path | None, on_refused: Callable[[str, str], None] | None = None
    ) -> None:
        super().__init__(ctx)
        self.allow_dir = allow_dir
        self.on_refused = on_refused or (lambda sock, reason: None)
        self.caps: dict[str, int] = {}
        self.live: dict[str, int] = {}
        self.allowed: set[bytes] = set()
        self._signature: object = None
        self._lock = threading.Lock()
        self._allow_lock = threading.Lock()
        self._key_hosts: dict[bytes, set[str]] = {}
        self._last_logged: dict[tuple[str, str, str], float] = {}
        self._revoked_hosts: set[str] = set()
        self._monitors: list[tuple[str, zmq.Socket, zmq.Socket]] = []
        self._stop = threading.Event()
        self._monitor_thread: threading.Thread | None = None

    # ---- sockets
    def serve(self, sock: zmq.Socket, domain: str, curve_secret: bytes | None, cap: int | None = None) -> None:
        """Put ``sock`` (before ``bind``) behind this gate: CURVE server if a secret is given."""
        sock.zap_domain = domain.encode()
        if curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve_secret
        if cap is not None:
            self.caps[domain] = cap
        self.live.setdefault(domain, 0)
        events = (
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        self._monitors.append((domain, sock, sock.get_monitor_socket(events)))

    def start(self) -> None:
        super().start()
        self._monitor_thread = threading.Thread(target=self._watch, name="zap-monitor", daemon=True)
        self._monitor_thread.start()

    def stop(self) -> None:
        """Stop the monitor (before the sockets close) and the ZAP thread."""
        self._stop.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout=5)
        super().stop()

    def connections(self, domain: str) -> int:
        """Clients connected to the socket of ``domain`` (handshake done, not yet disconnected)."""
        with self._lock:
            return self.live.get(domain, 0)

    # ---- allow-list
    def _refresh_allowed(self) -> None:
        """Re-read the allow-list when a file in it was added, removed or changed; flag removals."""
        d = self.allow_dir
        if d is None:
            return
        with self._allow_lock:
            try:
                sig = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(d)))
            except OSError as e:
                sig = ("error", str(e))
            if sig == self._signature:
                return
            first = self._signature is None
            self._signature = sig
            old = self.allowed
            try:
                self.allowed = set(zmq.auth.load_certificates(str(d)))
            except OSError as e:  # a missing directory admits nobody
                log.error("cannot read the allow-list %s: %s; admitting no key", d, e)
                self.allowed = set()
            log.info("allow-list %s: %d key(s)", d, len(self.allowed))
            if not first:
                for key in old - self.allowed:
                    self._revoked_hosts |= self._key_hosts.pop(key, set())

    # ---- ZAP
    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """Answer one ZAP request (RFC 27): 200 admits the peer, 400 refuses it."""
        if len(msg) < 6:
            return
        version, request_id, domain_b, address_b, _identity, mechanism = msg[:6]
        domain, address = domain_b.decode("utf-8", "replace"), address_b.decode("utf-8", "replace")
        user = b""
        reason = None
        if version != b"1.0":
            reason = "bad_request"
        elif mechanism == b"CURVE":
            self._refresh_allowed()
            key = z85.encode(msg[6]) if len(msg) > 6 and len(msg[6]) == 32 else b""
            if key not in self.allowed:
                reason = "unknown_key"
            user = key
        elif mechanism != b"NULL":
            reason = "no_curve"
        cap = self.caps.get(domain)
        if reason is None and cap is not None and self.connections(domain) >= cap:
            reason = "max_connections"
        if reason is None:
            if user:
                with self._allow_lock:
                    self._key_hosts.setdefault(user, set()).add(address)
            self.zap_socket.send_multipart([b"1.0", request_id, b"200", b"OK", user, b""])
            return
        self.zap_socket.send_multipart([b"1.0", request_id, b"400", reason.encode(), b"", b""])
        self._refused(domain, address or "?", reason, f" (key {user.decode()})" if user else "")

    def _refused(self, domain: str, peer: str, reason: str, extra: str = "") -> None:
        """Count every refusal; log it with the peer, at most once per 10 s per host and reason
        (a refused client retries every 100 ms and must not flood the log)."""
        self.on_refused(domain, reason)
        key, now = (domain, peer.rsplit(":", 1)[0], reason), time.monotonic()
        if now - self._last_logged.get(key, -1e9) >= 10.0:
            if len(self._last_logged) > 10_000:
                self._last_logged.clear()
            self._last_logged[key] = now
            log.warning("refused a connection to %s from %s: %s%s", domain, peer, reason, extra)

    # ---- monitor
    def _watch(self) -> None:
        poller = zmq.Poller()
        for _, _, mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        by_socket = {mon: domain for domain, _, mon in self._monitors}
        peers: dict[int, str] = {}
        failed: dict[str, deque[str]] = {domain: deque() for domain, _, _ in self._monitors}
        self._refresh_allowed()
        next_check = time.monotonic() + 1.0
        while not self._stop.is_set():
            if time.monotonic() >= next_check:  # a revoked key must not keep its open connection
                next_check = time.monotonic() + 1.0
                self._refresh_allowed()
                with self._allow_lock:
                    hosts, self._revoked_hosts = self._revoked_hosts, set()
                if hosts:
                    cut = sum(_cut(fd, peer) for fd, peer in list(peers.items()) if peer.rsplit(":", 1)[0] in hosts)
                    log.warning("a key left the allow-list: closed %d connection(s) from %s; each must "
                                "authenticate again", cut, ", ".join(sorted(hosts)))
            for mon, _ in poller.poll(200):
                try:
                    ev = recv_monitor_message(mon)
                except zmq.ZMQError:
                    continue
                self._on_event(by_socket[mon], ev, peers, failed[by_socket[mon]])
        for _, sock, mon in self._monitors:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)

    def _on_event(self, domain: str, ev: dict[str, Any], peers: dict[int, str], failed: deque[str]) -> None:
        kind, value = ev["event"], ev["value"]
        if kind == zmq.EVENT_ACCEPTED:
            peers[value] = _peer_of(value)
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            with self._lock:
                self.live[domain] += 1
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            failed.append("")  # refused by handle_zap_message, which counted and logged it
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            failed.append("no_curve" if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else "handshake")
        elif kind == zmq.EVENT_DISCONNECTED:
            peer = peers.pop(value, "?")
            if failed:  # libzmq reports a failed handshake right before its disconnect
                reason = failed.popleft()
                if reason:
                    self._refused(domain, peer, reason)
            else:
                with self._lock:
                    self.live[domain] = max(0, self.live[domain] - 1)


def _cut(fd: int, peer: str) -> bool:
    """Shut down the TCP connection on ZeroMQ's ``fd`` (libzmq then sees it drop and the client must
    reconnect and pass ZAP again). Only if the fd still belongs to ``peer``: fds are reused."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            host, port = s.getpeername()[:2]
            if f"{host}:{port}" != peer:
                return False
            s.shutdown(socket.SHUT_RDWR)
            return True
    except (OSError, ValueError):
        return False


def _peer_of(fd: int) -> str:
    """The remote address of a just-accepted connection's file descriptor (best effort)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:  # a duplicate: closing it leaves ZeroMQ's fd open
            host, port = s.getpeername()[:2]
            return f"{host}:{port}"
    except (OSError, ValueError):
        return "?"


def secure_sockets(
    ctx: zmq.Context, cfg: Config, pull: zmq.Socket, pub: zmq.Socket, on_refused: Callable[[str, str], None]
) -> ZapGate:
    """Put the ingest and verdict sockets (not yet bound) behind a started ZAP gate.

    With ``security.curve`` both are CURVE servers with the daemon's secret key and admit the
    allow-listed keys; either way ingest admits at most ``ingest.max_connections`` clients."""
    secret = None
    if cfg.security.curve:
        assert cfg.security.server_key is not None
        check_private(cfg.security.server_key, "security.server_key")
        _, secret = zmq.auth.load_certificate(str(cfg.security.server_key))
        if not secret:
            raise SecurityError(f"security.server_key {cfg.security.server_key} holds no secret key")
    gate = ZapGate(ctx, cfg.security.allow_dir if cfg.security.curve else None, on_refused)
    gate.serve(pull, INGEST_DOMAIN, secret, cap=cfg.ingest.max_connections)
    gate.serve(pub, VERDICTS_DOMAIN, secret)
    gate.start()
    return gate
