"""Point sampling and point-patch grouping for IMRNet (Li et al., CVPR 2024, Sec. 4.1 and 4.2).

* :func:`geometry_rates` is the geometry feature extractor G of Algorithm 1 (Sec. 4.1): a normal
  per point by a local plane fit (Eq. 1), a curvature from the eigenvalues of the neighbourhood
  covariance (Eq. 2), the rates of change of normals (Eq. 3) and curvature (Eq. 4) towards every
  neighbour, averaged over the neighbours (Eq. 5). The result is the "rate of change memory bank"
  M of the paper: one value R_i per point.
* :func:`gps_centers` is the feature-related sampling S of Algorithm 1: the ``⌊τ·N⌋`` points with
  the highest rate (Eq. 6, τ = 0.3) form the salient set, which is sampled at ``density_ratio`` (2)
  times the density of the rest (Sec. 5.3).
* :func:`fps` (farthest point sampling) and :func:`random_centers` are the ablation baselines of
  Table 4; :func:`sample_centers` dispatches on the method name.
* :func:`group_patches` is the KNN of Eq. 8: ``k`` nearest points around each centre, expressed
  relative to their centre (Point-MAE's normalization of a patch).

Everything is vectorized over points (numpy / scipy KD-tree / torch); the only Python loops run
over the *picks* of farthest point sampling, which is inherently sequential. Device: given torch
tensors, :func:`local_geometry`, :func:`geometry_rates`, :func:`fps` and the GPS / grouping steps
run on the tensors' device (neighbours by ``workers.components.knn``: scipy's KD-tree on a CPU,
~10× faster there than torch's brute force / grid search (8192 points, k = 16, one thread: 0.03 s
vs 0.34 s), ``workers.geometry.knn`` on a GPU; picks by ``workers.geometry.farthest_point_sample``).

Choices where the paper is vague (all documented at the function that makes them):

* Neighbourhoods are the ``k`` nearest points (``k = 16`` by default) rather than a radius ball,
  so every point has the same number of neighbours and the computation stays one array op.
* Normals come from PCA (the eigenvector of the smallest covariance eigenvalue), which is the
  closed-form minimizer of Eq. 1's plane fit. PCA normals have no sign, so the normal difference
  of Eq. 3 is taken sign-invariantly as ``min(|N_i − N_j|, |N_i + N_j|)``.
* Eq. 2 names two eigenvalues λ1, λ2; we read them as the two *smallest* eigenvalues of C_i
  (ascending λ0 ≤ λ1 ≤ λ2 here), so ``K_i = λ0 / (λ0 + λ1 + ε)``: 0 on a plane, rising with
  curvature and at edges. (With the two largest it would measure in-plane anisotropy, not
  curvature.)
* Eq. 3 divides by ``|v_ij|``; we measure that distance in units of the cloud's median
  nearest-neighbour spacing, so the sum in Eq. 5 of a per-length term (3) and a dimensionless one
  (4) does not depend on the units (mm vs unit sphere) or on the sampling density.
* GPS picks its centres by farthest point sampling *inside* the salient set and inside the rest,
  with the counts set so that the salient density is ``density_ratio`` times the other
  (``n_s / |S| = ratio · n_r / |R|``); FPS within each set keeps the centres spread out.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from workers import geometry
from workers.components.knn import knn

Sampler = Literal["gps", "fps", "random"]
SAMPLERS: tuple[str, ...] = ("gps", "fps", "random")
EPS = 1e-9


# ------------------------------------------------------------------------------------------------
# geometry features (Sec. 4.1)


def local_geometry(
    points: np.ndarray | torch.Tensor, k: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, ...]:
    """Normals (N×3), curvature K (N,), neighbour indices (N×k, self first) and distances (N×k).

    Normals: PCA of the ``k``-nearest-neighbour covariance (the least-squares plane of Eq. 1).
    Curvature: ``K = λ0 / (λ0 + λ1 + ε)`` with λ0 ≤ λ1 the two smallest eigenvalues (Eq. 2).
    numpy in (computed in float64 on the host), numpy out; a torch tensor in, tensors out on its
    device and in its floating dtype.
    """
    as_numpy = not isinstance(points, torch.Tensor)
    pts = torch.from_numpy(np.asarray(points, dtype=np.float64)) if as_numpy else points
    if not pts.is_floating_point():
        pts = pts.double()
    n = pts.shape[0]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be N×3, got {tuple(pts.shape)}")
    k = int(min(max(k, 3), n))
    dist, idx = knn(pts, pts, k)
    nb = pts[idx]  # N×k×3
    centred = nb - nb.mean(dim=1, keepdim=True)
    cov = torch.einsum("nki,nkj->nij", centred, centred) / k
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    normals = evecs[:, :, 0]
    evals = evals.clamp(min=0.0)
    curvature = evals[:, 0] / (evals[:, 0] + evals[:, 1] + EPS)
    if as_numpy:
        return normals.numpy(), curvature.numpy(), idx.numpy(), dist.numpy()
    return normals, curvature, idx, dist


def geometry_rates(points: np.ndarray | torch.Tensor, k: int = 16) -> np.ndarray | torch.Tensor:
    """The rate of change R_i of every point (Eq. 5): the memory bank M of Sec. 4.1 (float32, N).

    ``R_i = mean_j ( min(|N_i − N_j|, |N_i + N_j|) / |v_ij| + |K_i − K_j| )`` over the ``k − 1``
    nearest neighbours j of i, with ``|v_ij|`` in units of the median nearest-neighbour spacing.
    numpy in, numpy out; a tensor in, a tensor out on its device.
    """
    as_numpy = not isinstance(points, torch.Tensor)
    pts = np.asarray(points, dtype=np.float64) if as_numpy else points
    if len(pts) < 2:
        return np.zeros(len(pts), dtype=np.float32) if as_numpy else torch.zeros(len(pts), device=pts.device)
    normals, curv, idx, dist = (
        x if isinstance(x, torch.Tensor) else torch.from_numpy(x) for x in local_geometry(pts, k)
    )
    idx, dist = idx[:, 1:], dist[:, 1:]  # drop self
    spacing = float(torch.quantile(dist[:, 0], 0.5)) if dist.shape[1] else 1.0
    spacing = spacing if spacing > 0 else 1.0
    ni = normals[:, None, :]
    nj = normals[idx]
    dn = torch.minimum((ni - nj).norm(dim=2), (ni + nj).norm(dim=2))
    r_norm = dn / (dist / spacing).clamp(min=1e-3)
    r_curv = (curv[:, None] - curv[idx]).abs()
    rates = (r_norm + r_curv).mean(dim=1).float()
    return rates.numpy() if as_numpy else rates


# ------------------------------------------------------------------------------------------------
# centre sampling


def _as_batch(points: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if points.ndim == 2:
        return points.unsqueeze(0), True
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be N×3 or B×N×3, got {tuple(points.shape)}")
    return points, False


def fps(
    points: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Farthest point sampling: indices (B×n or n) of ``n`` points of ``points`` (B×N×3 or N×3).

    Starts from a random valid point (``generator``; point 0 without one) and repeatedly adds
    the point farthest from those already picked. ``valid`` (same leading shape, bool) restricts
    the picks to a subset; when a subset holds fewer than ``n`` points, its points repeat.
    """
    pts, single = _as_batch(points.float())
    b, npts, _ = pts.shape
    if n < 1:
        raise ValueError("n must be >= 1")
    if valid is None:
        valid_b = torch.ones(b, npts, dtype=torch.bool, device=pts.device)
    else:
        valid_b = (valid.unsqueeze(0) if single else valid).to(pts.device)
        if not bool(valid_b.any(dim=1).all()):
            raise ValueError("fps: every cloud needs at least one valid point")
    if generator is not None:
        start = torch.multinomial(valid_b.float().cpu(), 1, generator=generator).squeeze(1)
    else:
        start = valid_b.float().argmax(dim=1)
    out = geometry.farthest_point_sample(pts, n, start.to(pts.device), valid_b)
    return out[0] if single else out


