"""Turn a raw frame into the cloud a scorer sees, remembering where each point came from.

Steps, all vectorized, in millimetres (a frame in other units is scaled to mm first, see
``sensors.frame.UNITS_MM``; the point order is kept, so maps line up with the input frame):

1. valid points only (NaN pixels of an organized frame, non-finite rows of a cloud);
2. optional background-plane removal for camera scenes: a RANSAC plane fit (open3d), then
   every point within ``plane_distance`` of the plane, or behind it as seen from the part,
   is background;
3. voxel downsampling to ``voxel_size`` (voxel centroids), keeping for every kept input
   point the index of its voxel, so scores computed on voxels map back to every input point.

Device path (``prepare(..., device=...)``): the same three steps in torch on that device
(``workers.geometry``: a batched-hypothesis RANSAC with a least-squares refit, and the same voxel
grid), so a frame uploaded once stays on the GPU; the voxel centroids are kept there as
``PreparedCloud.device_points`` for the scorer, and copies of the (small) arrays come back to
the host for mapping scores back. ``device=None`` (the default, and what a CPU scorer gets)
keeps open3d's RANSAC: on a CPU it is faster, and its plane is the one every CPU model was
calibrated with. The two RANSACs draw different hypotheses, so they can disagree on points
within a hair of ``plane_distance``; voxels are identical (one implementation,
``workers.geometry.voxel_downsample``).

Choice: the plane is removed only when it holds at least ``plane_min_fraction`` of the valid
points and at least ``min_points`` points stand off it, so a tight crop of a part (no table in
view, or only a flat face of the part) is left alone.

Camera frames stay on their grid (``organized="grid"``, the default): the plane is fitted on
at most ``plane_samples`` pixels taken on a regular pixel stride, then tested against every
pixel (one dot product), and the foreground is downsampled by pixel blocks (as wide as a voxel
at the frame's measured pixel pitch) split by depth layers, so a 2.3M-pixel frame never becomes
a 2.3M-point RANSAC or voxel problem. docs/design/preprocessing.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d
import torch
from scipy.spatial import cKDTree

from sensors.frame import Frame, FrameError
from workers import geometry


@dataclass(frozen=True)
class PreprocessParams:
    remove_plane: bool = True
    plane_distance: float = 0.8
    plane_min_fraction: float = 0.2
    ransac_iterations: int = 200
    voxel_size: float = 1.0
    min_points: int = 50
    plane_samples: int = 40_000
    """At most this many points fit the plane (a pixel-stride grid for camera frames, an index
    stride for clouds); the fitted plane is then tested against every point."""
    organized: str = "grid"
    """How camera frames are downsampled: ``grid`` (pixel blocks split by depth layer) or ``voxel``."""


@dataclass
class PreparedCloud:
    """A frame reduced to the cloud a scorer sees.

    ``points`` (M×3 float32) are voxel centroids. ``source_flat`` (K,) are the flat indices, in
    the frame's pixel / point order, of the input points that were kept (foreground), and
    ``voxel_of_source`` (K,) the voxel each of them fell into, so
    ``full[source_flat] = point_scores[voxel_of_source]`` maps scores back. ``device_points``,
    when set (device preprocessing), is ``points`` already on the scorer's device.
    """

    points: np.ndarray
    source_flat: np.ndarray
    voxel_of_source: np.ndarray
    frame: Frame | None = None
    device_points: torch.Tensor | None = None
    _search: tuple[np.ndarray, cKDTree, dict[int, np.ndarray]] | None = field(
        default=None, init=False, repr=False, compare=False)
    """(points it was built for, KD-tree of ``points``, neighbour indices per k), built on first use."""

    def _searched(self) -> tuple[cKDTree, dict[int, np.ndarray]]:
        if self._search is None or self._search[0] is not self.points:
            # sliding-midpoint splits: built and searched (k = 8) ~15 % faster here than median splits
            self._search = (self.points, cKDTree(np.asarray(self.points, dtype=np.float64), balanced_tree=False), {})
        return self._search[1], self._search[2]

    @property
    def tree(self) -> cKDTree:
        """KD-tree of ``points`` (float64), built once per cloud: every scorer component that
        searches the part's own points (smoothing, missing material) shares it."""
        return self._searched()[0]

    def neighbours(self, k: int) -> np.ndarray:
        """Indices (M×k, ascending distance, the point itself included) of every point's
        ``k`` nearest points of the cloud (``k`` capped at M), found once per cloud and ``k``:
        ``fused``'s two components smooth over the same neighbours, so one search serves both."""
        tree, cache = self._searched()
        k = int(min(max(k, 1), tree.n))
        if k not in cache:
            wider = [kk for kk in cache if kk > k]
            if wider:  # a wider search holds the answer: its first k columns
                return cache[min(wider)][:, :k]
            _, idx = tree.query(tree.data, k=k, workers=1)
            cache[k] = np.asarray(idx).reshape(-1, k)
        return cache[k]


