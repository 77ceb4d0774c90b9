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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d
import torch

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


def remove_background_plane(points: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Boolean mask over ``points``: True for foreground (not the supporting plane)."""
    keep = np.ones(len(points), dtype=bool)
    if len(points) < 3 * params.min_points:
        return keep
    o3d.utility.random.seed(0)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    plane, inliers = pcd.segment_plane(
        distance_threshold=params.plane_distance, ransac_n=3, num_iterations=params.ransac_iterations
    )
    if len(inliers) < params.plane_min_fraction * len(points):
        return keep
    normal = np.asarray(plane[:3], dtype=np.float64)
    d = points.astype(np.float64) @ normal + plane[3]
    far = d[np.abs(d) > params.plane_distance]
    if len(far) < params.min_points:
        return keep  # nothing stands off the plane: the plane is the part itself
    return d * np.sign(np.median(far)) > params.plane_distance


def remove_background_plane_torch(points: torch.Tensor, params: PreprocessParams) -> torch.Tensor:
    """:func:`remove_background_plane` in torch on ``points``' device (bool mask, same device)."""
    keep = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
    if points.shape[0] < 3 * params.min_points:
        return keep
    plane, inliers = geometry.ransac_plane(points, params.plane_distance, params.ransac_iterations, seed=0)
    if int(inliers.sum()) < params.plane_min_fraction * points.shape[0]:
        return keep
    d = points.double() @ plane[:3].double() + float(plane[3])
    far = d[d.abs() > params.plane_distance]
    if far.numel() < params.min_points:
        return keep
    return d * torch.sign(torch.quantile(far, 0.5)) > params.plane_distance


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
    flat = frame.flat_index()
    if len(flat) == 0:
        raise FrameError("no_finite_points", "the frame has no finite point")
    pts = frame.points.reshape(-1, 3)[flat]
    if device is not None:
        return _prepare_on(torch.device(device), frame, flat, pts, params)
    if params.remove_plane:
        fg = remove_background_plane(pts, params)
        flat, pts = flat[fg], pts[fg]
    if len(pts) < params.min_points:
        raise FrameError("too_few_points", f"{len(pts)} foreground points, need at least {params.min_points}")
    centroids, voxel_of = voxel_downsample(pts, params.voxel_size)
    return PreparedCloud(points=centroids, source_flat=flat, voxel_of_source=voxel_of, frame=frame)


def _prepare_on(
    device: torch.device, frame: Frame, flat: np.ndarray, pts: np.ndarray, params: PreprocessParams
) -> PreparedCloud:
    pts_t = torch.from_numpy(np.ascontiguousarray(pts)).to(device)
    if params.remove_plane:
        fg = remove_background_plane_torch(pts_t, params)
        pts_t = pts_t[fg]
        flat = flat[fg.cpu().numpy()]
    if pts_t.shape[0] < params.min_points:
        raise FrameError("too_few_points", f"{pts_t.shape[0]} foreground points, need at least {params.min_points}")
    centroids, voxel_of = geometry.voxel_downsample(pts_t, params.voxel_size)
    return PreparedCloud(points=centroids.cpu().numpy(), source_flat=flat, voxel_of_source=voxel_of.cpu().numpy(),
                         frame=frame, device_points=centroids)
