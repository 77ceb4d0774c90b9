"""Copy a point-cloud dataset (real3d or anomaly-shapenet layout) with every TEST part in an arbitrary pose.

Each test PCD and its ground-truth file (same points, same order) are rotated by one random
SO(3) rotation (uniform, ``scipy.spatial.transform.Rotation.random``) about the part's centroid,
seeded per file, so the copy is reproducible. Training parts, dataset.json and every other file
are copied unchanged. Usage::

    python scripts/rotate_test_parts.py SRC DST --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from sensors.pointfiles import read_pcd, write_pcd


def _rotation(seed: int, rel: str) -> np.ndarray:
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "little")
    return Rotation.random(random_state=digest % (2**32)).as_matrix()


def _rotate(points: np.ndarray, rot: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return (points - centre) @ rot.T + centre


def rotate_dataset(src: Path, dst: Path, seed: int) -> int:
    """Write the rotated copy; returns how many test parts were rotated."""
    if dst.exists():
        raise SystemExit(f"{dst} exists; choose a new folder")
    shutil.copytree(src, dst)
    n = 0
    for pcd in sorted(dst.glob("*/test/*.pcd")):
        rel = str(pcd.relative_to(dst))
        pts = np.asarray(read_pcd(pcd)[0], dtype=np.float64)
        rot = _rotation(seed, rel)
        centre = pts.mean(axis=0)
        write_pcd(pcd, _rotate(pts, rot, centre))
        cls_dir = pcd.parent.parent
        for gt_dir in ("gt", "GT"):
            gt = cls_dir / gt_dir / (pcd.stem + ".txt")
            if gt.is_file():
                sep = "," if "," in gt.read_text().split("\n", 1)[0] else None
                table = np.loadtxt(gt, delimiter=sep, ndmin=2)
                table[:, :3] = _rotate(table[:, :3], rot, centre)
                np.savetxt(gt, table, fmt=["%.6f", "%.6f", "%.6f", "%d"], delimiter=sep or " ")
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"rotated {rotate_dataset(args.src, args.dst, args.seed)} test parts into {args.dst}")


if __name__ == "__main__":
    main()