def random_centers(points: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random sampling (RS of Table 4): ``n`` distinct indices per cloud (with repeats if N < n), on
    the points' device."""
    pts, single = _as_batch(points)
    b, npts, _ = pts.shape
    keys = torch.rand(b, npts, generator=generator)  # drawn on the CPU: the same picks on every device
    idx = keys.argsort(dim=1)[:, : min(n, npts)]
    if n > npts:
        idx = idx.repeat(1, math.ceil(n / npts))[:, :n]
    idx = idx.to(pts.device)
    return idx[0] if single else idx


def gps_split(n: int, tau: float = 0.3, density_ratio: float = 2.0) -> tuple[int, int]:
    """How many of ``n`` centres GPS takes from the salient fraction ``tau`` and from the rest.

    Solves ``n_s / τ = ratio · n_r / (1 − τ)`` with ``n_s + n_r = n`` (densities per point of
    each set), rounded, keeping at least one centre in each set when ``0 < τ < 1``.
    """
    if not 0.0 <= tau <= 1.0 or density_ratio <= 0:
        raise ValueError("tau must be in [0, 1] and density_ratio > 0")
    if tau <= 0.0:
        return 0, n
    if tau >= 1.0:
        return n, 0
    w_s = density_ratio * tau
    n_s = int(round(n * w_s / (w_s + (1.0 - tau))))
    n_s = min(max(n_s, 1), n - 1) if n >= 2 else n
    return n_s, n - n_s


def salient_mask(rates: torch.Tensor, tau: float = 0.3) -> torch.Tensor:
    """True for the ``⌊τ·N⌋`` points of highest rate in each cloud (Eq. 6: rank ≤ ⌊τ·N⌋)."""
    r = rates.unsqueeze(0) if rates.ndim == 1 else rates
    npts = r.shape[1]
    n_sal = int(math.floor(tau * npts))
    mask = torch.zeros_like(r, dtype=torch.bool)
    if n_sal > 0:
        top = torch.topk(r, n_sal, dim=1).indices
        mask.scatter_(1, top, True)
    return mask[0] if rates.ndim == 1 else mask


def gps_centers(
    points: torch.Tensor,
    rates: torch.Tensor,
    n: int,
    tau: float = 0.3,
    density_ratio: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Geometry-aware sampling (GPS, Sec. 4.1): centre indices (B×n or n).

    The salient set (the ``⌊τ·N⌋`` points of highest rate of change, Eq. 6) gets ``n_s`` centres
    and the rest ``n_r`` (:func:`gps_split`), each by farthest point sampling within its set, so the
    salient set is sampled at ``density_ratio`` times the density of the rest.
    """
    pts, single = _as_batch(points)
    r = rates.unsqueeze(0) if single else rates
    sal = salient_mask(r, tau)
    n_s, n_r = gps_split(n, tau, density_ratio)
    parts = []
    if n_s > 0:
        parts.append(fps(pts, n_s, generator, valid=sal))
    if n_r > 0:
        parts.append(fps(pts, n_r, generator, valid=~sal if sal.any() else None))
    idx = torch.cat(parts, dim=1)
    return idx[0] if single else idx


def sample_centers(
    method: str,
    points: torch.Tensor,
    n: int,
    rates: torch.Tensor | None = None,
    tau: float = 0.3,
    density_ratio: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Centre indices by ``method`` (``gps``, ``fps`` or ``random``): the ablation of Table 4."""
    if method == "gps":
        if rates is None:
            raise ValueError("gps needs the rates of change (geometry_rates)")
        return gps_centers(points, rates, n, tau, density_ratio, generator)
    if method == "fps":
        return fps(points, n, generator)
    if method == "random":
        return random_centers(points, n, generator)
    raise ValueError(f"unknown sampler {method!r}; expected one of {', '.join(SAMPLERS)}")


# ------------------------------------------------------------------------------------------------
# grouping (Eq. 8)


def knn_indices(points: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B×Q×k) of the ``k`` nearest points of ``points`` (B×N×3) to each query (B×Q×3)."""
    d = torch.cdist(query.float(), points.float())
    return torch.topk(d, min(k, points.shape[1]), dim=2, largest=False, sorted=True).indices


def group_patches(
    points: torch.Tensor, center_idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point patches: (neighbourhoods B×n×k×3 relative to their centre, centres B×n×3, indices B×n×k).

    Also accepts unbatched N×3 / n inputs (then returns unbatched outputs). When a cloud has fewer
    than ``k`` points, neighbours repeat (the nearest ones cycled) so the shape is fixed.
    """
    pts, single = _as_batch(points.float())
    cidx = center_idx.unsqueeze(0) if single else center_idx
    rows = torch.arange(pts.shape[0], device=pts.device).unsqueeze(1)
    cidx = cidx.to(pts.device)
    centers = pts[rows, cidx]
    nb = knn_indices(pts, centers, k)
    if nb.shape[2] < k:
        nb = nb.repeat(1, 1, math.ceil(k / nb.shape[2]))[:, :, :k]
    neigh = pts[rows.unsqueeze(2), nb] - centers.unsqueeze(2)
    if single:
        return neigh[0], centers[0], nb[0]
    return neigh, centers, nb
