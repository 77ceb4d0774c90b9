"""Rigid alignment of a part to its product's reference pose, for the pose-dependent IMRNet.

Not in the paper: IMRNet (Li et al., CVPR 2024) embeds the *absolute* positions of its patch
centres (Sec. 4.2), so its reconstructions and DFC features (Sec. 4.3) change when a part lies
rotated or shifted relative to the good parts it was fine-tuned on. Anomaly-ShapeNet's test
parts share their template's pose; a production line's (and our synthetic benchmark's: ±10°
about z, ±5 mm) do not. ``align="icp"`` (scorer parameter) therefore registers every cloud to the
first good training cloud before the network sees it: centroids first (the normalization does
that), then point-to-plane ICP (open3d) started from the identity and, because ICP only finds
the nearest local optimum, from ``n_starts`` rotations about z spread over ``±start_deg``; the
result with the highest inlier fraction (then lowest RMSE) wins. Points keep their order, so
per-point scores stay aligned to the input.

Choices: correspondence distance ``max_dist`` (normalized units, the part's largest radius is
~1: 0.05 ≈ 1.8 mm on a 36 mm radius part); 30 ICP iterations; normals of the reference from 16
nearest neighbours. Registration is on the reduced clouds (a few thousand points), ~10–30 ms.
"""

from __future__ import annotations

import math

import numpy as np


def _pcd(points: np.ndarray, normals: bool = False):
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    if normals:
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(16))
    return pcd


def rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    t = np.eye(4)
    t[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return t


def icp_align(
    source: np.ndarray,
    reference: np.ndarray,
    max_dist: float = 0.05,
    start_deg: float = 10.0,
    n_starts: int = 3,
    iterations: int = 30,
) -> tuple[np.ndarray, dict[str, float]]:
    """The 4×4 rigid transform taking ``source`` (N×3) onto ``reference`` (M×3), and fit stats."""
    import open3d as o3d

    src = _pcd(source)
    ref = _pcd(reference, normals=True)
    starts = [0.0] if n_starts <= 1 else list(np.linspace(-start_deg, start_deg, n_starts))
    if 0.0 not in starts:
        starts.insert(0, 0.0)
    best = None
    for deg in starts:
        res = o3d.pipelines.registration.registration_icp(
            src, ref, max_dist, rot_z(deg),
            o3d.pipelines.registration.TransformationEstimationPointToPlane(),
            o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=iterations),
        )
        key = (round(res.fitness, 3), -res.inlier_rmse)
        if best is None or key > best[0]:
            best = (key, res)
    assert best is not None
    res = best[1]
    return np.asarray(res.transformation, dtype=np.float64), {"fitness": float(res.fitness),
                                                             "rmse": float(res.inlier_rmse)}


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N×3) moved by the 4×4 rigid ``transform``, same dtype."""
    p = np.asarray(points, dtype=np.float64)
    return (p @ transform[:3, :3].T + transform[:3, 3]).astype(np.asarray(points).dtype)


def rotation_deg(transform: np.ndarray) -> float:
    """The rotation angle of a rigid transform, in degrees."""
    c = (np.trace(transform[:3, :3]) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))
