"""Turn a raw frame into the cloud a scorer sees, remembering where each point came from.

Steps, all vectorized:

1. valid points only (NaN pixels of an organized frame, non-finite rows of a cloud);
2. optional background-plane removal for camera scenes: a RANSAC plane fit (open3d), then
   every point within ``plane_distance`` of the plane, or behind it as seen from the part,
   is background;
3. voxel downsampling to ``voxel_size`` (voxel centroids), keeping for every kept input
   point the index of its voxel, so scores computed on voxels map back to every input point.

Choice: the plane is removed only when it holds at least ``plane_min_fraction`` of the valid
points and at least ``min_points`` points stand off it, so a tight crop of a part (no table in
view, or only a flat face of the part) is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from sensors.frame import Frame, FrameError


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
    ``full[source_flat] = point_scores[voxel_of_source]`` maps scores back.
    """

    points: np.ndarray
    source_flat: np.ndarray
    voxel_of_source: np.ndarray
    frame: Frame | None = None


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


def voxel_downsample(points: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centroids (M×3 float32) and, for each input point, the index of its voxel."""
    if voxel <= 0:
        return points.astype(np.float32, copy=False), np.arange(len(points))
    cells = np.floor((points - points.min(axis=0)) / voxel).astype(np.int64)
    dims = cells.max(axis=0) + 1
    key = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    _, inverse = np.unique(key, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    centroids = np.stack([np.bincount(inverse, weights=points[:, k]) for k in range(3)], axis=1)
    return (centroids / counts[:, None]).astype(np.float32), inverse


def prepare(frame: Frame, params: PreprocessParams) -> PreparedCloud:
    """Valid points → foreground → voxels, with the index maps back to the frame."""
    flat = frame.flat_index()
    if len(flat) == 0:
        raise FrameError("no_finite_points", "the frame has no finite point")
    pts = frame.points.reshape(-1, 3)[flat]
    if params.remove_plane:
        fg = remove_background_plane(pts, params)
        flat, pts = flat[fg], pts[fg]
    if len(pts) < params.min_points:
        raise FrameError("too_few_points", f"{len(pts)} foreground points, need at least {params.min_points}")
    centroids, voxel_of = voxel_downsample(pts, params.voxel_size)
    return PreparedCloud(points=centroids, source_flat=flat, voxel_of_source=voxel_of, frame=frame)
