"""``inspectd models``, ``shadow``, ``promote`` and ``rollback``: the revisions a product has and
which of them the daemon serves (docs/model-updates.md).

``promote``, ``rollback`` and ``shadow start|stop`` ask the running daemon (``--daemon URL``,
with the bearer token of ``--token-file`` or of ``--config``'s ``http.token_file``), which moves
the pointers on disk and has every actor follow them without a restart. ``models list`` reads
the folder only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DAEMON = "http://127.0.0.1:9108"


def enroll_shadow(models: Path, product: str, revision: str, notify: str | None, token: str | None) -> None:
    """After ``enroll --shadow``: have the daemon at ``notify`` score ``revision`` beside the live
    model now, or (no daemon named) point ``shadow`` at it, for the daemon's next start."""
    from daemon.cli import _post
    from workers.model_versions import set_shadow

    if notify:
        reply = _post(f"{notify.rstrip('/')}/v1/products/{product}/shadow", {"revision": revision}, token)
        print(f"daemon scores {product} with shadow model {reply['shadow_version']} (revision {revision}) beside "
              f"the live {reply['model_version']} (revision {reply['model_revision']}) on {reply['actors']} actors")
        return
    set_shadow(models, product, revision)
    print(f"revision {revision} of {product} is the shadow from the daemon's next start "
          "(use --notify URL to load it into a running daemon now)")


def cmd_models(args: argparse.Namespace) -> int:
    """List each product's latest, served and shadow revision and where a rollback would go."""
    from workers.model_store import (
        CURRENT,
        LATEST,
        ZERO_SHOT_MODEL,
        enrolled_products,
        has_model,
        legacy_products,
        migrate_models_dir,
        read_pointer,
    )
    from workers.model_versions import read_shadow, rollback_target

    if args.action == "migrate":
        done = migrate_models_dir(args.dir)
        print(f"migrated {len(done)} model folder(s) in {args.dir} to format 2" + (f": {', '.join(done)}" if done else ""))
        return 0
    old = legacy_products(args.dir)
    for name in enrolled_products(args.dir) + ([ZERO_SHOT_MODEL] if has_model(args.dir, ZERO_SHOT_MODEL) else []):
        line = f"{name}: latest {read_pointer(args.dir, name, LATEST)}, served {read_pointer(args.dir, name, CURRENT)}"
        shadow, back = read_shadow(args.dir, name), rollback_target(args.dir, name)
        line += f", shadow {shadow}" if shadow else ""
        line += f", rollback to {back}" if back else ""
        print(line)
    for name in old:
        print(f"{name}: old format 1, run `inspectd models migrate {args.dir}`")
    return 1 if old else 0


def _daemon_call(args: argparse.Namespace, action: str, body: dict | None = None) -> dict:
    from daemon.cli import _post, _token
    from daemon.security import valid_product

    if not valid_product(args.product):
        raise ValueError(f"--product {args.product!r} is not a valid product name")
    url = f"{args.daemon.rstrip('/')}/v1/products/{args.product}/{action}"
    return _post(url, body, _token(args.token_file, args.config))


def _say(verb: str, reply: dict) -> None:
    shadow = f"; shadow revision {reply['shadow_revision']}" if reply.get("shadow_revision") else ""
    print(f"{verb}: daemon serves {reply['product']} with model {reply['model_version']} (revision "
          f"{reply['model_revision']}) on {reply['actors']} actors{shadow}")


def cmd_promote(args: argparse.Namespace) -> int:
    _say("promoted", _daemon_call(args, "promote"))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    _say("rolled back", _daemon_call(args, "rollback"))
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    """``shadow report`` prints the daemon's ``GET /v1/shadow`` answer; ``start`` / ``stop`` switch."""
    import json

    from daemon.cli import _post, _token

    if args.action == "report":
        from urllib.parse import quote

        url = f"{args.daemon.rstrip('/')}/v1/shadow?product={quote(args.product)}&limit={args.limit}"
        print(json.dumps(_post(url, token=_token(args.token_file, args.config), method="GET"), indent=2))
        return 0
    if args.action == "start":
        _say("shadow started", _daemon_call(args, "shadow", {"revision": args.revision} if args.revision else None))
    else:
        _say("shadow stopped", _daemon_call(args, "unshadow"))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``models``, ``shadow``, ``promote`` and ``rollback``."""
    mo = sub.add_parser("models", help="list (latest, served, shadow, rollback target) or migrate a models folder")
    mo.add_argument("action", choices=["list", "migrate"])
    mo.add_argument("dir", help="the models folder (storage.models_dir)")
    mo.set_defaults(func=cmd_models)

    def daemon_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--product", required=True)
        p.add_argument("--daemon", default=DEFAULT_DAEMON, help="the daemon's HTTP address")
        p.add_argument("--token-file", help="bearer token file (default: the config's http.token_file)")
        p.add_argument("--config", help="the daemon's config (for http.token_file)")

    pr = sub.add_parser("promote", help="serve the product's shadow model (live, no restart)")
    daemon_args(pr)
    pr.set_defaults(func=cmd_promote)
    rb = sub.add_parser("rollback", help="serve the revision served before the current one (live, no restart)")
    daemon_args(rb)
    rb.set_defaults(func=cmd_rollback)
    sh = sub.add_parser("shadow", help="a model scored beside the live one without deciding: report, start, stop")
    sh.add_argument("action", choices=["report", "start", "stop"])
    daemon_args(sh)
    sh.add_argument("--revision", help="start: the revision to shadow (default: the newest)")
    sh.add_argument("--limit", type=int, default=20, help="report: the most disagreements listed")
    sh.set_defaults(func=cmd_shadow)
