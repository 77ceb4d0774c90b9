"""Switching the models the daemon serves, live: reload, shadow, promote, roll back.

Each switch moves pointers on disk first (``workers.model_versions``: ``current``, ``shadow``
and the served history), so an actor Ray restarts later loads the same models, and then has
every actor follow them (``ActorPool.reload``: one call per actor loads the live and the
shadow revision). Actors score frames between calls, never during one, so frames keep flowing
and each verdict names the revision that scored it; no frame is dropped. If any actor cannot
load what the pointers name, the pointers and the history are put back as they were and the
actors follow them again: the daemon keeps serving what it served.

``ModelUpdates`` is a part of ``InspectionService`` (``daemon.service``) reached through its
HTTP API (``daemon.api``); it uses the service's config, pool, reload lock, metrics and log reader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from daemon.security import valid_product
from daemon.shadow import shadow_report
from workers.base import read_meta
from workers.model_store import CURRENT, has_model, product_dir, read_pointer, revision_dir
from workers.model_versions import (
    HISTORY_FILE,
    SHADOW,
    clear_shadow,
    read_shadow,
    roll_back,
    serve,
    set_shadow,
)

log = logging.getLogger("inspectd.service")
Reply = tuple[int, dict[str, Any]]


def revision_version(models_dir: Any, product: str, revision: str) -> str:
    """The ``model_version`` of a stored revision (scorer version + training-data hash)."""
    meta = read_meta(revision_dir(models_dir, product, revision))
    return f"{meta['version']}+{meta['train_hash'][:12]}"


class ModelUpdates:
    """The model-switching routes of the service's API."""

    def reload(self, product: str) -> Reply:
        """Serve the product's newest revision (``enroll --notify``), without a restart."""
        return self._switch(product, "reload", lambda: serve(self.cfg.storage.models_dir, product, action="reload"))

    def promote(self, product: str) -> Reply:
        """Serve the product's shadow revision; it is then no longer a shadow."""
        models = self.cfg.storage.models_dir

        def move() -> str:
            shadow = read_shadow(models, product)  # read under the reload lock
            if shadow is None:
                raise _Refused(409, f"{product!r} has no shadow model to promote (inspectd enroll --shadow)")
            return serve(models, product, shadow, action="promote")

        return self._switch(product, "promote", move)

    def rollback(self, product: str) -> Reply:
        """Serve the revision served before the current one (the history on disk)."""
        models = self.cfg.storage.models_dir

        def move() -> str:
            try:
                return roll_back(models, product)
            except LookupError as e:
                raise _Refused(409, str(e)) from None

        return self._switch(product, "rollback", move)

    def start_shadow(self, product: str, body: Any) -> Reply:
        """Score the product's frames with ``body["revision"]`` (default: the newest) beside the live model."""
        revision = body.get("revision") if isinstance(body, dict) else None
        if revision is not None and not (isinstance(revision, str) and revision.isdigit() and len(revision) <= 8):
            return 400, {"error": 'body must be {} or {"revision": "<digits>"}'}
        models = self.cfg.storage.models_dir

        def move() -> str:
            try:
                set_shadow(models, product, revision)
            except (ValueError, FileNotFoundError) as e:
                raise _Refused(409, str(e)) from None
            return read_pointer(models, product, CURRENT)

        return self._switch(product, "shadow", move)

    def stop_shadow(self, product: str) -> Reply:
        """Stop scoring the product with its shadow model (the live model is untouched)."""
        models = self.cfg.storage.models_dir

        def move() -> str:
            if read_shadow(models, product) is None:
                raise _Refused(409, f"{product!r} has no shadow model")
            clear_shadow(models, product)
            return read_pointer(models, product, CURRENT)

        return self._switch(product, "unshadow", move)

    def shadow_status(self, query: str) -> Reply:
        """``GET /v1/shadow?product=P[&limit=N]``: the shadow's agreement with the live model."""
        args = parse_qs(query)
        product = (args.get("product") or [""])[0]
        if not valid_product(product):
            return 400, {"error": "give ?product=<product>"}
        try:
            limit = int((args.get("limit") or ["100"])[0])
        except ValueError:
            return 400, {"error": "limit must be an integer"}
        models = self.cfg.storage.models_dir
        shadow = read_shadow(models, product) if has_model(models, product) else None
        if shadow is None or self.reader is None:
            return 404, {"error": f"{product!r} has no shadow model"}
        live = read_pointer(models, product, CURRENT)
        report = shadow_report(
            self.reader, product,
            {"revision": live, "version": revision_version(models, product, live)},
            {"revision": shadow, "version": revision_version(models, product, shadow)},
            limit,
        )
        return 200, report

    def _switch(self, product: str, action: str, move: Callable[[], str]) -> Reply:
        """Move the pointers (``move`` returns the revision to serve), then have every actor load
        what they name; on any failure put the pointers back and reload the actors."""
        models = self.cfg.storage.models_dir
        if not has_model(models, product):
            return 404, {"error": f"no model for {product!r} in {models}"}
        assert self.pool is not None
        with self.reload_lock:
            saved = _snapshot(models, product)
            try:
                revision = move()
            except _Refused as e:
                return e.status, {"error": e.reason}
            shadow = read_shadow(models, product)
            try:
                loaded = self.pool.reload(product)
                got = {(x["model_revision"], x.get("shadow_revision")) for x in loaded}
                if got != {(revision, shadow)}:
                    errors = {x.get("shadow_error") for x in loaded} - {None}
                    raise RuntimeError(f"actors loaded {sorted(got, key=str)}, not {(revision, shadow)}; {errors or ''}")
                if len({x["model_version"] for x in loaded}) != 1:
                    raise RuntimeError(f"actors loaded different models: {loaded}")
            except Exception as e:  # a broken artifact must not take the daemon down: back to what served
                log.exception("%s of %s failed; serving what it served before", action, product)
                _restore(models, product, saved)
                if product in self.products:
                    try:
                        self.pool.reload(product)
                    except Exception:
                        log.exception("re-loading the previous models of %s failed too", product)
                return 500, {"error": f"{action} of {product} failed ({type(e).__name__}); the reason is in the "
                                      "daemon's log"}
            (self.pool.shadowed.add if shadow else self.pool.shadowed.discard)(product)
        self.products.add(product)
        self.metrics.allow_product(product)
        self.metrics.model_reloads.labels(product=product).inc()
        log.info("%s: product %s served by model %s (revision %s), shadow %s", action, product,
                 loaded[0]["model_version"], revision, shadow or "none")
        return 200, {"product": product, "model_version": loaded[0]["model_version"], "model_revision": revision,
                     "shadow_revision": shadow,
                     "shadow_version": revision_version(models, product, shadow) if shadow else None,
                     "actors": len(loaded), "nodes": sorted({str(x.get("node_id")) for x in loaded})}


class _Refused(Exception):
    """A switch that cannot be made (nothing to roll back to, no such revision): nothing moved."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


_POINTER_FILES = (CURRENT, SHADOW, HISTORY_FILE)


def _snapshot(models_dir: Any, product: str) -> dict[str, str | None]:
    """The texts of the product's serving pointers and history (None: the file is absent)."""
    d = product_dir(models_dir, product)
    return {name: (d / name).read_text() if (d / name).is_file() else None for name in _POINTER_FILES}


def _restore(models_dir: Any, product: str, saved: dict[str, str | None]) -> None:
    """Put the serving pointers and history back as ``_snapshot`` found them (each file atomically)."""
    d = product_dir(models_dir, product)
    for name, text in saved.items():
        if text is None:
            (d / name).unlink(missing_ok=True)
            continue
        tmp = d / f".{name}.{os.getpid()}.restore"
        tmp.write_text(text)
        os.replace(tmp, d / name)
