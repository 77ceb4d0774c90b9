"""The part view's data: the anomaly map drawn on the part, ready for the browser.

* Organized frames: a PNG of the depth image (grey) with the anomaly map as a heat map over it
  (the map's colour on every measured pixel, more opaque as the score rises, so the part shows
  through where it looks normal), plus the depth image alone; clicks on it are pixel indices
  ``row * width + col``.
* Point clouds: up to ``MAX_POINTS`` valid points (an even subsample of larger clouds) with
  their scores and colours; ``index`` gives each one's index in the scan, which is what a
  marked region stores.

Colours come from ``daemon.maps.colorize`` (the threshold sits at the middle of the ramp), the
same as the map files, and the legend is sent along so the browser draws no ramp of its own.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from daemon.maps import colorize

MAX_POINTS = 40_000
LEGEND_STEPS = 32


def load_scan(map_path: str | None, maps_dir: Path) -> tuple[np.ndarray, np.ndarray | None, float] | None:
    """(anomaly map, points in mm or None for maps written before points were kept, threshold)
    from a verdict's npz, or None when there is none (policy, retention). Refuses a path outside
    ``maps_dir``: the path comes from the log, but the log is not a reason to open any file."""
    if not map_path:
        return None
    path = Path(map_path).resolve()
    root = Path(maps_dir).resolve()
    if root not in path.parents or path.suffix != ".npz" or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        amap = np.asarray(z["anomaly_map"], dtype=np.float32)
        points = np.asarray(z["points"], dtype=np.float32) if "points" in z.files else None
        threshold = float(z["threshold"])
    return amap, points, threshold


def _png(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def legend(threshold: float) -> dict[str, Any]:
    """The ramp from 0 to twice the threshold, as CSS colours, with the threshold at its middle."""
    values = np.linspace(0.0, 2.0 * threshold if threshold > 0 else 1.0, LEGEND_STEPS)
    return {"min": 0.0, "max": float(values[-1]), "threshold": threshold,
            "colors": [f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for c in colorize(values, threshold)]}


def organized_view(amap: np.ndarray, points: np.ndarray | None, threshold: float) -> dict[str, Any]:
    """Depth image and heat-map overlay PNGs (data URLs) of an H x W map."""
    h, w = amap.shape
    heat = colorize(amap, threshold).astype(np.float32)
    if points is not None and len(points) == h * w:
        z = points[:, 2].reshape(h, w)
        ok = np.isfinite(z) & np.any(points.reshape(h, w, 3) != 0, axis=2)
        lo, hi = (float(z[ok].min()), float(z[ok].max())) if ok.any() else (0.0, 1.0)
        grey = np.where(ok, 40 + 200 * (z - lo) / max(hi - lo, 1e-6), 0.0)
    else:
        ok = np.isfinite(amap)
        grey = np.full((h, w), 96.0)
    base = np.repeat(grey[..., None], 3, axis=2)
    scale = 2.0 * threshold if threshold > 0 else max(float(np.nanmax(amap, initial=0.0)), 1e-12)
    level = np.clip(np.nan_to_num(amap / scale, nan=0.0), 0.0, 1.0)
    alpha = np.where(ok & np.isfinite(amap), 0.35 + 0.5 * level, 0.0)[..., None]
    overlay = base * (1 - alpha) + heat * alpha
    return {"kind": "image", "width": int(w), "height": int(h),
            "base": _png(base.astype(np.uint8)), "overlay": _png(overlay.clip(0, 255).astype(np.uint8)),
            "above_threshold": int(np.sum(np.nan_to_num(amap) >= threshold)) if threshold > 0 else None}


def cloud_view(amap: np.ndarray, points: np.ndarray, threshold: float) -> dict[str, Any]:
    """Valid points (subsampled to ``MAX_POINTS``) with scores and colours, centred on the part."""
    ok = np.flatnonzero(np.isfinite(points).all(axis=1) & np.isfinite(amap))
    if len(ok) > MAX_POINTS:
        ok = ok[np.linspace(0, len(ok) - 1, MAX_POINTS).astype(np.int64)]
    p = points[ok].astype(np.float64)
    centre = (p.min(axis=0) + p.max(axis=0)) / 2 if len(p) else np.zeros(3)
    p -= centre
    s = amap[ok]
    return {"kind": "points", "n_total": int(len(points)), "index": ok.tolist(),
            "xyz": np.round(p, 3).reshape(-1).tolist(), "scores": np.round(s.astype(np.float64), 6).tolist(),
            "rgb": colorize(s, threshold).reshape(-1).tolist(),
            "radius": float(np.abs(p).max()) if len(p) else 1.0,
            "above_threshold": int(np.sum(s >= threshold)) if threshold > 0 else None}


def part_view(amap: np.ndarray, points: np.ndarray | None, threshold: float) -> dict[str, Any]:
    """The view for one verdict: an image for organized maps, points for clouds."""
    out = organized_view(amap, points, threshold) if amap.ndim == 2 else (
        cloud_view(amap.reshape(-1), points, threshold) if points is not None and len(points) == amap.size
        else {"kind": "none", "why": "the map file keeps no points (written before the review station)"})
    out["legend"] = legend(threshold)
    return out
