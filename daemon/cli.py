"""The ``inspectd`` command: run the daemon, run a sensor, enroll, calibrate, demo, synth, eval."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

DEFAULT_INGEST = "tcp://127.0.0.1:5555"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.config import ConfigError, load_config
    from daemon.service import InspectionService

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"inspectd: {e}", file=sys.stderr)
        return 2
    service = InspectionService(cfg)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    try:
        service.start()
        # after start: ray.init installs its own SIGTERM handler (sys.exit), which would skip the drain's exit 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        print(f"inspectd: ready, metrics on http://{cfg.http.host}:{service.http.port}/metrics", flush=True)
        stop.wait()
    finally:
        logging.getLogger("inspectd").info("stopping: draining in-flight frames")
        service.stop()
    return 0


def cmd_sensor_watch(args: argparse.Namespace) -> int:
    """``inspectd sensor watch DIR``: the hot-folder adapter, until SIGTERM / SIGINT."""
    from sensors.watch import HotFolder

    folder = HotFolder(args.path, args.product, args.endpoint, settle_s=args.settle, sensor_id=args.sensor_id)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"inspectd sensor watch: watching {folder.folder}", flush=True)
    counts = folder.run(stop)
    print(json.dumps({"sensor": args.sensor_id, **counts}), flush=True)
    return 0


def cmd_sensor(args: argparse.Namespace) -> int:
    from sensors.publisher import stream

    if args.source == "watch":
        return cmd_sensor_watch(args)
    if args.source == "sim":
        from sensors.simulated import simulated_parts

        frames = simulated_parts(args.products.split(","), args.parts, args.defect_rate, args.seed, sensor_id=args.sensor_id)
    else:
        from sensors.replay import replay_frames

        frames = replay_frames(args.path, layout=args.layout, product=args.product, split=args.split, sensor_id=args.sensor_id)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop between frames and still report the count
        signal.signal(sig, lambda *_: stop.set())
    n = stream(frames, args.endpoint, rate=args.rate, stop=stop)
    print(json.dumps({"sensor": args.sensor_id, "sent": n}), flush=True)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from sensors.pointfiles import write_xyz_tiff
    from sensors.simulated import simulated_parts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in simulated_parts([args.product], args.count, args.defect_rate, args.seed, good_only=args.defect_rate == 0):
        write_xyz_tiff(out / f"{f.meta.part_id}.tiff", f.points)
    print(f"wrote {args.count} {args.product} scans to {out}")
    return 0


def _post(url: str, body: dict | None = None) -> dict:
    """POST JSON to the daemon's HTTP API; the daemon's error message on failure."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: {e.code} {json.loads(e.read() or b'{}').get('error', '')}") from None
    except OSError as e:
        raise ValueError(f"cannot reach the daemon at {url}: {e}") from None


def cmd_enroll(args: argparse.Namespace) -> int:
    from daemon.config import load_config
    from daemon.enrollment import calibrate, enroll, load_frames
    from workers.model_store import ZERO_SHOT_MODEL

    cfg = load_config(args.config)
    models = Path(args.models or cfg.storage.models_dir)
    if args.cold_start == bool(args.product):
        raise ValueError("give either --product P or --cold-start")
    product = ZERO_SHOT_MODEL if args.cold_start else args.product
    frames = [f for folder in args.good for f in load_frames(folder, args.product or "auxiliary")]
    k = args.holdout
    if k and len(frames) - k < 1:
        raise ValueError(f"--holdout {k} leaves no part to fit on ({len(frames)} parts)")
    path = enroll(models, product, frames[: len(frames) - k], args.scorer, cfg.preprocess.params())
    print(f"enrolled {product} ({args.scorer}, {len(frames) - k} good parts) → {path}")
    if k:
        rec = calibrate(models, product, frames[-k:], cfg.decision.target_frr)
        print(f"calibrated {product} on the {k} held-out parts: threshold {rec['threshold']:.5g}")
    if args.notify:
        reply = _post(f"{args.notify.rstrip('/')}/v1/products/{product}/reload")
        print(f"daemon now serves {product} with model {reply['model_version']} on {reply['actors']} actors")
    return 0


