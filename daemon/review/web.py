"""The review station's HTTP side that is not JSON: its static page and the live feed stream.

* ``static_file``: the files of ``daemon/review/static/`` (package data: HTML, JS, CSS; nothing
  is loaded from elsewhere, and the Content-Security-Policy says so to the browser). They hold
  no data, so they need no token; every byte of data comes from ``/v1/``, which does.
* ``events``: ``GET /v1/review/events``, server-sent events. The browser reads it with
  ``fetch`` (which can send ``Authorization: Bearer``, unlike ``EventSource``), so the token
  never appears in a URL. Events: ``verdict`` (one verdict's summary), ``resync`` (this client
  fell behind and missed verdicts: reload the queue), and a comment line as keep-alive.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from daemon.review.feed import Feed

STATIC = Path(__file__).resolve().parent / "static"
_NAME = re.compile(r"[a-z0-9_-]{1,40}\.(html|js|css|svg)\Z")
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
          "svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
KEEPALIVE_S = 15.0


def static_file(method: str, path: str) -> Response:
    """``/review/`` → index.html; ``/review/<name>`` → that file of the package's static folder."""
    if method not in ("GET", "HEAD"):
        return JSONResponse({"error": f"{method} {path} is not allowed"}, status_code=405)
    if path == "/review":
        return RedirectResponse("/review/", status_code=308)
    name = path.removeprefix("/review/") or "index.html"
    m = _NAME.fullmatch(name)
    if m is None or not (STATIC / name).is_file():
        return JSONResponse({"error": f"no file {name!r} in the review station"}, status_code=404)
    return Response((STATIC / name).read_bytes(), media_type=_TYPES[m.group(1)], headers=HEADERS)


def events(feed: Feed, stopping: Callable[[], bool]) -> Response:
    """The live feed for one browser (503 when ``feed.max_clients`` are connected already)."""
    client = feed.subscribe(asyncio.get_running_loop())
    if client is None:
        return JSONResponse({"error": f"{feed.max_clients} live-feed clients are connected already"}, status_code=503)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 2000\n\nevent: hello\ndata: {}\n\n"
            quiet = 0.0
            while not stopping():
                items, resync = await client.take(1.0)
                if resync:
                    yield b"event: resync\ndata: {}\n\n"
                for item in items:
                    yield f"event: verdict\ndata: {json.dumps(item, default=str)}\n\n".encode()
                quiet = 0.0 if items or resync else quiet + 1.0
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield b": keep-alive\n\n"
        finally:
            feed.unsubscribe(client)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
