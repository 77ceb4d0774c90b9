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


def cmd_sensor(args: argparse.Namespace) -> int:
    from sensors.publisher import stream

    if args.source == "sim":
        from sensors.simulated import simulated_parts

        frames = simulated_parts(args.products.split(","), args.parts, args.defect_rate, args.seed, sensor_id=args.sensor_id)
    else:
        from sensors.replay import replay_frames

        frames = replay_frames(args.path, layout=args.layout, product=args.product, split=args.split, sensor_id=args.sensor_id)
    n = stream(frames, args.endpoint, rate=args.rate)
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


def cmd_enroll(args: argparse.Namespace) -> int:
    from daemon.config import load_config
    from daemon.enrollment import enroll, load_frames

    cfg = load_config(args.config)
    models = Path(args.models or cfg.storage.models_dir)
    frames = load_frames(args.good, args.product)
    path = enroll(models, args.product, frames, args.scorer, cfg.preprocess.params())
    print(f"enrolled {args.product} ({args.scorer}, {len(frames)} good parts) → {path}")
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

    return run_demo(Path(args.out), n_parts=args.parts, products=args.products.split(","), rate=args.rate, seed=args.seed)


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
    e.add_argument("--product", required=True)
    e.add_argument("--good", required=True, help="folder of good scans")
    e.add_argument("--scorer", default="patchcore-fpfh")
    e.add_argument("--config")
    e.add_argument("--models", help="models folder (default: the config's storage.models_dir)")
    e.set_defaults(func=cmd_enroll)

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
    d.set_defaults(func=cmd_demo)

    from daemon import evaluation

    evaluation.add_commands(sub)
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
