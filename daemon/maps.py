"""Anomaly maps as files an operator can open: npz always, plus a PNG (organized frames) or a
colored PLY (point clouds). The npz also keeps the scan's points (float32, mm, in the frame's
order, (H*W, 3) for organized frames), so the review station can draw the map on the part and
store the scan when a person labels it.

Colors: the score divided by twice the threshold, clipped to [0, 1], through a blue → green →
yellow → red ramp, so the threshold sits at the middle of the scale whatever the product's
score units; pixels without a measurement are dark grey.
"""

from __future__ import annotations

import heapq
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from daemon.security import inside

_RAMP = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.8, 0.6], [0.6, 0.9, 0.0], [1.0, 0.8, 0.0], [1.0, 0.2, 0.0], [0.6, 0.0, 0.0]]
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
log = logging.getLogger("inspectd.maps")


def file_stem(part_id: str) -> str:
    """A file name stem for a part id: safe characters only, no leading dot (``..`` → ``part``)."""
    return _UNSAFE.sub("_", part_id).lstrip(".")[:120] or "part"


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
    """Write ``<maps_dir>/<product>/<YYYY-MM-DD>/<part_id>.{npz,png|ply}``; returns the npz path.
    ``points`` are the frame's points in mm, (N, 3)."""
    day = time.strftime("%Y-%m-%d")
    folder = inside(maps_dir, product, day)  # the wire validated the product name; this is the last line
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(part_id)
    npz = inside(folder, f"{stem}.npz")
    np.savez_compressed(npz, anomaly_map=anomaly_map, verdict=np.array(verdict), threshold=np.float32(threshold),
                        points=np.asarray(points, dtype=np.float32).reshape(-1, 3))
    if anomaly_map.ndim == 2:
        Image.fromarray(colorize(anomaly_map, threshold)).save(folder / f"{stem}.png", format="PNG")
    else:
        import open3d as o3d

        ok = np.isfinite(points).all(axis=1)
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[ok].astype(np.float64)))
        pcd.colors = o3d.utility.Vector3dVector(colorize(anomaly_map[ok], threshold).astype(np.float64) / 255.0)
        o3d.io.write_point_cloud(str(folder / f"{stem}.ply"), pcd)
    return npz


class MapRetention:
    """Keeps the map files under ``maps_dir`` within a byte budget and an age: the oldest go first.

    The files are scanned once at start; after that every written file is added with ``track``,
    so pruning costs no directory walk. ``prune`` returns how many files it deleted."""

    def __init__(self, maps_dir: Path, max_bytes: float, max_age_s: float) -> None:
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._lock = threading.Lock()
        self._files: list[tuple[float, str, int]] = []  # heap of (mtime, path, size)
        self.total = 0
        root = Path(maps_dir)
        if root.is_dir():
            for f in root.rglob("*"):
                try:
                    st = f.stat()
                except OSError:
                    continue
                if f.is_file():
                    self._push(st.st_mtime, f, st.st_size)

    def _push(self, mtime: float, path: Path, size: int) -> None:
        heapq.heappush(self._files, (mtime, str(path), size))
        self.total += size

    def track(self, npz: Path) -> None:
        """Account for the files written for one verdict (the npz and its image or cloud)."""
        with self._lock:
            for f in npz.parent.glob(f"{npz.stem}.*"):
                try:
                    st = f.stat()
                except OSError:
                    continue
                self._push(st.st_mtime, f, st.st_size)

    def prune(self, now: float | None = None) -> int:
        """Delete the oldest files while over budget or older than the age limit."""
        now = time.time() if now is None else now  # file mtimes are wall-clock timestamps
        deleted = 0
        with self._lock:
            while self._files and (self.total > self.max_bytes or self._files[0][0] < now - self.max_age_s):
                _, path, size = heapq.heappop(self._files)
                self.total -= size
                try:
                    Path(path).unlink()
                    deleted += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warning("cannot delete map file %s: %s", path, e)
        return deleted
