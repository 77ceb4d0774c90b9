"""The live feed: verdicts fanned out to the review station's browsers as server-sent events.

The emitter calls ``Feed.publish`` once per verdict; it must never block or grow because a
browser reads slowly. So each client has a bounded buffer of ``per_client`` verdicts: when it is
full the client's buffer is emptied and the client is told to resync (it reloads its queue
from ``/v1/review/queue``) instead of the emitter waiting. The number of clients is bounded too
(``max_clients``; one more is answered 503). ``publish`` takes one short lock and wakes each
client's event loop without waiting for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

#: The verdict fields a feed event carries (the rest, the map included, is one GET away).
FIELDS = ("verdict_id", "product", "part_id", "sensor_id", "seq", "verdict", "score", "threshold", "review_low",
          "fail_from", "zero_shot", "scorer", "model_version", "decided_at", "latency_ms", "map_path")


def summary(header: dict[str, Any]) -> dict[str, Any]:
    """The feed's view of a verdict header (the error reason kept, the map path reduced to a flag)."""
    out = {k: header.get(k) for k in FIELDS}
    out["has_map"] = bool(out.pop("map_path"))
    err = header.get("error")
    out["error"] = err.get("reason") if isinstance(err, dict) else None
    return out


class Client:
    """One browser's bounded buffer, filled by the emitter thread and drained on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop, self.size = loop, size
        self.items: deque[dict[str, Any]] = deque()
        self.resync = False
        self.wake = asyncio.Event()
        self._lock = threading.Lock()
        self._pending = False

    def offer(self, item: dict[str, Any]) -> None:
        """Called by the emitter: append, or on overflow drop everything and ask for a resync."""
        with self._lock:
            if len(self.items) >= self.size:
                self.items.clear()
                self.resync = True
            else:
                self.items.append(item)
            if self._pending:
                return
            self._pending = True
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
            pass

    def _set(self) -> None:
        with self._lock:
            self._pending = False
        self.wake.set()

    async def take(self, timeout: float) -> tuple[list[dict[str, Any]], bool]:
        """The verdicts waiting and whether the client must resync; waits up to ``timeout`` s for one."""
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            pass
        self.wake.clear()
        with self._lock:
            items, resync = list(self.items), self.resync
            self.items.clear()
            self.resync = False
        return items, resync


class Feed:
    """The fan-out: at most ``max_clients`` clients with ``per_client`` buffered verdicts each."""

    def __init__(self, max_clients: int = 8, per_client: int = 256) -> None:
        self.max_clients, self.per_client = max_clients, per_client
        self._clients: list[Client] = []
        self._lock = threading.Lock()
        self.published = 0

    def publish(self, header: dict[str, Any]) -> None:
        """Hand a verdict to every client; never blocks on a client."""
        item = summary(header)
        with self._lock:
            clients = list(self._clients)
            self.published += 1
        for c in clients:
            c.offer(item)

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Client | None:
        """A new client, or None when ``max_clients`` are connected."""
        with self._lock:
            if len(self._clients) >= self.max_clients:
                return None
            c = Client(loop, self.per_client)
            self._clients.append(c)
            return c

    def unsubscribe(self, client: Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)
