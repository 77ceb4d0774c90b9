"""Figures of ``inspectd eval``: per-class ROC curves and a gallery of anomaly maps (PIL only).

Why separate: the evaluation protocol (``tools.evaluation.protocol``) and its report text
(``tools.evaluation.report``) should not depend on how the figures are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensors.datasets import Sample

__all__ = ["GalleryItem", "colormap", "draw_gallery", "draw_roc_curves", "gallery_picks", "thin_curve"]


def _fmt(x: float | None, nd: int = 3) -> str:
    import math

    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


@dataclass
class GalleryItem:
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



_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
_CMAP = np.array(  # an inferno-like ramp: black → purple → red → yellow → white
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
     (250, 193, 39), (252, 255, 164)], dtype=np.float64
)


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values to RGB uint8 with an inferno-like ramp; NaN → dark grey."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    t = np.nan_to_num(t, nan=0.0)
    x = t * (len(_CMAP) - 1)
    rgb = np.stack([np.interp(x, np.arange(len(_CMAP)), _CMAP[:, k]) for k in range(3)], axis=-1)
    rgb[~np.isfinite(v)] = (48, 48, 48)
    return rgb.astype(np.uint8)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_roc_curves(data: dict[str, dict[str, np.ndarray]], per_class: dict[str, dict[str, Any]],
                    path: Path, title: str = "") -> None:
    """One PNG, two panels: per-class image-level ROC (I-AUROC in the legend) and pixel/point ROC."""
    from PIL import Image, ImageDraw

    size, margin, top = 420, 50, 40
    img = Image.new("RGB", (2 * (size + 2 * margin), size + 2 * margin + top + 18 * len(data)), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((margin, 8), title, fill="black", font=font)
    for p, (key, metric, name) in enumerate((("image", "i_auroc", "image-level ROC"),
                                             ("pixel", "p_auroc", "pixel / point-level ROC"))):
        x0, y0 = p * (size + 2 * margin) + margin, top + margin // 2
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        for k in range(1, 10):
            g = k * size / 10
            draw.line([x0 + g, y0, x0 + g, y0 + size], fill=(230, 230, 230))
            draw.line([x0, y0 + g, x0 + size, y0 + g], fill=(230, 230, 230))
        draw.line([x0, y0 + size, x0 + size, y0], fill=(180, 180, 180))
        for k in range(0, 11, 2):
            draw.text((x0 + k * size / 10 - 8, y0 + size + 4), f"{k / 10:.1f}", fill="black", font=font)
            draw.text((x0 - 30, y0 + size - k * size / 10 - 7), f"{k / 10:.1f}", fill="black", font=font)
        draw.text((x0 + size // 2 - 40, y0 + size + 20), "false positive rate", fill="black", font=font)
        draw.text((x0 + 4, y0 - 18), f"{name} (y: true positive rate)", fill="black", font=font)
        for c, (cls, curves) in enumerate(data.items()):
            fpr, tpr = curves[key]
            ok = np.isfinite(fpr) & np.isfinite(tpr)
            xy = np.stack([x0 + fpr[ok] * size, y0 + size - tpr[ok] * size], axis=1)
            colour = _PALETTE[c % len(_PALETTE)]
            if len(xy) >= 2:
                draw.line([tuple(q) for q in xy.tolist()], fill=colour, width=2)
            ly = y0 + size + 40 + 18 * c
            draw.line([x0, ly + 7, x0 + 24, ly + 7], fill=colour, width=3)
            draw.text((x0 + 30, ly), f"{cls}  AUROC {_fmt(per_class[cls][metric])}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _fit_panel(rgb: np.ndarray, size: int):
    from PIL import Image

    im = Image.fromarray(rgb)
    scale = size / max(im.width, im.height)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
    panel = Image.new("RGB", (size, size), (255, 255, 255))
    panel.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return panel


def _organized_panels(item: GalleryItem, lo: float, hi: float, size: int):
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
    return _fit_panel(grey, size), _fit_panel(amap, size)


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


def _cloud_panels(item: GalleryItem, lo: float, hi: float, size: int):
    from PIL import Image

    score_rgb = colormap(item.score, lo, hi)
    gt_rgb = np.where((item.gt != 0)[:, None], np.array([[220, 30, 30]], np.uint8), np.array([[170, 170, 170]], np.uint8))
    return (Image.fromarray(_topdown(item.points, score_rgb, size)),
            Image.fromarray(_topdown(item.points, gt_rgb.astype(np.uint8), size)))


def draw_gallery(items: Sequence[GalleryItem], ranges: dict[str, tuple[float, float]], organized: bool,
                 path: Path, size: int = 200) -> None:
    """A grid: one row per class, per sample two panels (organized: depth | anomaly map with the gt
    contour in green; clouds: top-down view coloured by score | by gt, anomalous in red)."""
    from PIL import Image, ImageDraw

    by_cls: dict[str, list[GalleryItem]] = {}
    for it in items:
        by_cls.setdefault(it.cls, []).append(it)
    cols = max((len(v) for v in by_cls.values()), default=1)
    head, label_h, gap = 24, 34, 12
    cell_w = 2 * size + gap
    img = Image.new("RGB", (max(1, cols * cell_w), head + max(1, len(by_cls)) * (size + label_h)), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    legend = ("z image (high = bright) | anomaly map (gt contour green)" if organized
              else "top-down view coloured by score | by ground truth (red = anomalous)")
    draw.text((6, 5), legend + "; colour scale per class: min .. 99.9th percentile of its test scores",
              fill="black", font=font)
    for r, (cls, its) in enumerate(by_cls.items()):
        lo, hi = ranges.get(cls, (0.0, 1.0))
        for c, it in enumerate(its):
            x, y = c * cell_w, head + r * (size + label_h)
            a, b = (_organized_panels(it, lo, hi, size) if organized else _cloud_panels(it, lo, hi, size))
            img.paste(a, (x, y + label_h))
            img.paste(b, (x + size, y + label_h))
            draw.text((x + 4, y + 2), f"{cls}: {it.name}", fill="black", font=font)
            draw.text((x + 4, y + 17), f"label {it.label}, object score {it.object_score:.3g}", fill=(80, 80, 80),
                      font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, n: int = 2000) -> np.ndarray:
    """At most ~n points of a ROC curve for drawing (keeps the ends)."""
    if fpr.size <= n:
        return np.stack([fpr, tpr])
    idx = np.unique(np.r_[np.linspace(0, fpr.size - 1, n).astype(np.int64), fpr.size - 1])
    return np.stack([fpr[idx], tpr[idx]])

