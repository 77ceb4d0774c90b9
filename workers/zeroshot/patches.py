"""Patches of a prepared cloud (3DzAL Sec. 3, "Notation" and "Implementation details") and the
way patch scores become per-point scores (Sec. 3.4, Eq. 7 and 10).

Organized input (a camera frame, ``cloud.frame.organized``), as in the paper: the ordered data is
resized to 224×224 and cut into 8×8 cells, 28×28 = 784 patches. Unorganized input (a stitched
scan, or a cloud without a frame): patch centres by farthest-point sampling of the voxel
centroids (at most 784, as many as an organized frame has), deterministic.

Choices (the paper leaves them open; stated here):

* **What the resize sees.** By default (``crop=True``) the square window around the part's
  foreground pixels, enlarged by 5 % of its side on each side (``grid_view``): MVTec 3D-AD's
  objects fill their frames, a part on our simulated camera's 120 mm field of view fills ~20 %
  of it, and without the crop only ~100 of the 784 cells would touch the part. ``crop=False``
  resizes the whole frame as the paper does. Only the part's foreground, i.e. the pixels
  ``prepare`` kept, belongs to patches (the supporting plane and unmeasured pixels do not);
  nearest-neighbour resize (MVTec 3D-AD practice: the xyz of a pixel is never interpolated). A
  cell is a patch when at least ``min_cell_pixels`` of its 64 resized pixels are foreground.
* **The points of a patch.** Every patch, organized or not, is the ``k`` (= 64 = 8×8) nearest
  voxel centroids of its centre (a KD-tree query); the centre of an organized cell is the voxel
  of its foreground pixel nearest the cell's middle. One construction for every patch is what
  lets the normal patches and the pseudo-abnormal patches (which the paper builds by a KD-tree
  search around an anchor, Sec. 3.2) differ only in their geometry, not in how they were cut.
  A cloud with fewer than ``k`` points repeats points to fill the patch.
* **Network input.** A patch is centred on its centroid and divided by one length
  (``normalize_patches``): the scorer's default is the median radius of the normal training
  patches (``patch_scale="fixed"``), which keeps a patch's physical extent (a hole or a cut
  *widens* a k-nearest-neighbour patch, which per-patch scaling would hide); ``"patch"``
  scales every patch into its own unit ball. The axes are the sensor's (no rotation
  normalization). The perturbation magnitude ε = 0.1 of Eq. 8 is in these normalized units.
* **FPFH of a patch** (``PatchSet.pooled``). Organized: the mean FPFH over the cell's 8×8
  resized part pixels (each pixel carries its voxel's FPFH): BTF's average pooling of the
  per-pixel FPFH, which the paper's FPFH branch is. Unorganized: the mean over the ``k // 8``
  nearest voxels of the centre (a cell-sized neighbourhood). ``pool="patch"`` averages over
  all ``k`` points of the patch instead (measured on synthetic parts: a coarser map, AUPRO
  0.445 vs 0.464 and I-AUROC 0.62 vs 0.81 for the FPFH map alone, leave-one-out over 4 classes).
* **Upsampling and blur (Eq. 7, 10).** Organized: the 28×28 patch map is upsampled to 224×224
  bilinearly and blurred with a Gaussian of σ = 4 pixels (BTF's values), both as *normalized*
  convolutions over the foreground (cells that are not patches and background pixels neither
  contribute nor dilute); the 224 map is then sampled bilinearly at every foreground pixel of
  the original frame and averaged per voxel (the inverse of ``workers.score_frame.map_back``).
  Unorganized: each voxel takes the inverse-distance-weighted mean of its 3 nearest patch
  centres (the "bilinear" of a cloud), then a kNN Gaussian blur over its ``blur_k`` nearest
  voxels with σ = ``blur_sigma_mm``.

One pipeline in torch on the device of the points (the CPU or a GPU): organized cells and
centre pixels by index arithmetic, FPS by ``workers.geometry.farthest_point_sample``, kNN by
``workers.components.knn``, pooling, maps. Everything vectorized: no Python loop over points or
patches. tests/test_zeroshot_device.py checks it against KD-tree / numpy oracles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from workers import geometry
from workers.components.knn import knn
from workers.preprocess import PreparedCloud

__all__ = [
    "IMAGE_SIZE",
    "CELL",
    "PatchSet",
    "is_organized",
    "resize_index",
    "GridView",
    "grid_view",
    "foreground_index_224",
    "extract_patches",
    "knn_indices",
    "normalize_patches",
    "patch_radius",
    "resample_to",
    "organized_point_scores",
    "cloud_point_scores",
]

IMAGE_SIZE = 224
CELL = 8
GRID = IMAGE_SIZE // CELL  # 28


def is_organized(cloud: PreparedCloud) -> bool:
    return cloud.frame is not None and cloud.frame.organized


def resize_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-neighbour source index of each of ``n_out`` output rows (pixel centres aligned)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _source_index(start: float, length: float, n_src: int, size: int, device: torch.device) -> torch.Tensor:
    """Nearest source index of each of ``size`` grid positions over ``start .. start + length``, −1 outside."""
    i = torch.floor(start + (torch.arange(size, dtype=torch.float64, device=device) + 0.5) * length / size).long()
    return torch.where((i >= 0) & (i < n_src), i, torch.full_like(i, -1))


@dataclass(frozen=True)
class GridView:
    """The window of an organized frame (source pixels; it may reach past the frame's edge) that
    is resized to the 224×224 grid: rows ``r0 .. r0 + h``, columns ``c0 .. c0 + w``."""

    r0: float
    c0: float
    h: float
    w: float

    def source_rows(self, n_rows: int, size: int = IMAGE_SIZE, device: torch.device | None = None) -> torch.Tensor:
        """Nearest source row of each grid row, −1 outside the frame (long, on ``device``)."""
        return _source_index(self.r0, self.h, n_rows, size, device or torch.device("cpu"))

    def source_cols(self, n_cols: int, size: int = IMAGE_SIZE, device: torch.device | None = None) -> torch.Tensor:
        return _source_index(self.c0, self.w, n_cols, size, device or torch.device("cpu"))


def patch_radius(xyz: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per patch: the largest distance of a point from the patch centroid."""
    x = torch.as_tensor(xyz, dtype=torch.float32)
    return (x - x.mean(dim=1, keepdim=True)).norm(dim=-1).amax(dim=1)


def normalize_patches(xyz: np.ndarray | torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """P×k×3 patches → centred on their centroid and divided by ``scale`` (a length in mm), or,
    when ``scale`` is None, each scaled into the unit ball (float32)."""
    x = torch.as_tensor(xyz, dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    if scale is not None:
        return x / max(float(scale), 1e-6)
    r = x.norm(dim=-1).amax(dim=1).clamp_min(1e-6)
    return x / r[:, None, None]


def resample_to(xyz: np.ndarray, valid: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """P×N×3 patches with a P×N validity mask → P×k×3, every row drawn from its valid points.

    The valid points are kept in order first (each at least once while k allows), the rest
    drawn uniformly with replacement, so no information is lost and the size is fixed.
    """
    p, n, _ = xyz.shape
    valid = np.asarray(valid, dtype=bool)
    cnt = valid.sum(axis=1)
    if (cnt == 0).any():
        raise ValueError("a patch has no valid point")
    order = np.argsort(~valid, axis=1, kind="stable")  # valid positions first
    slot = np.arange(k)[None, :].repeat(p, axis=0)
    extra = (rng.random((p, k)) * cnt[:, None]).astype(np.int64)
    pick = np.where(slot < cnt[:, None], np.minimum(slot, n - 1), extra)
    src = np.take_along_axis(order, pick, axis=1)
    return np.take_along_axis(xyz, src[..., None], axis=1)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 1×1×H×W tensor (on its device), zero padding."""
    if sigma <= 0:
        return img
    g = _gaussian_kernel(sigma).to(img.device)  # built on the CPU: the same taps on every device
    r = (len(g) - 1) // 2
    img = F.conv2d(img, g.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(img, g.view(1, 1, -1, 1), padding=(r, 0))


def organized_map(
    values: np.ndarray | torch.Tensor,
    cells: np.ndarray | torch.Tensor,
    fg224: np.ndarray | torch.Tensor,
    sigma: float,
) -> torch.Tensor:
    """Patch values on the 28×28 grid → the 224×224 map: normalized bilinear upsampling, then a
    normalized Gaussian blur over the foreground (Eq. 7 / 10). Undefined pixels are 0.

    Runs on the device of ``values`` when it is a tensor (the device path), else on the CPU.
    """
    dev = values.device if isinstance(values, torch.Tensor) else torch.device("cpu")
    zero = torch.zeros((), device=dev)
    cells_t = torch.as_tensor(cells, device=dev)
    s = torch.zeros(GRID * GRID, device=dev)
    w = torch.zeros(GRID * GRID, device=dev)
    s[cells_t] = torch.as_tensor(values, dtype=torch.float32)
    w[cells_t] = 1.0
    up = F.interpolate(torch.stack([s * w, w]).view(2, 1, GRID, GRID), size=(IMAGE_SIZE, IMAGE_SIZE),
                       mode="bilinear", align_corners=False)
    num, den = up[0, 0], up[1, 0]
    m = torch.as_tensor(fg224, device=dev) & (den > 1e-6)
    val = torch.where(m, num / den.clamp_min(1e-6), zero)
    mf = m.float()
    bn = _blur((val * mf)[None, None], sigma)[0, 0]
    bd = _blur(mf[None, None], sigma)[0, 0]
    return torch.where(bd > 1e-6, bn / bd.clamp_min(1e-6), zero)


@dataclass
class PatchSet:
    """The patches of one cloud, as tensors on the device of its points: ``neighbors[i]`` are the
    ``k`` voxel indices of patch ``i``."""

    centers: torch.Tensor
    """P (long) voxel indices of the patch centres."""
    neighbors: torch.Tensor
    """P×k (long) voxel indices."""
    cells: torch.Tensor | None
    """Organized: P flat indices into the 28×28 grid; None for an unorganized cloud."""
    fg224: torch.Tensor | None
    """Organized: the 224×224 (bool) foreground mask."""
    view: GridView | None = None
    cell_voxels: torch.Tensor | None = None
    """Organized: P×64 voxel of each resized pixel of the cell (−1: not the part)."""

    def pooled(self, per_point: torch.Tensor, pool: str = "cell") -> torch.Tensor:
        """A per-point feature (M×D) pooled per patch (P×D, the dtype of ``per_point``): ``"cell"`` =
        the mean over the cell's part pixels (organized; BTF's 8×8 average pooling) or over the
        ``k // 8`` nearest points of the centre (unorganized); ``"patch"`` = over the patch's ``k`` points."""
        if pool == "patch":
            return per_point[self.neighbors].mean(dim=1)
        if pool != "cell":
            raise ValueError(f"pool must be 'cell' or 'patch', got {pool!r}")
        if self.cell_voxels is None:
            return per_point[self.neighbors[:, : max(1, self.neighbors.shape[1] // 8)]].mean(dim=1)
        valid = self.cell_voxels >= 0
        vals = per_point[self.cell_voxels.clamp(min=0)] * valid.unsqueeze(-1).to(per_point.dtype)
        return vals.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1).to(per_point.dtype)

    @property
    def organized(self) -> bool:
        return self.cells is not None

    def __len__(self) -> int:
        return int(self.centers.shape[0])

def grid_view(cloud: PreparedCloud, source_flat: torch.Tensor | None = None, crop: bool = True,
              margin: float = 0.05) -> GridView:
    """The whole frame, or (``crop``) the square around the part's foreground pixels, enlarged by
    ``margin`` of its side on each side (see the module docstring). ``source_flat``: the cloud's
    source pixel indices already on a device (four reductions come back)."""
    assert cloud.frame is not None
    h, w = cloud.frame.points.shape[:2]
    if source_flat is None:
        source_flat = torch.from_numpy(np.asarray(cloud.source_flat, dtype=np.int64))
    if not crop or source_flat.numel() == 0:
        return GridView(0.0, 0.0, float(h), float(w))
    r, c = source_flat // w, source_flat % w
    rmin, rmax, cmin, cmax = (int(v) for v in torch.stack([r.min(), r.max(), c.min(), c.max()]).tolist())
    side = float(max(rmax - rmin + 1, cmax - cmin + 1)) * (1 + 2 * margin)
    rc, cc = (rmin + rmax + 1) / 2.0, (cmin + cmax + 1) / 2.0
    return GridView(rc - side / 2, cc - side / 2, side, side)


def foreground_index_224(
    cloud: PreparedCloud,
    view: GridView,
    source_flat: torch.Tensor | None = None,
    voxel_of_source: torch.Tensor | None = None,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """size×size long: the voxel of each resized foreground pixel, −1 elsewhere (organized only);
    on the device of ``source_flat`` / ``voxel_of_source`` (the cloud's arrays, CPU when not given)."""
    assert cloud.frame is not None
    h, w = cloud.frame.points.shape[:2]
    if source_flat is None or voxel_of_source is None:
        source_flat = torch.from_numpy(np.asarray(cloud.source_flat, dtype=np.int64))
        voxel_of_source = torch.from_numpy(np.asarray(cloud.voxel_of_source, dtype=np.int64))
    dev = source_flat.device
    vox = torch.full((h * w + 1,), -1, dtype=torch.long, device=dev)  # the extra last entry: "outside"
    vox[source_flat] = voxel_of_source
    rows, cols = view.source_rows(h, size, dev), view.source_cols(w, size, dev)
    flat = rows[:, None] * w + cols[None, :]
    flat = torch.where((rows[:, None] >= 0) & (cols[None, :] >= 0), flat, torch.full_like(flat, h * w))
    return vox[flat]


def knn_indices(points: np.ndarray | torch.Tensor | cKDTree, queries: np.ndarray | torch.Tensor, k: int
                ) -> np.ndarray | torch.Tensor:
    """Q×k indices of the ``k`` points nearest each query, nearest first, repeating points when
    there are fewer than ``k`` (``workers.components.knn``: a tensor on its device, an array or a
    KD-tree already built on the CPU)."""
    n = points.n if isinstance(points, cKDTree) else len(points)
    kk = min(k, n)
    _, idx = knn(points, queries, kk)
    if kk < k:
        idx = idx[:, (torch.arange(k, device=idx.device) if isinstance(idx, torch.Tensor) else np.arange(k)) % kk]
    return idx


def extract_patches(
    cloud: PreparedCloud,
    points: torch.Tensor | None = None,
    k: int = 64,
    mode: str = "auto",
    max_patches: int = GRID * GRID,
    min_cell_pixels: int = 8,
    crop: bool = True,
    source_flat: torch.Tensor | None = None,
    voxel_of_source: torch.Tensor | None = None,
) -> PatchSet:
    """The patches of ``cloud`` (see the module docstring; ``mode``: auto/organized/unorganized), on
    the device of ``points`` (``cloud.points`` as an M×3 tensor, default float64 on the CPU; its
    dtype is the kNN's: float64 gives the KD-tree's float64 distances).

    Organized: the same 28×28 cells and centre pixels (integer index arithmetic, exact);
    ``source_flat`` / ``voxel_of_source`` are ``cloud``'s arrays on the device (uploaded here
    when not given). Unorganized: ``workers.geometry.farthest_point_sample`` from the point
    farthest from the centroid (the start and float32 arithmetic of the CPU path's
    ``pointnet2.farthest_point_sample``, so the same picks). Patch points by
    ``workers.geometry.knn`` (exact; only exact distance ties may order differently from the KD-tree).
    """
    if mode not in ("auto", "organized", "unorganized"):
        raise ValueError(f"patch mode must be auto, organized or unorganized, got {mode!r}")
    if points is None:
        points = torch.from_numpy(np.asarray(cloud.points, dtype=np.float64))
    dev = points.device
    if mode != "unorganized" and is_organized(cloud):
        sf = source_flat if source_flat is not None else torch.from_numpy(np.asarray(cloud.source_flat)).to(dev)
        vs = voxel_of_source if voxel_of_source is not None else torch.from_numpy(
            np.asarray(cloud.voxel_of_source)).to(dev)
        view = grid_view(cloud, sf, crop)
        vox = foreground_index_224(cloud, view, sf.long(), vs.long())
        cells = vox.reshape(GRID, CELL, GRID, CELL).permute(0, 2, 1, 3).reshape(GRID * GRID, CELL * CELL)
        keep = torch.nonzero((cells >= 0).sum(dim=1) >= max(1, min_cell_pixels)).squeeze(1)
        if keep.numel():
            j = torch.arange(CELL * CELL, device=dev)
            d2 = ((j // CELL) - (CELL - 1) / 2) ** 2 + ((j % CELL) - (CELL - 1) / 2) ** 2
            kept = cells[keep]
            d = torch.where(kept >= 0, d2.to(torch.float64)[None, :], torch.full((), torch.inf, dtype=torch.float64,
                                                                                   device=dev))
            centre = kept.gather(1, d.argmin(dim=1, keepdim=True)).squeeze(1)  # first minimum, as numpy
            return PatchSet(centre, knn_indices(points, points[centre], k), keep, vox >= 0, view, kept)
    elif mode == "organized":
        raise ValueError("patch mode 'organized' needs a cloud with an organized frame")
    p32 = points.float()
    n = int(min(max_patches, p32.shape[0]))
    start = ((p32 - p32.mean(dim=0, keepdim=True)) ** 2).sum(-1).argmax()
    centre = geometry.farthest_point_sample(p32, n, start=start)
    return PatchSet(centre, knn_indices(points, points[centre], k), None, None)


def organized_point_scores(
    values: torch.Tensor,
    patches: PatchSet,
    cloud: PreparedCloud,
    sigma: float = 4.0,
    source_flat: torch.Tensor | None = None,
    voxel_of_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-voxel scores (M, float32) of an organized cloud from its patch values (P,), on the device of ``values``.

    The map (:func:`organized_map`: ``F.interpolate`` + separable Gaussian ``conv2d``) is sampled
    at every source pixel by ``F.grid_sample`` and averaged per voxel by a float64 ``index_add_``.
    """
    assert patches.cells is not None and patches.fg224 is not None and patches.view is not None
    assert cloud.frame is not None
    dev = values.device
    sf = source_flat if source_flat is not None else torch.from_numpy(np.asarray(cloud.source_flat)).to(dev)
    vs = voxel_of_source if voxel_of_source is not None else torch.from_numpy(np.asarray(cloud.voxel_of_source)).to(dev)
    amap = organized_map(values, patches.cells, patches.fg224, sigma)
    w = cloud.frame.points.shape[1]
    view = patches.view
    r, c = (sf // w).to(torch.float64), (sf % w).to(torch.float64)
    gx = (c + 0.5 - view.c0) / view.w * 2 - 1
    gy = (r + 0.5 - view.r0) / view.h * 2 - 1
    grid = torch.stack([gx.float(), gy.float()], dim=-1).view(1, 1, -1, 2)
    px = F.grid_sample(amap[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    px = px.view(-1).to(torch.float64)
    m = len(cloud.points)
    vs = vs.long()
    sums = torch.zeros(m, dtype=torch.float64, device=dev).index_add_(0, vs, px)
    cnt = torch.bincount(vs, minlength=m).to(torch.float64)
    return (sums / cnt.clamp(min=1)).float()


def cloud_point_scores(
    values: torch.Tensor,
    patches: PatchSet,
    points: torch.Tensor,
    blur_k: int = 16,
    blur_sigma_mm: float = 2.0,
) -> torch.Tensor:
    """Per-point scores (M float32) of a cloud from its patch values, on the device of ``points``
    (M×3; its dtype is the arithmetic's): IDW over the 3 nearest patch centres, then the kNN
    Gaussian blur (see the module docstring)."""
    vals = values.to(points.dtype)
    centres = points[patches.centers]
    k = min(3, centres.shape[0])
    d, i = knn(centres, points, k)
    w = 1.0 / (d + 1e-6)
    s = (vals[i] * w).sum(dim=1) / w.sum(dim=1)
    kb = min(blur_k, points.shape[0])
    if kb > 1 and blur_sigma_mm > 0:
        d, i = knn(points, points, kb)
        g = torch.exp(-0.5 * (d / blur_sigma_mm) ** 2)
        s = (s[i] * g).sum(dim=1) / g.sum(dim=1)
    return s.float()
