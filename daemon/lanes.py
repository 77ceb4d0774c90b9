"""The emitter's input: two bounded lanes, scored verdicts served before error verdicts.

A flood of refused messages must not delay the verdicts of real parts, so errors wait in their
own lane and are taken only when no scored verdict is waiting. Both lanes are bounded: a full
lane makes its producer wait (ingest then stops reading, and ZeroMQ's high-water marks push
back on the senders).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

SCORED = "scored"
ERRORS = "errors"


class EmitLanes:
    """``put(item, lane)`` blocks while that lane is full; ``get`` returns the oldest scored item,
    else the oldest error, waiting for one."""

    def __init__(self, scored_size: int, errors_size: int) -> None:
        self._lanes: dict[str, deque[Any]] = {SCORED: deque(), ERRORS: deque()}
        self._limits = {SCORED: scored_size, ERRORS: errors_size}
        self._cond = threading.Condition()

    def put(self, item: Any, lane: str = SCORED, timeout: float | None = None) -> bool:
        """Append ``item`` to ``lane``; False if it stayed full for ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            q = self._lanes[lane]
            while len(q) >= self._limits[lane]:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            q.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """(lane, item), scored first; None after ``timeout`` seconds with nothing waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for lane in (SCORED, ERRORS):
                    if self._lanes[lane]:
                        item = self._lanes[lane].popleft()
                        self._cond.notify_all()
                        return lane, item
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def depth(self, lane: str) -> int:
        """Items waiting in ``lane``."""
        with self._cond:
            return len(self._lanes[lane])
