"""The daemon's HTTP side: uvicorn serving a small ASGI app (Starlette requests and responses).

Routes: ``/metrics`` (Prometheus text), ``/healthz`` (the process answers), ``/readyz`` (200 once
the actors are up, 503 before) and every path under ``/v1/``, which goes to the service's API
callback ``api(method, path_with_query, body) -> (status, json dict)`` (docs/protocol.md, "HTTP API").

* Authentication: with ``http.token_file`` every ``/v1/`` route needs ``Authorization: Bearer
  <token>`` (401 otherwise); ``http.metrics_auth`` extends that to metrics and health. The token
  file must not be readable by others and is re-read when it changes (rotation without restart).
* ``http.api_port`` serves ``/v1/`` on its own listener (and no longer on ``http.port``).
* Limits: request head size (h11), a head timeout and a body timeout, a body size limit (413,
  from ``Content-Length`` before anything is read), strict ``Content-Length`` (h11 answers 400 to
  anything but digits), a bounded number of open connections (beyond it the oldest connection
  still waiting for its request head is dropped), and a bounded number of threads running API calls.
* Every POST (the state-changing calls), accepted or refused, is written to the audit table.
* Error bodies are ``{"error": reason}``; no traceback ever leaves the process.
* The review station: its static page under ``/review/`` (no data in it, so no token; served
  with the API), its JSON under ``/v1/review/`` (the token, like every ``/v1/`` route) and the
  live feed ``GET /v1/review/events`` (server-sent events from ``daemon.review.feed``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from daemon.audit import AuditLog
from daemon.config import HttpConfig
from daemon.review.feed import Feed
from daemon.review.web import events, static_file
from daemon.security import load_tokens, token_name

log = logging.getLogger("inspectd.http")
ApiCallback = Callable[[str, str, Any, str], tuple[int, dict[str, Any]]]
MAX_HEAD_BYTES = 16384


class TooLarge(Exception):
    """The request body is over ``http.max_body_bytes``."""


class Tokens:
    """The bearer tokens of ``http.token_file``, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._tokens = load_tokens(self.path)  # refuses a file others can read
            self._stamp = stamp

    def who(self, authorization: str | None) -> str | None:
        """The token's name for an ``Authorization`` header value, None if it is missing or wrong."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        try:
            self.reload()
        except Exception:  # a broken rotation keeps the tokens last read
            log.exception("cannot re-read %s; keeping the previous tokens", self.path)
        return token_name(self._tokens, authorization[len("Bearer "):].strip())


class HttpApi:
    """The daemon's HTTP listener(s) on a uvicorn event loop in one thread."""

    def __init__(
        self,
        cfg: HttpConfig,
        render_metrics: Callable[[], bytes],
        is_ready: Callable[[], bool],
        api: ApiCallback,
        audit: Callable[[], AuditLog | None] = lambda: None,
        feed: Feed | None = None,
    ) -> None:
        self.cfg, self.render_metrics, self.is_ready, self.api, self.audit = cfg, render_metrics, is_ready, api, audit
        self.feed = feed
        self.tokens = Tokens(cfg.token_file) if cfg.token_file is not None else None
        self.limiter: anyio.CapacityLimiter | None = None
        self.sockets = [self._bind(cfg.port)]
        self.port = self.sockets[0].getsockname()[1]
        self.api_port = self.port
        if cfg.api_port is not None:
            self.sockets.append(self._bind(cfg.api_port))
            self.api_port = self.sockets[1].getsockname()[1]
        config = uvicorn.Config(
            self._asgi, interface="asgi3", proxy_headers=False, http=_limited_protocol(cfg), lifespan="off",
            log_level="warning", access_log=False,
            timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEAD_BYTES, server_header=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def _bind(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.host, port))
        sock.listen(128)
        sock.set_inheritable(False)
        return sock

    def _serve(self) -> None:
        self.server.run(sockets=self.sockets)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        for s in self.sockets:
            s.close()

    # ------------------------------------------------------------------ requests
    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI app: every path reaches ``_route`` as sent (no router pattern stands in between)."""
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._route(request)
        except Exception:  # the reason stays in the daemon's log, never in the reply
            log.exception("HTTP %s %s failed", request.method, scope.get("path"))
            response = _error(500, "internal error (see the daemon's log)")
        await response(scope, receive, send)

    async def _route(self, request: Request) -> Response:
        path = request.scope["path"]
        server = request.scope.get("server")
        on_api_listener = server is None or server[1] == self.api_port
        if path.startswith("/v1/"):
            if not on_api_listener:
                return _error(404, f"the API is served on port {self.api_port}")
            return await self._api(request, path)
        if path == "/review" or path.startswith("/review/"):
            if not on_api_listener:
                return _error(404, f"the review station is served on port {self.api_port}")
            return static_file(request.method, path)
        if self.cfg.api_port is not None and on_api_listener:
            return _error(404, f"metrics and health are served on port {self.port}")
        if request.method != "GET":
            return _error(405, f"{request.method} {path} is not allowed")
        if self.cfg.metrics_auth and self._who(request) is None:
            return _unauthorized()
        if path == "/metrics":
            return Response(self.render_metrics(), media_type=CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return PlainTextResponse("ok\n")
        if path == "/readyz":
            ok = self.is_ready()
            return PlainTextResponse("ready\n" if ok else "not ready\n", status_code=200 if ok else 503)
        return _error(404, f"no route {path}")

    def _who(self, request: Request) -> str | None:
        """The caller's token name; ``anonymous`` when no token file is configured."""
        if self.tokens is None:
            return "anonymous"
        return self.tokens.who(request.headers.get("authorization"))

    async def _api(self, request: Request, path: str) -> Response:
        full = path + (f"?{request.url.query}" if request.url.query else "")
        who = self._who(request)
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        if who is None:
            status, reply = 401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}
        elif path == "/v1/review/events" and request.method == "GET" and self.feed is not None:
            return events(self.feed, lambda: self.server.should_exit)
        else:
            status, reply = await self._call(request, full, who)
        if request.method != "GET":
            await self._audit(who or "unauthenticated", peer, f"{request.method} {full}", status, reply)
        return _unauthorized() if status == 401 else JSONResponse(reply, status_code=status)

    async def _call(self, request: Request, full: str, who: str) -> tuple[int, dict[str, Any]]:
        try:
            body = await self._body(request)
        except TooLarge:
            return 413, {"error": f"request body over {self.cfg.max_body_bytes} bytes"}
        except TimeoutError:
            return 408, {"error": f"request body not received within {self.cfg.body_timeout_s:g}s"}
        except ClientDisconnect:
            return 400, {"error": "client disconnected"}
        except ValueError:
            return 400, {"error": "body is not JSON"}
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(self.cfg.api_threads)
        try:
            status, reply = await anyio.to_thread.run_sync(self.api, request.method, full, body, who,
                                                           limiter=self.limiter)
        except Exception:  # the reason stays in the daemon's log, never in the reply
            log.exception("API call %s %s failed", request.method, full)
            return 500, {"error": "internal error (see the daemon's log)"}
        return int(status), reply

    async def _body(self, request: Request) -> Any:
        """The JSON body (None if empty), bounded in size and time."""
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.cfg.max_body_bytes:  # h11 has checked it is digits
            raise TooLarge

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.cfg.max_body_bytes:
                    raise TooLarge
                chunks.append(chunk)
            return b"".join(chunks)

        raw = await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        return json.loads(raw) if raw.strip() else None

    async def _audit(self, who: str, peer: str, what: str, status: int, reply: dict[str, Any]) -> None:
        audit = self.audit()
        if audit is None:
            return
        detail = str(reply.get("error") or "")[:500] if status >= 400 else ""
        await anyio.to_thread.run_sync(audit.record, who, peer, what, status, detail, limiter=self.limiter)


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def _unauthorized() -> JSONResponse:
    return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="inspectd"'})


def _limited_protocol(cfg: HttpConfig) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head timeout and a cap on open connections."""
    open_conns: OrderedDict[int, LimitedH11] = OrderedDict()

    class LimitedH11(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_conns[id(self)] = self
            self._head_timer = self.loop.call_later(cfg.header_timeout_s, self._head_overdue)
            if len(open_conns) > cfg.max_connections:
                victim = next((c for c in open_conns.values() if c.cycle is None), self)
                open_conns.pop(id(victim), None)  # connection_lost comes later: do not pick it twice
                victim.transport.close()

        def _head_overdue(self) -> None:
            if self.cycle is None:  # no complete request head yet: slow or half-open
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            open_conns.pop(id(self), None)
            self._head_timer.cancel()
            super().connection_lost(exc)

    return LimitedH11
