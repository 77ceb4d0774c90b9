"""Figures of ``inspectd eval``: per-class ROC curves and a gallery of anomaly maps, drawn with
matplotlib (the optional extra ``eval``: ``pip install inspectd[eval]``).

Why separate: the evaluation protocol (``tools.evaluation.protocol``) and its report text
(``tools.evaluation.report``) should not depend on how the figures are drawn, and the daemon
never needs matplotlib. The panels themselves (depth shading, the top-down z-buffered view of a
cloud) are numpy images shown with ``imshow``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensors.datasets import Sample

__all__ = ["GalleryItem", "colormap", "draw_gallery", "draw_roc_curves", "gallery_picks", "require_matplotlib",
           "thin_curve"]


def _fmt(x: float | None, nd: int = 3) -> str:
    import math

    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


@dataclass
class GalleryItem:
    """One gallery sample: its class, name, label, object score, per-point scores, gt and geometry."""

    cls: str
    name: str
    label: int
    object_score: float
    score: np.ndarray
    gt: np.ndarray
    points: np.ndarray  # organized: H×W depth (z); clouds: N×3


def gallery_picks(samples: Sequence[Sample], k: int) -> list[int]:
    """Indices of up to ``k`` test samples to show: defective ones of distinct kinds first, one good."""
    picks: list[int] = []
    seen: set[str] = set()
    for i, s in enumerate(samples):
        if s.label and s.defect not in seen and len(picks) < max(k - 1, 1):
            picks.append(i)
            seen.add(s.defect)
    good = [i for i, s in enumerate(samples) if not s.label]
    if good and len(picks) < k:
        picks.append(good[0])
    for i in range(len(samples)):
        if len(picks) >= k:
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks)[:k]


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; a clear error when the extra is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("inspectd eval draws its figures with matplotlib: pip install 'inspectd[eval]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail before a long evaluation rather than at its end when matplotlib is not installed."""
    _pyplot()


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values to RGB uint8 with matplotlib's ``inferno`` between ``lo`` and ``hi``; NaN → dark grey."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    rgb = (matplotlib.colormaps["inferno"](np.nan_to_num(t, nan=0.0))[..., :3] * 255).round().astype(np.uint8)
    rgb[~np.isfinite(v)] = (48, 48, 48)
    return rgb


def draw_roc_curves(data: dict[str, dict[str, np.ndarray]], per_class: dict[str, dict[str, Any]],
                    path: Path, title: str = "") -> None:
    """One PNG, two panels: per-class image-level ROC (I-AUROC in the legend) and pixel/point ROC."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2 + 0.22 * len(data)), squeeze=False)
    for ax, (key, metric, name) in zip(axes[0], (("image", "i_auroc", "image-level ROC"),
                                                 ("pixel", "p_auroc", "pixel / point-level ROC")), strict=True):
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=1)
        for c, (cls, curves) in enumerate(data.items()):
            fpr, tpr = curves[key]
            ok = np.isfinite(fpr) & np.isfinite(tpr)
            ax.plot(fpr[ok], tpr[ok], color=f"C{c % 10}", linewidth=1.6,
                    label=f"{cls}  AUROC {_fmt(per_class[cls][metric])}")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate", title=name)
        ax.set_aspect("equal")
        ax.grid(color="0.9")
        if data:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _organized_panels(item: GalleryItem, lo: float, hi: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Depth shading and anomaly map of an organized frame, the ground truth's contour in green."""
    from scipy import ndimage

    depth = item.points.astype(np.float64)
    finite = np.isfinite(depth)
    grey = np.zeros(depth.shape + (3,), np.uint8)
    if finite.any():
        d0, d1 = np.quantile(depth[finite], [0.01, 0.99])
        t = np.clip((depth - d0) / (d1 - d0 if d1 > d0 else 1.0), 0, 1)
        shade = (35 + 200 * np.nan_to_num(t)).astype(np.uint8)  # high z = bright
        grey[...] = shade[..., None]
    grey[~finite] = (0, 0, 60)
    amap = colormap(item.score, lo, hi)
    gt = item.gt != 0
    edge = gt & ~ndimage.binary_erosion(gt, structure=np.ones((3, 3)))
    edge = ndimage.binary_dilation(edge, iterations=max(1, round(item.gt.shape[0] / size) - 1))
    amap[edge] = (0, 255, 0)
    grey[edge] = (0, 255, 0)
    return grey, amap