def plane_fit_points(frame: Frame, limit: int) -> np.ndarray:
    """At most about ``limit`` valid points of ``frame``, spread evenly, for the plane fit.

    Camera frames: the valid pixels of a square pixel-stride sub-grid (a strided view, so the
    full frame is never gathered for it); clouds: an index stride.
    """
    pts, valid = frame.points, frame.valid_mask()
    n = int(valid.sum())
    if n > limit:
        stride = int(np.ceil(np.sqrt(n / limit))) if frame.organized else int(np.ceil(n / limit))
        if frame.organized:
            pts, valid = pts[::stride, ::stride], valid[::stride, ::stride]
        else:
            pts, valid = pts[::stride], valid[::stride]
    return pts[valid]


def remove_background_plane(
    points: np.ndarray, params: PreprocessParams, fit: np.ndarray | None = None, valid: np.ndarray | None = None
) -> np.ndarray:
    """Boolean mask over ``points``: True for foreground (not the supporting plane).

    ``fit``: the points the RANSAC sees (``points`` when None); the fitted plane is then tested
    against every point (float32). ``valid``: which of ``points`` are measured (all when None);
    an unmeasured (NaN) point is never foreground."""
    fit = points if fit is None else fit
    keep = np.ones(len(points), dtype=bool) if valid is None else valid
    if len(fit) < 3 * params.min_points:
        return keep
    o3d.utility.random.seed(0)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(fit.astype(np.float64)))
    plane, inliers = pcd.segment_plane(
        distance_threshold=params.plane_distance, ransac_n=3, num_iterations=params.ransac_iterations
    )
    if len(inliers) < params.plane_min_fraction * len(fit):
        return keep
    normal = np.asarray(plane[:3], dtype=np.float32)
    d = points @ normal  # one frame-sized temporary, then in place
    d += np.float32(plane[3])
    off = np.abs(d) > params.plane_distance
    if np.count_nonzero(off) < params.min_points:
        return keep  # nothing stands off the plane: the plane is the part itself
    d_fit = fit @ normal + np.float32(plane[3])
    far = d_fit[np.abs(d_fit) > params.plane_distance]
    d *= np.float32(np.sign(np.median(far if len(far) else d[off])))
    return d > params.plane_distance


def remove_background_plane_torch(
    points: torch.Tensor, params: PreprocessParams, fit: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`remove_background_plane` in torch on ``points``' device (bool mask, same device;
    ``points`` are all valid here)."""
    fit = points if fit is None else fit
    keep = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
    if fit.shape[0] < 3 * params.min_points:
        return keep
    plane, inliers = geometry.ransac_plane(fit, params.plane_distance, params.ransac_iterations, seed=0)
    if int(inliers.sum()) < params.plane_min_fraction * fit.shape[0]:
        return keep
    normal, offset = plane[:3].to(points.dtype), float(plane[3])
    d = points @ normal + offset
    off = d.abs() > params.plane_distance
    if int(off.sum()) < params.min_points:
        return keep
    d_fit = fit @ normal + offset
    far = d_fit[d_fit.abs() > params.plane_distance]
    side = torch.sign(torch.quantile(far if far.numel() else d[off], 0.5))
    return d * side > params.plane_distance


def voxel_downsample(points: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centroids (M×3 float32) and, for each input point, the index of its voxel.

    numpy in, numpy out, through :func:`workers.geometry.voxel_downsample` on the CPU.
    """
    cent, inverse = geometry.voxel_downsample(torch.from_numpy(np.asarray(points)), voxel)
    return cent.numpy(), inverse.numpy()


