"""FPFH descriptors (Rusu et al. 2009, 33-D) with the BTF radii, normals oriented away from the centroid.

One function, :func:`fpfh_features`, with two engines for the same formulas: open3d on the CPU,
kept because it is measurably faster there (on a 28 386-point cloud 0.9–1.2 s against 3.0–4.9 s
for torch on 2 shared cores), and ``workers.geometry`` (grid neighbour search, batched PCA and
histograms) on the points' device, what a GPU uses. They agree to 4e-13 (float64) / 9e-5
(float32) with the same normals; caveats in docs/design/patchcore-fpfh.md.

open3d's engine takes the normals of its legacy ``PointCloud.estimate_normals`` and the
histograms of its tensor pipeline (``open3d.t.pipelines.registration.compute_fpfh_feature``):
with the same normals that one returns the legacy ``compute_fpfh_feature``'s histograms (same
formulas, same neighbours) in 0.55–0.65 of its time on one core; its own normal estimate differs
from the legacy one in the last bits, which moves near-tied pairs between bins, so the legacy
normals stay (measured in docs/design/patchcore-fpfh.md).
"""

from __future__ import annotations

import numpy as np
import torch

from workers import geometry

MIN_POINTS = 10
"""A cloud with fewer points has no meaningful FPFH (neighbourhoods are empty)."""
NORMAL_MAX_NN = 30
FEATURE_MAX_NN = 100
FPFH_IMPLS = ("auto", "open3d", "torch")


def check_points(points: np.ndarray) -> np.ndarray:
    """``points`` as float64 M×3, or a ``ValueError`` saying why it cannot be described."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"cloud points must be an M×3 array, got shape {pts.shape}")
    if len(pts) < MIN_POINTS:
        raise ValueError(f"cloud has {len(pts)} points, need at least {MIN_POINTS} for FPFH")
    if not np.isfinite(pts).all():
        raise ValueError("cloud points must all be finite")
    return pts.astype(np.float64)


def fpfh_features(
    points: np.ndarray | torch.Tensor,
    voxel_size: float,
    normal_radius_factor: float = 2.0,
    feature_radius_factor: float = 5.0,
    impl: str = "auto",
) -> np.ndarray | torch.Tensor:
    """FPFH (M×33) of every point, normals oriented away from the centroid (BTF radii).

    ``impl``: ``"open3d"`` (C++, on the CPU: 4–5× faster there), ``"torch"``
    (``workers.geometry`` on the points' device, in their dtype), ``"auto"``: torch for a tensor on
    a GPU, open3d otherwise. An array in gives a float32 array; a tensor in, a tensor on its device.
    """
    if impl not in FPFH_IMPLS:
        raise ValueError(f"impl must be one of {FPFH_IMPLS}, got {impl!r}")
    is_tensor = isinstance(points, torch.Tensor)
    if impl == "auto":
        impl = "torch" if is_tensor and points.device.type != "cpu" else "open3d"
    if impl == "torch":
        pts = points if is_tensor else torch.from_numpy(check_points(points))
        if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < MIN_POINTS or not bool(torch.isfinite(pts).all()):
            check_points(pts.cpu().numpy())  # raises with the reason
        normals = geometry.estimate_normals(pts, normal_radius_factor * voxel_size, NORMAL_MAX_NN, "centroid")
        feat = geometry.fpfh(pts, normals, feature_radius_factor * voxel_size, FEATURE_MAX_NN)
        return torch.nan_to_num(feat, nan=0.0, posinf=0.0, neginf=0.0)
    out = _open3d_fpfh(check_points(points.detach().cpu().numpy() if is_tensor else points), voxel_size,
                       normal_radius_factor, feature_radius_factor)
    return torch.from_numpy(out).to(points.device) if is_tensor else out


def _open3d_fpfh(pts: np.ndarray, voxel_size: float, normal_radius_factor: float,
                 feature_radius_factor: float) -> np.ndarray:
    """FPFH (M×33 float32) by open3d: legacy normals, oriented away from the centroid, then the
    tensor pipeline's histograms (see the module docstring for why each)."""
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pcd.estimate_normals(
        o3d.geometry.KDTreeSearchParamHybrid(radius=normal_radius_factor * voxel_size, max_nn=NORMAL_MAX_NN)
    )
    normals = np.asarray(pcd.normals)
    flip = np.einsum("ij,ij->i", normals, pts - pts.mean(axis=0)) < 0
    normals[flip] *= -1.0
    cloud = o3d.t.geometry.PointCloud(o3d.core.Tensor(pts))
    cloud.point.normals = o3d.core.Tensor(np.ascontiguousarray(normals))
    feat = o3d.t.pipelines.registration.compute_fpfh_feature(
        cloud, max_nn=FEATURE_MAX_NN, radius=feature_radius_factor * voxel_size)
    out = feat.numpy().astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