def _topdown(points: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """Top-down orthographic view (x right, y up) with a z-buffer; 3×3 splats."""
    img = np.full((size, size, 3), 255, np.uint8)
    ok = np.isfinite(points).all(axis=1)
    p, c = points[ok].astype(np.float64), colours[ok]
    if len(p) == 0:
        return img
    lo, hi = p[:, :2].min(axis=0), p[:, :2].max(axis=0)
    scale = (size - 6) / max(float((hi - lo).max()), 1e-9)
    off = (size - (hi - lo) * scale) / 2
    ix = ((p[:, 0] - lo[0]) * scale + off[0]).astype(np.int64)
    iy = (size - 1 - ((p[:, 1] - lo[1]) * scale + off[1])).astype(np.int64)
    dx, dy = np.meshgrid([-1, 0, 1], [-1, 0, 1])
    ix = (ix[:, None] + dx.ravel()[None, :]).ravel()
    iy = (iy[:, None] + dy.ravel()[None, :]).ravel()
    z = np.repeat(p[:, 2], 9)
    col = np.repeat(c, 9, axis=0)
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    ix, iy, z, col = ix[inside], iy[inside], z[inside], col[inside]
    pix = iy * size + ix
    order = np.argsort(-z, kind="stable")  # highest first
    _, first = np.unique(pix[order], return_index=True)
    win = order[first]
    img.reshape(-1, 3)[pix[win]] = col[win]
    return img


def _cloud_panels(item: GalleryItem, lo: float, hi: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-down views of a cloud coloured by score and by ground truth (anomalous in red)."""
    score_rgb = colormap(item.score, lo, hi)
    gt_rgb = np.where((item.gt != 0)[:, None], np.array([[220, 30, 30]], np.uint8), np.array([[170, 170, 170]], np.uint8))
    return _topdown(item.points, score_rgb, size), _topdown(item.points, gt_rgb.astype(np.uint8), size)


def draw_gallery(items: Sequence[GalleryItem], ranges: dict[str, tuple[float, float]], organized: bool,
                 path: Path, size: int = 200) -> None:
    """A grid: one row per class, per sample two panels (organized: depth | anomaly map with the gt
    contour in green; clouds: top-down view coloured by score | by gt, anomalous in red)."""
    plt = _pyplot()
    by_cls: dict[str, list[GalleryItem]] = {}
    for it in items:
        by_cls.setdefault(it.cls, []).append(it)
    cols = max((len(v) for v in by_cls.values()), default=1)
    rows = max(1, len(by_cls))
    inch = size / 100
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * inch, rows * (inch + 0.45) + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    legend = ("z image (high = bright) | anomaly map (gt contour green)" if organized
              else "top-down view coloured by score | by ground truth (red = anomalous)")
    fig.suptitle(legend + "; colour scale per class: min .. 99.9th percentile of its test scores", fontsize=9)
    for r, (cls, its) in enumerate(by_cls.items()):
        lo, hi = ranges.get(cls, (0.0, 1.0))
        for c, it in enumerate(its):
            a, b = (_organized_panels(it, lo, hi, size) if organized else _cloud_panels(it, lo, hi, size))
            axes[r, 2 * c].imshow(a, interpolation="nearest")
            axes[r, 2 * c + 1].imshow(b, interpolation="nearest")
            axes[r, 2 * c].set_title(f"{cls}: {it.name}\nlabel {it.label}, object score {it.object_score:.3g}",
                                     fontsize=7, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, n: int = 2000) -> np.ndarray:
    """At most ~n points of a ROC curve for drawing (keeps the ends)."""
    if fpr.size <= n:
        return np.stack([fpr, tpr])
    idx = np.unique(np.r_[np.linspace(0, fpr.size - 1, n).astype(np.int64), fpr.size - 1])
    return np.stack([fpr[idx], tpr[idx]])

