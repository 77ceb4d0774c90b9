"""Time patchcore-fpfh, template and fused per ~30K-point part in one run, and registration alone.

Parts: the real3d-layout training templates of one class of an ``inspectd synth`` dataset (32 000
points each, not voxelized, so each scored cloud has ~30K points). The scorers are fitted on all
templates but the last; the last, in ``--poses`` random SO(3) poses, is scored ``--repeat`` times
per pose by each scorer. Prints wall and CPU seconds per part (medians) and the ratio to
patchcore-fpfh. Usage::

    OMP_NUM_THREADS=2 python scripts/time_template.py /tmp/t12b/real3d-s1 --cls flange
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from sensors.pointfiles import read_pcd
from workers.fused import FusedScorer
from workers.patchcore import PatchCoreFPFHScorer
from workers.preprocess import PreparedCloud
from workers.template import TemplateScorer


def cloud(points: np.ndarray) -> PreparedCloud:
    n = len(points)
    return PreparedCloud(points=points.astype(np.float32), source_flat=np.arange(n), voxel_of_source=np.arange(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--cls", default="flange")
    ap.add_argument("--poses", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    files = sorted((args.dataset / args.cls / "train").glob("*.pcd"))
    parts = [np.asarray(read_pcd(f)[0], dtype=np.float64) for f in files]
    train, test = [cloud(p) for p in parts[:-1]], parts[-1]
    scorers = {"patchcore-fpfh": PatchCoreFPFHScorer(), "template": TemplateScorer(), "fused": FusedScorer()}
    for s in scorers.values():
        s.fit(train)
    wall: dict[str, list[float]] = {k: [] for k in [*scorers, "registration"]}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for i in range(args.poses):
        rot = Rotation.random(random_state=i).as_matrix()
        c = cloud(test @ rot.T + 20.0)
        for _ in range(args.repeat):
            for name, s in scorers.items():
                w0, c0 = time.perf_counter(), time.process_time()
                s.score(c)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            w0, c0 = time.perf_counter(), time.process_time()
            reg = scorers["template"].register_part(c)
            wall["registration"].append(time.perf_counter() - w0)
            cpu["registration"].append(time.process_time() - c0)
    base_w, base_c = statistics.median(wall["patchcore-fpfh"]), statistics.median(cpu["patchcore-fpfh"])
    print(f"part: {len(test)} points; last registration fitness {reg.fitness:.3f}")
    print("| scorer | wall s / part | CPU s / part | wall ratio | CPU ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in wall:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {w:.3f} | {c:.3f} | {w / base_w:.2f} | {c / base_c:.2f} |")


if __name__ == "__main__":
    main()
