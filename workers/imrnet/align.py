"""Rigid alignment of a part to its product's reference pose, for the pose-dependent IMRNet.

Not in the paper: IMRNet (Li et al., CVPR 2024) embeds the *absolute* positions of its patch
centres (Sec. 4.2), so its reconstructions and DFC features (Sec. 4.3) change when a part lies
rotated or shifted relative to the good parts it was fine-tuned on. Anomaly-ShapeNet's test
parts share their template's pose; a production line's (and our synthetic benchmark's: ±10°
about z, ±5 mm) do not. ``align="icp"`` (scorer parameter) therefore registers every cloud to the
first good training cloud before the network sees it: centroids first (the normalization does
that), then point-to-plane ICP started from the identity and, because ICP only finds the
nearest local optimum, from ``n_starts`` rotations about z spread over ``±start_deg``; the
result with the highest inlier fraction (then lowest RMSE) wins. Points keep their order, so
per-point scores stay aligned to the input.

:func:`icp_align` runs in torch on the points' device (neighbours by ``workers.components.knn``:
scipy's KD-tree on a CPU, ``workers.geometry.knn`` on a GPU), all starts at once as one batch:
correspondences are the nearest reference point at distance ``< max_dist``, a linearized
(Gauss-Newton) point-to-plane step per iteration solved as ``numpy.linalg.lstsq`` would, stopping
on fewer than 6 correspondences or a step of norm ``< 1e-7`` (at most ``iterations``).
``method="point"`` swaps the point-to-plane step for point-to-point ICP with the closed-form
Kabsch / Umeyama (SVD) step. tests/test_imrnet_device.py checks it against a numpy + KD-tree
oracle, one start after the other.

``align="global"`` (the default) registers with the shared registration instead
(``workers.components.registration``: PCA-frame hypotheses, then ICP, numpy on the CPU), so a
part in any orientation is found; :func:`align_registrar` and :func:`register_global` adapt it to
the normalized units and to tensors. ``icp_align`` stays for models fitted with ``align="icp"``.

Choices: correspondence distance ``max_dist`` (normalized units, the part's largest radius is
~1: 0.05 ≈ 1.8 mm on a 36 mm radius part); at most 30 ICP iterations; PCA normals of the
reference from 16 nearest neighbours. Registration runs on the reduced clouds (2048 points).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from workers.components.knn import knn
from workers.components.registration import Registrar
from workers.imrnet.sampling import local_geometry

ICP_METHODS = ("plane", "point")
GLOBAL_COARSE_DIST = 0.15
GLOBAL_FINE_DIST = 0.05
"""Correspondence distances of ``align="global"`` in normalized units (the part's largest radius
~1): coarse ICP within 0.15, fine ICP within 0.05, the ``max_dist`` of ``icp_align``."""


def align_registrar(reference: torch.Tensor, seed: int) -> Registrar:
    """The shared registration onto ``reference`` (the reduced first good cloud, normalized)."""
    ref = reference.detach().double().cpu().numpy()
    return Registrar(ref, coarse_dist=GLOBAL_COARSE_DIST, fine_dist=GLOBAL_FINE_DIST, seed=seed)


def register_global(registrar: Registrar, source: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The 4×4 transform (float64, on the device of ``source``) registering ``source`` (N×3), and
    its fitness and RMSE, as :func:`icp_align` returns them."""
    reg = registrar.register(source.detach().double().cpu().numpy())
    return torch.from_numpy(reg.transform).to(source.device), {"fitness": reg.fitness, "rmse": reg.rmse}


def rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    t = np.eye(4)
    t[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return t


def apply(transform: np.ndarray | torch.Tensor, points: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``points`` (N×3) moved by the 4×4 rigid ``transform``, same dtype (and device, for tensors).

    numpy in, numpy out; a tensor transform with tensor points: computed in float64 on their device.
    """
    if isinstance(points, torch.Tensor):
        t = torch.as_tensor(transform, dtype=torch.float64).to(points.device)
        p = points.double()
        return (p @ t[:3, :3].T + t[:3, 3]).to(points.dtype)
    p = np.asarray(points, dtype=np.float64)
    return (p @ transform[:3, :3].T + transform[:3, 3]).astype(np.asarray(points).dtype)


def rotation_deg(transform: np.ndarray | torch.Tensor) -> float:
    """The rotation angle of a rigid transform, in degrees."""
    if isinstance(transform, torch.Tensor):
        transform = transform.detach().double().cpu().numpy()
    c = (np.trace(transform[:3, :3]) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def start_angles(start_deg: float, n_starts: int) -> list[float]:
    """The z rotations (degrees) ICP starts from: ``n_starts`` over ``±start_deg``, 0 always among them."""
    starts = [0.0] if n_starts <= 1 else [float(x) for x in np.linspace(-start_deg, start_deg, n_starts)]
    if 0.0 not in starts:
        starts.insert(0, 0.0)
    return starts


def _skew(k: torch.Tensor) -> torch.Tensor:
    """B×3 vectors → B×3×3 cross-product matrices."""
    z = torch.zeros_like(k[:, 0])
    return torch.stack([z, -k[:, 2], k[:, 1], k[:, 2], z, -k[:, 0], -k[:, 1], k[:, 0], z], dim=1).view(-1, 3, 3)


def _rodrigues_t(w: torch.Tensor) -> torch.Tensor:
    """Batched :func:`_rodrigues`: rotation vectors (B×3) → rotation matrices (B×3×3)."""
    theta = w.norm(dim=1)
    small = theta < 1e-12
    kx = _skew(w / torch.where(small, torch.ones_like(theta), theta).unsqueeze(1))
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(kx)
    s, c = torch.sin(theta).view(-1, 1, 1), torch.cos(theta).view(-1, 1, 1)
    r = eye + s * kx + (1.0 - c) * (kx @ kx)
    return torch.where(small.view(-1, 1, 1), eye, r)


def _lstsq_min_norm(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least-squares solutions of B systems ``a`` (B×N×6) x = ``b`` (B×N), batched.

    What ``numpy.linalg.lstsq(a, b, rcond=None)`` returns (SVD, singular values at or below
    ``eps · max(rows, 6) · s_max`` dropped), computed as a thin QR of ``a`` then the SVD of its
    6×6 R factor (same singular values, no squaring of the condition number as in the normal
    equations). Zero rows of ``a`` (padding for non-correspondences) change nothing; ``rows`` (B,)
    is each system's count of real rows, for the cut-off.
    """
    q, r = torch.linalg.qr(a)
    u, s, vh = torch.linalg.svd(r)
    cut = torch.finfo(a.dtype).eps * rows.clamp(min=a.shape[2]).to(a.dtype).unsqueeze(1) * s[:, :1]
    inv = torch.where(s > cut, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    qtb = (q.transpose(1, 2) @ b.unsqueeze(2)).squeeze(2)
    return (vh.transpose(1, 2) @ (inv * (u.transpose(1, 2) @ qtb.unsqueeze(2)).squeeze(2)).unsqueeze(2)).squeeze(2)


def _kabsch_step(p: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Kabsch / Umeyama (no scale): the rigid step (R B×3×3, t B×3) minimizing Σ w‖R p + t − q‖²."""
    cnt = w.sum(dim=1, keepdim=True).clamp(min=1.0)
    pc = (p * w.unsqueeze(2)).sum(dim=1) / cnt
    qc = (q * w.unsqueeze(2)).sum(dim=1) / cnt
    h = torch.einsum("bn,bni,bnj->bij", w, p - pc.unsqueeze(1), q - qc.unsqueeze(1))
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(1, 2)
    d = torch.linalg.det(v @ u.transpose(1, 2))
    fix = torch.ones_like(pc)
    fix[:, 2] = torch.where(d < 0, -1.0, 1.0)
    rot = v @ (fix.unsqueeze(2) * u.transpose(1, 2))
    return rot, qc - (rot @ pc.unsqueeze(2)).squeeze(2)


def _correspond(
    src: torch.Tensor, ref: torch.Tensor, t: torch.Tensor, max_dist: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moved source (B×N×3), distance to and index of its nearest reference point (B×N), and
    whether that is a correspondence (``distance < max_dist``, scipy's ``distance_upper_bound``)."""
    b, n, _ = src.shape
    p = src @ t[:, :3, :3].transpose(1, 2) + t[:, None, :3, 3]
    d, j = knn(ref, p.reshape(-1, 3), 1)
    d, j = d.view(b, n), j.view(b, n)
    return p, d, j, d < max_dist


def icp_align(
    source: torch.Tensor,
    reference: torch.Tensor,
    max_dist: float = 0.05,
    start_deg: float = 10.0,
    n_starts: int = 3,
    iterations: int = 30,
    reference_normals: torch.Tensor | None = None,
    method: str = "plane",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The 4×4 rigid transform (float64, on the points' device) taking ``source`` (N×3) onto
    ``reference`` (M×3), and fit stats (fitness, rmse).

    Every start is one element of a batch: each iteration moves all of them, finds their
    correspondences in one kNN call (exact, float64), and takes one step per start; a start that
    stops (fewer than 6 correspondences, or a step of norm ``< 1e-7``) is frozen while the others
    go on, so each start ends where it would alone. The winner: highest fitness rounded to 3
    decimals, then lowest inlier RMSE, the first start on ties. Python loops run over iterations
    only; the host reads one flag per iteration and the final stats.

    ``method``: ``"plane"`` (default, what the scorer uses): the linearized
    point-to-plane step against the reference's PCA normals (``reference_normals``, else computed:
    16 nearest neighbours), solved by the same minimum-norm least squares as ``numpy.linalg.lstsq``;
    ``"point"``: point-to-point ICP, the closed-form Kabsch step (SVD of the 3×3 cross-covariance,
    reflection-corrected); its step norm is ``‖(rotation angle, translation)‖``.

    Versus open3d's ``registration_icp`` (``TransformationEstimationPointToPoint`` /
    ``PointToPlane``, ``ICPConvergenceCriteria(max_iteration=iterations)``): the same
    correspondences (the nearest point within ``max_correspondence_distance``), but open3d
    stops when fitness and inlier RMSE change by less than 1e-6 relative between iterations,
    not on the step size; its point-to-plane step solves the 6×6 normal equations (Cholesky /
    LDLT) rather than the least-squares system, and it has no multi-start.
    """
    if method not in ICP_METHODS:
        raise ValueError(f"method must be one of {ICP_METHODS}, got {method!r}")
    dev = reference.device
    src = source.to(device=dev, dtype=torch.float64)
    ref = reference.double()
    starts = start_angles(start_deg, n_starts)
    t = torch.from_numpy(np.stack([rot_z(d) for d in starts])).to(dev)
    b = len(starts)
    srcb = src.unsqueeze(0).expand(b, -1, -1)
    normals = None
    if method == "plane":
        normals = (reference_normals if reference_normals is not None else local_geometry(ref, 16)[0])
        normals = normals.to(device=dev, dtype=torch.float64)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    for _ in range(iterations):
        p, _, j, ok = _correspond(srcb, ref, t, max_dist)
        cnt = ok.sum(dim=1)
        active = active & (cnt >= 6)
        w = (ok & active.unsqueeze(1)).to(torch.float64)
        q = ref[j]
        step = torch.eye(4, dtype=torch.float64, device=dev).repeat(b, 1, 1)
        if normals is not None:
            n = normals[j]
            a = torch.cat([torch.linalg.cross(p, n, dim=2), n], dim=2) * w.unsqueeze(2)
            rhs = -((p - q) * n).sum(dim=2) * w
            x = _lstsq_min_norm(a, rhs, cnt)
            step[:, :3, :3] = _rodrigues_t(x[:, :3])
            step[:, :3, 3] = x[:, 3:]
            size = x.norm(dim=1)
        else:
            rot, tr = _kabsch_step(p, q, w)
            step[:, :3, :3] = rot
            step[:, :3, 3] = tr
            cos = (rot.diagonal(dim1=1, dim2=2).sum(dim=1) - 1.0) / 2.0
            axis = torch.stack([rot[:, 2, 1] - rot[:, 1, 2], rot[:, 0, 2] - rot[:, 2, 0], rot[:, 1, 0] - rot[:, 0, 1]], 1)
            angle = torch.atan2(axis.norm(dim=1) / 2.0, cos)  # accurate for tiny angles, unlike acos
            size = torch.sqrt(angle * angle + (tr * tr).sum(dim=1))
        t = torch.where(active.view(-1, 1, 1), step @ t, t)
        active = active & ~(size < 1e-7)
        if not bool(active.any()):
            break
    _, d, _, ok = _correspond(srcb, ref, t, max_dist)
    fitness = ok.to(torch.float64).mean(dim=1)
    sq = torch.where(ok, d * d, torch.zeros_like(d)).sum(dim=1) / ok.sum(dim=1).clamp(min=1)
    rmse = torch.where(ok.any(dim=1), sq.sqrt(), torch.full_like(sq, math.inf))
    fit_l, rmse_l = fitness.tolist(), rmse.tolist()
    best = max(range(b), key=lambda i: ((round(fit_l[i], 3), -rmse_l[i]), -i))
    return t[best], {"fitness": fit_l[best], "rmse": rmse_l[best]}
