"""Anomaly maps as files an operator can open: npz always, plus a PNG (organized frames) or a
colored PLY (point clouds).

Colors: the score divided by twice the threshold, clipped to [0, 1], through a blue → green →
yellow → red ramp, so the threshold sits at the middle of the scale whatever the product's
score units; pixels without a measurement are dark grey.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

from daemon.security import inside

_RAMP = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.8, 0.6], [0.6, 0.9, 0.0], [1.0, 0.8, 0.0], [1.0, 0.2, 0.0], [0.6, 0.0, 0.0]]
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def colorize(values: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 RGB for scores (any shape); the threshold maps to the ramp's middle."""
    scale = 2.0 * threshold if threshold and threshold > 0 else max(float(np.nanmax(values, initial=0.0)), 1e-12)
    v = np.clip(np.nan_to_num(values / scale, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    rgb[np.isnan(values)] = 0.15
    return (rgb * 255).astype(np.uint8)


def write_maps(
    maps_dir: Path, product: str, part_id: str, verdict: str, anomaly_map: np.ndarray, points: np.ndarray, threshold: float
) -> Path:
    """Write ``<maps_dir>/<product>/<YYYY-MM-DD>/<part_id>.{npz,png|ply}``; returns the npz path."""
    day = time.strftime("%Y-%m-%d")
    folder = inside(maps_dir, product, day)  # the wire validated the product name; this is the last line
    folder.mkdir(parents=True, exist_ok=True)
    stem = _UNSAFE.sub("_", part_id)[:120] or "part"
    npz = inside(folder, f"{stem}.npz")
    np.savez_compressed(npz, anomaly_map=anomaly_map, verdict=np.array(verdict), threshold=np.float32(threshold))
    if anomaly_map.ndim == 2:
        Image.fromarray(colorize(anomaly_map, threshold)).save(folder / f"{stem}.png")
    else:
        import open3d as o3d

        ok = np.isfinite(points).all(axis=1)
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[ok].astype(np.float64)))
        pcd.colors = o3d.utility.Vector3dVector(colorize(anomaly_map[ok], threshold).astype(np.float64) / 255.0)
        o3d.io.write_point_cloud(str(folder / f"{stem}.ply"), pcd)
    return npz
