"""Which revision of a product's model serves, which one runs beside it, and which served before.

Next to the ``latest`` and ``current`` pointers of ``workers.model_store`` a product folder may hold:

    <models_dir>/<product>/shadow          a revision scored beside ``current`` on every frame,
                                           recorded but never deciding (``enroll --shadow``)
    <models_dir>/<product>/history.jsonl   one JSON object per change of ``current``:
                                           {"revision", "action", "from", "at"}

The history is the record ``rollback`` reads: the revisions served, in order, form a stack
(``serve``, ``promote`` and ``reload`` push; ``rollback`` pops), so two rollbacks go back two
versions. It also tells the daemon at start whether ``latest`` is new (never served, not the
shadow: serve it, as before) or was served already and rolled back from (keep ``current``),
so a restart never undoes a rollback nor promotes a shadow. The file keeps its last
``HISTORY_KEEP`` lines. Every pointer is replaced atomically; only the daemon (and the CLI
without a daemon) moves them, under the daemon's reload lock.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from workers.model_store import (
    CURRENT,
    LATEST,
    product_dir,
    read_pointer,
    revision_dir,
    switch_current,
)

SHADOW = "shadow"
HISTORY_FILE = "history.jsonl"
HISTORY_KEEP = 500
"""Lines of ``history.jsonl`` kept (a switch is an operator's act: years of them)."""
ROLLBACK = "rollback"


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_shadow(models_dir: str | Path, product: str) -> str | None:
    """The product's shadow revision, or None when it has none."""
    path = product_dir(models_dir, product) / SHADOW
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def set_shadow(models_dir: str | Path, product: str, revision: str | None = None) -> str:
    """Point ``shadow`` at ``revision`` (default: ``latest``); refuses the revision now serving."""
    revision = revision or read_pointer(models_dir, product, LATEST)
    if not revision_dir(models_dir, product, revision).is_dir():
        raise FileNotFoundError(f"{product!r} has no revision {revision!r} in {models_dir}")
    if revision == read_pointer(models_dir, product, CURRENT):
        raise ValueError(f"revision {revision} of {product!r} is the one serving: a shadow must be another revision")
    _replace_text(product_dir(models_dir, product) / SHADOW, revision + "\n")
    return revision


def clear_shadow(models_dir: str | Path, product: str) -> None:
    """Remove the product's shadow pointer (no error when there is none)."""
    (product_dir(models_dir, product) / SHADOW).unlink(missing_ok=True)


def read_history(models_dir: str | Path, product: str) -> list[dict[str, Any]]:
    """The recorded changes of ``current``, oldest first (unreadable lines are skipped)."""
    path = product_dir(models_dir, product) / HISTORY_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("revision"), str):
            out.append(entry)
    return out


def served_stack(models_dir: str | Path, product: str) -> list[str]:
    """The revisions served in turn, the one serving now last: what ``rollback`` walks back."""
    stack: list[str] = []
    for entry in read_history(models_dir, product):
        if entry.get("action") == ROLLBACK and stack:
            stack.pop()
        if not stack or stack[-1] != entry["revision"]:
            stack.append(entry["revision"])
    return stack


def _record(models_dir: str | Path, product: str, revision: str, action: str, before: str | None) -> None:
    path = product_dir(models_dir, product) / HISTORY_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines and before is not None and before != revision:
        # a folder served before the history existed: its revision is where a rollback returns
        lines.append(json.dumps({"revision": before, "action": "serve", "from": None, "at": time.time()}))
    lines.append(json.dumps({"revision": revision, "action": action, "from": before, "at": time.time()}))
    _replace_text(path, "\n".join(lines[-HISTORY_KEEP:]) + "\n")


def _current_or_none(models_dir: str | Path, product: str) -> str | None:
    path = product_dir(models_dir, product) / CURRENT
    return path.read_text().strip() if path.is_file() else None


def serve(models_dir: str | Path, product: str, revision: str | None = None, action: str = "serve") -> str:
    """Point ``current`` at ``revision`` (default: ``latest``) and record it; a shadow that is
    now the serving revision is dropped. Returns the revision."""
    before = _current_or_none(models_dir, product)
    revision = switch_current(models_dir, product, revision)
    if before != revision or not read_history(models_dir, product):
        _record(models_dir, product, revision, action, before)
    if read_shadow(models_dir, product) == revision:
        clear_shadow(models_dir, product)
    return revision


def rollback_target(models_dir: str | Path, product: str) -> str | None:
    """The revision served before the current one, or None when none is recorded."""
    stack = served_stack(models_dir, product)
    current = _current_or_none(models_dir, product)
    if current is not None and stack and stack[-1] != current:
        return stack[-1]  # current moved outside the record (an old daemon): back to the last recorded
    return stack[-2] if len(stack) >= 2 else None


def roll_back(models_dir: str | Path, product: str) -> str:
    """Point ``current`` back at the revision served before it; ``LookupError`` when none is recorded."""
    target = rollback_target(models_dir, product)
    if target is None:
        raise LookupError(f"no earlier served revision of {product!r} is recorded in {models_dir}")
    before = _current_or_none(models_dir, product)
    switch_current(models_dir, product, target)
    _record(models_dir, product, target, ROLLBACK, before)
    return target


def start_revision(models_dir: str | Path, product: str) -> str:
    """What the daemon serves at start: ``latest`` if it is new (never served, not the shadow),
    else the revision ``current`` names; the choice is recorded like any switch."""
    latest = read_pointer(models_dir, product, LATEST)
    current = _current_or_none(models_dir, product)
    seen = {e["revision"] for e in read_history(models_dir, product)}
    if current is None or (latest not in seen and latest != read_shadow(models_dir, product)):
        return serve(models_dir, product, latest)
    if not revision_dir(models_dir, product, current).is_dir():
        return serve(models_dir, product, latest)
    return serve(models_dir, product, current)
