"""``GET /v1/verdicts``: committed verdicts from the result log, for subscribers that missed some.

PUB/SUB does not replay, so a subscriber that was away (or whose messages PUB dropped) pages
through the log instead: by ``verdict_id`` (``after_id``), by sensor, or by a time window on
``decided_at``. The route is read-only and each page is bounded (docs/protocol.md, "Replay").
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from daemon.resultlog import MAX_PAGE, LogReader

PARAMS = {"sensor_id", "after_id", "since", "until", "limit"}


def verdicts_page(reader: LogReader | None, query: str) -> tuple[int, dict[str, Any]]:
    """Answer ``/v1/verdicts?<query>``: ``(status, {"verdicts", "last_id", "more"})`` or an error."""
    if reader is None:
        return 503, {"error": "the result log is not open yet"}
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(q) - PARAMS
    if unknown:
        return 400, {"error": f"unknown parameter(s): {', '.join(sorted(unknown))}"}
    try:
        after_id = int(q.get("after_id", 0))
        limit = int(q.get("limit", 100))
        since = float(q["since"]) if "since" in q else None
        until = float(q["until"]) if "until" in q else None
    except ValueError:
        return 400, {"error": "after_id and limit must be integers, since and until Unix seconds"}
    if not 1 <= limit <= MAX_PAGE:
        return 400, {"error": f"limit must be 1..{MAX_PAGE}"}
    rows = reader.page(q.get("sensor_id"), after_id, since, until, limit)
    last = rows[-1]["verdict_id"] if rows else after_id
    return 200, {"verdicts": rows, "last_id": last, "more": len(rows) == limit}