def prepare(frame: Frame, params: PreprocessParams, device: str | torch.device | None = None) -> PreparedCloud:
    """Valid points → foreground → voxels, with the index maps back to the frame.

    ``device``: run plane removal and voxels in torch there (see the module doc); ``None``: the
    CPU path (open3d RANSAC). A frame in other units than millimetres is converted first
    (:meth:`Frame.in_mm`): every length here, and every model, is in mm; the returned
    ``frame`` is the converted one, with the same pixel / point order as the input.
    """
    frame = frame.in_mm()
    valid = frame.valid_mask().reshape(-1)
    if not valid.any():
        raise FrameError("no_finite_points", "the frame has no finite point")
    grid_shape = frame.points.shape[:-1]
    fit = plane_fit_points(frame, params.plane_samples) if params.remove_plane else None
    if device is not None:
        flat = np.flatnonzero(valid)
        return _prepare_on(torch.device(device), frame, flat, frame.points.reshape(-1, 3)[flat], fit, params)
    keep = valid
    if params.remove_plane:
        keep = remove_background_plane(frame.points.reshape(-1, 3), params, fit, valid)
    flat = np.flatnonzero(keep)
    pts = frame.points.reshape(-1, 3)[flat]
    if len(pts) < params.min_points:
        raise FrameError("too_few_points", f"{len(pts)} foreground points, need at least {params.min_points}")
    centroids_t, voxel_of_t = _downsample(torch.from_numpy(np.ascontiguousarray(pts)), flat, grid_shape, params)
    return PreparedCloud(points=centroids_t.numpy(), source_flat=flat, voxel_of_source=voxel_of_t.numpy(), frame=frame)


def _downsample(
    pts: torch.Tensor, flat: np.ndarray, grid_shape: tuple[int, ...], params: PreprocessParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid blocks for camera frames (``params.organized == "grid"``), voxels otherwise."""
    if len(grid_shape) == 2 and params.organized == "grid" and params.voxel_size > 0:
        block = grid_block(pts, flat, grid_shape[1], params.voxel_size)
        if block > 1:
            return geometry.grid_downsample(pts, torch.from_numpy(flat).to(pts.device), grid_shape[1], block,
                                            params.voxel_size)
    return geometry.voxel_downsample(pts, params.voxel_size)


def grid_block(pts: torch.Tensor, flat: np.ndarray, width: int, voxel: float, max_pairs: int = 50_000) -> int:
    """Pixel block width whose footprint is closest to one voxel, from the frame's pixel pitch.

    The pitch is the median distance between horizontally adjacent foreground pixels (at most
    ``max_pairs`` of them, evenly spaced). 1 means the frame is too coarse for pixel blocks.
    """
    right = np.flatnonzero((np.diff(flat) == 1) & (flat[1:] % width != 0))
    if len(right) == 0:
        return 1
    right = right[:: max(1, len(right) // max_pairs)]
    idx = torch.from_numpy(right).to(pts.device)
    pitch = float((pts[idx + 1] - pts[idx]).norm(dim=1).median())
    return max(1, round(voxel / pitch)) if pitch > 0 else 1


def _prepare_on(
    device: torch.device, frame: Frame, flat: np.ndarray, pts: np.ndarray, fit: np.ndarray | None,
    params: PreprocessParams,
) -> PreparedCloud:
    pts_t = torch.from_numpy(np.ascontiguousarray(pts)).to(device)
    if params.remove_plane and fit is not None:
        fg = remove_background_plane_torch(pts_t, params, torch.from_numpy(np.ascontiguousarray(fit)).to(device))
        pts_t = pts_t[fg]
        flat = flat[fg.cpu().numpy()]
    if pts_t.shape[0] < params.min_points:
        raise FrameError("too_few_points", f"{pts_t.shape[0]} foreground points, need at least {params.min_points}")
    centroids, voxel_of = _downsample(pts_t, flat, frame.points.shape[:-1], params)
    return PreparedCloud(points=centroids.cpu().numpy(), source_flat=flat, voxel_of_source=voxel_of.cpu().numpy(),
                         frame=frame, device_points=centroids)
