"""``inspectd labels list|export``: the operators' decisions kept in the result log (``daemon.labels``).

Reads the result log and the label store named by the daemon's config (``storage.results``,
``storage.data_dir``), or by ``--log`` / ``--data-dir``. ``list`` prints one line per decision;
``export`` writes JSON lines or CSV (to a file or stdout), corrections included: the newest
decision on a part is the one that counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from daemon.labels import FORMATS, LABELS, LabelStore
from daemon.results_query import parse_time


def _store(args: argparse.Namespace) -> LabelStore:
    from daemon.config import load_config

    cfg = load_config(args.config) if args.config else None
    log = Path(args.log) if args.log else (cfg.storage.results if cfg else None)
    if log is None:
        raise ValueError("give --config C (the daemon's config) or --log RESULTS.sqlite")
    if not log.is_file():
        raise FileNotFoundError(f"no result log at {log}")
    data = Path(args.data_dir) if args.data_dir else (cfg.storage.data_dir if cfg else log.parent)
    return LabelStore(log, data / "labels")


def cmd_labels(args: argparse.Namespace) -> int:
    store = _store(args)
    since = parse_time(args.since) if args.since else None
    try:
        if args.action == "export":
            text = store.export(args.format, args.product, args.label, since)
            if args.out:
                Path(args.out).write_text(text)
                print(f"wrote {text.count(chr(10)) - (args.format == 'csv')} decisions to {args.out}", file=sys.stderr)
            else:
                sys.stdout.write(text)
            return 0
        labels = store.list(args.product, args.label, since)
        for x in labels:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x.at))
            region = f" region {len(x.region)}" if x.region else ""
            score = f" score {x.object_score:.4g}" if x.object_score is not None else ""
            print(f"{when}  {x.product:<12} {x.part_id:<24} {x.label:<9} {x.kind or '':<14} by {x.user}{score}{region}"
                  f"  {x.scan}")
        print(f"{len(labels)} decisions", file=sys.stderr)
        return 0
    finally:
        store.close()


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``labels`` on the ``inspectd`` parser."""
    p = sub.add_parser("labels", help="list or export the operators' decisions (good / defective with kind)")
    p.add_argument("action", choices=["list", "export"])
    p.add_argument("--config", help="the daemon's config (storage.results and storage.data_dir)")
    p.add_argument("--log", help="the result log (default: the config's storage.results)")
    p.add_argument("--data-dir", help="the label store's parent (default: the config's storage.data_dir)")
    p.add_argument("--product")
    p.add_argument("--label", choices=LABELS)
    p.add_argument("--since", help="ISO time, Unix seconds, or a duration ago (8h)")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="export format")
    p.add_argument("--out", help="export to this file instead of stdout")
    p.set_defaults(func=cmd_labels)