def cmd_mark_good(args: argparse.Namespace) -> int:
    for part_id in args.part_id:
        reply = _post(f"{args.daemon.rstrip('/')}/v1/products/{args.product}/good", {"part_id": part_id})
        print(f"{args.product}/{part_id} marked good → {reply['saved']} ({reply['collected']} collected)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from daemon.config import load_config
    from daemon.enrollment import calibrate, load_frames

    cfg = load_config(args.config)
    models = Path(args.models or cfg.storage.models_dir)
    frr = args.target_frr if args.target_frr is not None else cfg.decision.target_frr
    rec = calibrate(models, args.product, load_frames(args.good, args.product), frr)
    print(f"calibrated {args.product}: threshold {rec['threshold']:.5g} (target FRR {frr}, {rec['n_good']} good parts)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(Path(args.out), n_parts=args.parts, products=args.products.split(","), rate=args.rate, seed=args.seed,
                    scorer=args.scorer)


def cmd_results(args: argparse.Namespace) -> int:
    """``inspectd results``: export verdicts from the result log; ``results prune``: retention."""
    from daemon import results_query as rq

    if not args.log:
        raise ValueError("give --log PATH (the daemon's storage.results)")
    if args.action == "prune":
        report = rq.prune(
            args.log,
            older_than_s=rq.parse_duration(args.older_than) if args.older_than else None,
            max_bytes=rq.parse_size(args.max_bytes) if args.max_bytes else None,
            dry_run=args.dry_run,
        )
        if args.vacuum and not args.dry_run:
            report["file_bytes_freed"] = rq.vacuum(args.log)
        print(json.dumps(report), flush=True)
        return 0
    filters = rq.Filters(
        since=rq.parse_time(args.since) if args.since else None,
        until=rq.parse_time(args.until) if args.until else None,
        product=args.product, verdict=args.verdict, part_id=args.part_id, limit=args.limit,
    )
    rq.export(rq.query(args.log, filters), args.format)
    return 0


def add_results_command(sub: argparse._SubParsersAction) -> None:
    """``inspectd results [--filters] [--format]`` and ``inspectd results prune``."""
    r = sub.add_parser("results", help="export verdicts from the result log (CSV / JSON lines); 'prune' for retention")
    r.add_argument("--log", help="the result log (the daemon's storage.results); opened read-only")
    r.add_argument("--since", help="from this time: ISO 8601 (UTC unless an offset is given), Unix seconds, or 2h (ago)")
    r.add_argument("--until", help="before this time (same forms as --since)")
    r.add_argument("--product")
    r.add_argument("--verdict", choices=["pass", "review", "fail", "error"])
    r.add_argument("--part-id")
    r.add_argument("--format", default="csv", choices=["csv", "jsonl"])
    r.add_argument("--limit", type=int)
    r.set_defaults(func=cmd_results, action=None)
    rsub = r.add_subparsers(dest="action")
    pr = rsub.add_parser("prune", help="delete old rows and their anomaly maps by age and/or total size")
    pr.add_argument("--log", default=argparse.SUPPRESS, help="the result log (the daemon's storage.results)")
    pr.add_argument("--older-than", help="delete verdicts decided longer ago than this, e.g. 30d, 12h")
    pr.add_argument("--max-bytes", help="then delete the oldest until log + maps fit, e.g. 20G, 500M")
    pr.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    pr.add_argument("--vacuum", action="store_true", help="afterwards rewrite the log file to its used size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inspectd", description="3D inspection daemon: pass / fail / review with anomaly maps.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", required=True)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sensor", help="run a sensor adapter process that pushes frames to the daemon")
    ssub = s.add_subparsers(dest="source", required=True)
    sim = ssub.add_parser("sim", help="simulated structured-light camera")
    sim.add_argument("--products", default="flange,gear")
    sim.add_argument("--parts", type=int, default=40)
    sim.add_argument("--defect-rate", type=float, default=0.25)
    sim.add_argument("--seed", type=int, default=0)
    rep = ssub.add_parser("replay", help="replay a folder of PCD / PLY / XYZ-TIFF scans or a dataset layout")
    rep.add_argument("path")
    rep.add_argument("--layout", default="folder", choices=["folder", "mvtec3d", "real3d", "anomaly-shapenet"])
    rep.add_argument("--product", help="product name (folder replay; dataset layouts use the class names)")
    rep.add_argument("--split", default="test")
    wat = ssub.add_parser("watch", help="hot folder: send each complete PCD / PLY / XYZ-TIFF file written there")
    wat.add_argument("path")
    wat.add_argument("--product", required=True)
    wat.add_argument("--settle", type=float, default=1.0,
                     help="seconds a file's size must stay unchanged before it is taken (renamed files: at once)")
    wat.add_argument("--endpoint", default=DEFAULT_INGEST)
    wat.add_argument("--sensor-id", default="watch-0")
    for q in (sim, rep):
        q.add_argument("--endpoint", default=DEFAULT_INGEST)
        q.add_argument("--rate", type=float, default=0.0, help="frames per second (0: as fast as the daemon accepts)")
        q.add_argument("--sensor-id", default=f"{q.prog.split()[-1]}-0")
    s.set_defaults(func=cmd_sensor)

    m = sub.add_parser("simulate", help="write simulated camera scans (XYZ TIFF) of one product to a folder")
    m.add_argument("out")
    m.add_argument("--product", required=True)
    m.add_argument("--count", type=int, default=10)
    m.add_argument("--defect-rate", type=float, default=0.0)
    m.add_argument("--seed", type=int, default=1)
    m.set_defaults(func=cmd_simulate)

    e = sub.add_parser("enroll", help="fit a product's scorer on good parts")
    e.add_argument("--product", help="the product to enroll")
    e.add_argument("--cold-start", action="store_true",
                   help="fit the cold-start model (scores products without a model) on other products' good parts")
    e.add_argument("--good", required=True, action="append", help="folder of good scans (repeatable)")
    e.add_argument("--scorer", default="patchcore-fpfh")
    e.add_argument("--holdout", type=int, default=0, help="keep the last K parts out of the fit and calibrate on them")
    e.add_argument("--notify", metavar="URL", help="the daemon's HTTP address: switch it to the new model live")
    e.add_argument("--config")
    e.add_argument("--models", help="models folder (default: the config's storage.models_dir)")
    e.set_defaults(func=cmd_enroll)

    g = sub.add_parser("mark-good", help="tell the daemon that cold-start parts are good (collects them for enroll)")
    g.add_argument("--product", required=True)
    g.add_argument("--part-id", required=True, action="append")
    g.add_argument("--daemon", default="http://127.0.0.1:9108")
    g.set_defaults(func=cmd_mark_good)

    c = sub.add_parser("calibrate", help="set a product's threshold from held-out good parts")
    c.add_argument("--product", required=True)
    c.add_argument("--good", required=True, help="folder of good scans NOT used for enrollment")
    c.add_argument("--target-frr", type=float)
    c.add_argument("--config")
    c.add_argument("--models")
    c.set_defaults(func=cmd_calibrate)

    d = sub.add_parser("demo", help="enroll, calibrate, start the daemon and a simulated camera, report")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--parts", type=int, default=40)
    d.add_argument("--products", default="flange,gear")
    d.add_argument("--rate", type=float, default=2.0)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--scorer", default="patchcore-fpfh", help="the scorer every demo product is enrolled with")
    d.set_defaults(func=cmd_demo)

    add_results_command(sub)

    from daemon import bench, evaluation, train

    evaluation.add_commands(sub)
    train.add_commands(sub)
    bench.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"inspectd {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
