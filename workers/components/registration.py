"""Rigid registration of a part to a reference cloud: global hypotheses, then point-to-plane ICP.

What (:class:`Registrar`, numpy + scipy's KD-tree, vectorized over points and hypotheses):

1. Hypotheses. Both clouds' principal axes (PCA of the centred points) give rotations taking the
   source frame onto the reference frame: every element of the 24-rotation group of the cube
   applied between the two frames (so axis-order swaps of near-equal eigenvalues and the sign
   ambiguity of each axis are all covered), each followed by spins about the reference's most
   distinct axis when the other two eigenvalues are within ``degenerate_ratio`` of each other
   (rotationally symmetric parts: a flange, a nut). The identity rotation (a camera view of a
   fixtured part) is always among them. Every hypothesis maps centroid onto centroid.
2. Coarse ICP: all hypotheses at once as one batch on a subsample of ``coarse_points`` source
   points, point-to-plane Gauss-Newton steps against the reference normals with correspondences
   truncated at ``coarse_dist`` (one that slides off returns its lowest-cost pose); after
   ``coarse_prune_after`` iterations only the best ``coarse_keep`` hypotheses (lowest truncated
   mean squared distance) go on. On a rotationally symmetric part the best is also turned by
   fractions of the spin step (``sub_spins``), and the cheapest turn goes on: features repeating
   with the spins (a flange's six bolt heads) otherwise leave the part turned between them.
3. Fine ICP on up to ``fine_points`` source points with correspondences within ``fine_dist``
   (a defect farther off the surface than that does not pull the pose), until the step is tiny.
4. Fitness: the fraction of the source within ``fine_dist`` of the reference after the fine ICP.
   The result keeps the moved source and that query's answer (nearest reference point within
   ``fine_dist``), so a caller comparing the part with the reference need not search again.

Why not open3d's FPFH + RANSAC: FPFH alone costs 0.9–1.2 s on a 28 K-point cloud on 2 cores
(``workers.components.fpfh``), far over a 150 ms budget, and RANSAC is random; the PCA-frame
hypotheses need one 3×3 eigen-decomposition, and the batched ICP decides between them from the
geometry itself. Known limit: a partial view whose principal axes differ from the reference's
(a different side seen) is found only when its pose is close to one of the hypotheses.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["Registrar", "Registration", "cube_rotations", "estimate_normals", "rotation_angle_deg"]


@dataclass
class Registration:
    """The result of registering a source cloud onto a reference."""

    transform: np.ndarray
    """4×4 float64 rigid transform taking source points onto the reference."""
    fitness: float
    """Fraction of source points within the fine correspondence distance after registration."""
    rmse: float
    """RMS distance of those inlier points (reference units)."""
    seconds: float
    n_hypotheses: int
    moved: np.ndarray | None = field(default=None, repr=False)
    """The source moved by ``transform`` (N×3 float64)."""
    nearest_distance: np.ndarray | None = field(default=None, repr=False)
    """Per moved source point, the distance to its nearest reference point, ``inf`` beyond the fine
    correspondence distance: the fitness query's own answer, handed on so a caller that needs the
    same nearest points (the template's deviation) does not search for them again."""
    nearest_index: np.ndarray | None = field(default=None, repr=False)
    """Per moved source point, the index of that nearest reference point (``len(reference)`` beyond)."""


def cube_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube (signed permutation matrices with determinant +1), 24×3×3."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.stack(out)


SLIDE_RATIO = 1.25
"""An ICP whose last truncated cost exceeds its lowest by this factor has slid off: see ``Registrar._icp``."""

_CUBE = cube_rotations()
_CUBE.setflags(write=False)
"""The 24 rotations, built once: every registration's hypotheses start from them."""


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * (kx @ kx)


def _rodrigues_batch(w: np.ndarray) -> np.ndarray:
    """Rotation vectors (B×3) → rotation matrices (B×3×3)."""
    theta = np.linalg.norm(w, axis=1)
    k = w / np.where(theta > 1e-12, theta, 1.0)[:, None]
    z = np.zeros_like(theta)
    kx = np.stack([z, -k[:, 2], k[:, 1], k[:, 2], z, -k[:, 0], -k[:, 1], k[:, 0], z], axis=1).reshape(-1, 3, 3)
    s, c = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    return np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """The angle (degrees) of a 3×3 rotation (or the rotation block of a 4×4 transform)."""
    c = (np.trace(np.asarray(rotation)[:3, :3]) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def estimate_normals(points: np.ndarray, k: int = 16, tree: cKDTree | None = None) -> np.ndarray:
    """Unit PCA normals (N×3) from each point's ``k`` nearest neighbours, oriented away from the centroid."""
    pts = np.asarray(points, dtype=np.float64)
    tree = tree if tree is not None else cKDTree(pts)
    _, idx = tree.query(pts, k=min(k, len(pts)))
    nb = pts[idx] - pts[idx].mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", nb, nb)
    _, vecs = np.linalg.eigh(cov)
    normals = vecs[:, :, 0]
    flip = np.einsum("ij,ij->i", normals, pts - pts.mean(axis=0)) < 0
    normals[flip] *= -1.0
    return normals


def _pca(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroid, axes as columns by descending variance with det +1, variances)."""
    c = points.mean(axis=0)
    x = points - c
    evals, evecs = np.linalg.eigh(x.T @ x / max(1, len(x)))
    order = np.argsort(evals)[::-1]
    axes = evecs[:, order]
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1.0
    return c, axes, evals[order]


class Registrar:
    """Registers clouds onto one fixed reference (its KD-tree and normals are built once)."""

    def __init__(
        self,
        reference: np.ndarray,
        reference_normals: np.ndarray | None = None,
        coarse_dist: float = 5.0,
        fine_dist: float = 2.0,
        coarse_points: int = 200,
        fine_points: int = 1500,
        coarse_iterations: int = 12,
        coarse_prune_after: int = 3,
        coarse_keep: int = 4,
        fine_iterations: int = 20,
        degenerate_ratio: float = 0.85,
        spins: int = 6,
        sub_spins: int = 6,
        seed: int = 0,
        tree: cKDTree | None = None,
        retry_below: float = 0.6,
    ) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim != 2 or ref.shape[1] != 3 or len(ref) < 10 or not np.isfinite(ref).all():
            raise ValueError(f"reference must be a finite N×3 array of at least 10 points, got {ref.shape}")
        if tree is not None and (tree.n != len(ref) or not np.array_equal(tree.data, ref)):
            raise ValueError("tree must be a KD-tree of the reference points")
        self.reference = ref
        self.tree = tree if tree is not None else cKDTree(ref)
        """KD-tree of the reference (``tree`` when given: one built once and shared with the caller)."""
        self.normals = (np.asarray(reference_normals, dtype=np.float64) if reference_normals is not None
                        else estimate_normals(ref, 16, self.tree))
        self.coarse_dist, self.fine_dist = float(coarse_dist), float(fine_dist)
        self.coarse_points, self.fine_points = int(coarse_points), int(fine_points)
        self.coarse_iterations, self.fine_iterations = int(coarse_iterations), int(fine_iterations)
        self.coarse_prune_after, self.coarse_keep = int(coarse_prune_after), int(coarse_keep)
        self.degenerate_ratio, self.spins, self.seed = float(degenerate_ratio), int(spins), int(seed)
        self.sub_spins = int(sub_spins)
        """Turns tried between two spins, after the coarse step (``_between_spins``); 1: none."""
        self.retry_below = float(retry_below)
        """A fitness under this retries the coarse step with more hypotheses kept (``register``)."""
        self.centroid, self.axes, self.evals = _pca(ref)

    # -- hypotheses ---------------------------------------------------------------------------

    def spin_axes(self, source_evals: np.ndarray) -> list[int]:
        """Reference axes (column indices of ``axes``) a part spins about: axis i is distinct and
        the other two variances, the smaller of the reference's and the source's, are within
        ``degenerate_ratio`` of each other (a rotationally symmetric part)."""
        if self.spins <= 1:
            return []
        e = np.maximum(np.minimum(self.evals, source_evals), 1e-12)
        out = []
        for i in range(3):
            j, k = [x for x in range(3) if x != i]
            if min(e[j], e[k]) / max(e[j], e[k]) >= self.degenerate_ratio:
                out.append(i)
        return out

    def hypotheses(self, source: np.ndarray,
                   pca: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Initial transforms (B×4×4) for ``source``: PCA-frame rotations, spins, and the identity.
        ``pca``: the source's (centroid, axes, variances) when the caller has them already."""
        c_s, a_s, e_s = pca if pca is not None else _pca(source)
        rots = [self.axes @ g @ a_s.T for g in _CUBE]
        for i in self.spin_axes(e_s):  # axis i distinct, the other two nearly equal: spin about axis i
            base = [self.axes @ g @ a_s.T for g in _CUBE if abs(g[i, i]) == 1.0]
            for ang in np.arange(1, self.spins) * (2 * math.pi / self.spins):
                spin = _axis_rotation(self.axes[:, i], ang)
                rots.extend(spin @ r for r in base)
        rots.append(np.eye(3))
        r = np.stack(rots)
        t = np.tile(np.eye(4), (len(r), 1, 1))
        t[:, :3, :3] = r
        t[:, :3, 3] = self.centroid - np.einsum("bij,j->bi", r, c_s)
        return t

    # -- ICP ----------------------------------------------------------------------------------

    def _icp(self, src: np.ndarray, t: np.ndarray, max_dist: float, iterations: int,
             prune_after: int | None = None, keep: int = 1,
             inverse: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batched point-to-plane ICP of ``src`` (N×3) from every transform in ``t`` (B×4×4).

        Returns the final transforms and each one's truncated cost ``mean(min(d, max_dist)²)``,
        except where a transform slid away: its last cost above ``SLIDE_RATIO`` times the lowest
        it met, whose pose is returned instead. Gauss-Newton point-to-plane steps do not always
        lower that cost: on a part dominated by one flat face, whose points do not hold a slide
        within it, they can slide off (a pulley's camera view, started at the identity, went
        57 mm off while its cost rose tenfold). Damping every step (Levenberg-Marquardt) stopped
        the slide too, but slowed the batch so that the pruning kept wrong spins of a flange's
        bolt circle; returning the lowest-cost pose always moved converged poses back by up to
        a step (docs/design/template.md, "The cause: point-to-plane steps that slide off").
        ``inverse``: ``t`` holds the distinct ones of a longer list of transforms and
        ``inverse[i]`` is the row of its i-th; the pruning keeps the ``keep`` best of that list
        (copies included, as if all had run), so dropping copies does not change which go on.
        """
        n = len(src)
        n_listed = len(t) if inverse is None else len(inverse)
        best_t, best_cost = t.copy(), np.full(len(t), np.inf)
        for it in range(iterations):
            b = len(t)
            p = np.matmul(src, t[:, :3, :3].transpose(0, 2, 1)) + t[:, None, :3, 3]
            d, j = self.tree.query(p.reshape(-1, 3), distance_upper_bound=max_dist, workers=1)
            d, j = d.reshape(b, n), j.reshape(b, n)
            ok = np.isfinite(d)
            cost = np.where(ok, d * d, max_dist * max_dist).mean(axis=1)
            lower = cost < best_cost
            best_t[lower], best_cost[lower] = t[lower], cost[lower]
            if prune_after is not None and it == prune_after and n_listed > keep:
                if inverse is None:
                    best = np.argsort(cost)[:keep]
                else:
                    listed = inverse[np.argsort(cost[inverse])[:keep]]
                    best = listed[np.sort(np.unique(listed, return_index=True)[1])]
                t, p, d, j, ok, cost = t[best], p[best], d[best], j[best], ok[best], cost[best]
                best_t, best_cost = best_t[best], best_cost[best]
            jj = np.where(ok, j, 0)
            q, nrm = self.reference[jj], self.normals[jj]
            w = ok.astype(np.float64)
            a = np.empty(p.shape[:2] + (6,))  # rows (p × n, n) of the point-to-plane Jacobian
            a[..., 0] = p[..., 1] * nrm[..., 2] - p[..., 2] * nrm[..., 1]
            a[..., 1] = p[..., 2] * nrm[..., 0] - p[..., 0] * nrm[..., 2]
            a[..., 2] = p[..., 0] * nrm[..., 1] - p[..., 1] * nrm[..., 0]
            a[..., 3:] = nrm
            a *= w[:, :, None]
            r = -((p - q) * nrm).sum(axis=2) * w
            at = a.transpose(0, 2, 1)
            ata = np.matmul(at, a) + 1e-9 * np.eye(6)
            atb = np.matmul(at, r[:, :, None])[:, :, 0]
            x = np.linalg.solve(ata, atb[:, :, None])[:, :, 0]
            x[ok.sum(axis=1) < 6] = 0.0
            step = np.tile(np.eye(4), (len(t), 1, 1))
            step[:, :3, :3] = _rodrigues_batch(x[:, :3])
            step[:, :3, 3] = x[:, 3:]
            t = step @ t
            if float(np.abs(x).max()) < 1e-6:
                break
        slid = cost > SLIDE_RATIO * best_cost
        return np.where(slid[:, None, None], best_t, t), np.where(slid, best_cost, cost)

    @staticmethod
    def _distinct(t: np.ndarray, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the distinct transforms of ``t`` (B×4×4), first occurrences in order; for
        every row of ``t``, the position of its distinct one among them). Two transforms are the
        same when no entry differs by more than ``tol``: the hypotheses of a symmetric part
        repeat (a spin by 180° about the distinct axis is itself one of the 24 cube rotations,
        so spins and cube rotations meet: 65 hypotheses hold about 41 distinct ones), and a
        copy's ICP is its original's up to float rounding."""
        flat = t[:, :3, :].reshape(len(t), 12)
        same = np.abs(flat[:, None, :] - flat[None, :, :]).max(axis=2) <= tol
        first = np.argmax(same, axis=1)
        rows = np.unique(first)
        return rows, np.searchsorted(rows, first)

    def _subsample(self, points: np.ndarray, n: int, salt: int) -> np.ndarray:
        if len(points) <= n:
            return points
        rng = np.random.default_rng([self.seed, salt])
        return points[rng.choice(len(points), n, replace=False)]

    def register(self, source: np.ndarray, init: np.ndarray | None = None) -> Registration:
        """Register ``source`` (N×3) onto the reference; ``init`` (4×4) skips the global step.

        When the best coarse hypothesis ends under ``retry_below`` fitness (the template's
        ``min_fitness``: it would be flagged failed), the coarse step runs again keeping four
        times as many hypotheses past its pruning, and the better of the two results is taken:
        a pose that converges slowly in the first iterations (a gear's camera view: 0.51 against
        0.91) is otherwise pruned before it can win."""
        t0 = time.perf_counter()
        src = np.asarray(source, dtype=np.float64)
        if src.ndim != 2 or src.shape[1] != 3 or len(src) < 10 or not np.isfinite(src).all():
            raise ValueError(f"source must be a finite N×3 array of at least 10 points, got {src.shape}")
        fine = self._subsample(src, self.fine_points, 2)
        if init is not None:
            return self._refine(src, fine, np.asarray(init, dtype=np.float64).reshape(1, 4, 4), 1, t0)
        pca = _pca(src)
        hyp = self.hypotheses(src, pca)
        axes = self.spin_axes(pca[2])
        coarse = self._subsample(src, self.coarse_points, 1)
        rows, inverse = self._distinct(hyp)
        result = None
        for keep in (self.coarse_keep, 4 * self.coarse_keep):
            kept, cost = self._icp(coarse, hyp[rows], self.coarse_dist, self.coarse_iterations,
                                   self.coarse_prune_after, keep, inverse)
            best = kept[int(np.argmin(cost))]
            if axes and self.sub_spins > 1:
                best = self._between_spins(coarse, best, axes)
            tried = self._refine(src, fine, best[None], len(hyp), t0)
            if result is None or tried.fitness > result.fitness:
                result = tried
            if result.fitness >= self.retry_below or keep >= len(rows):
                break
        assert result is not None
        result.seconds = time.perf_counter() - t0
        return result

    def _between_spins(self, coarse: np.ndarray, start: np.ndarray, axes: list[int]) -> np.ndarray:
        """The coarse pose ``start`` (4×4) or one turned from it about a spin axis by a fraction
        of the spin step, whichever ends the coarse ICP cheapest.

        The spins are ``2π / spins`` apart, so on a part whose symmetry matches them (a flange
        with six bolt heads, spun by 60°) every spin lands at the same angle to its features,
        an angle the PCA frame leaves at random. A feature more than ``coarse_dist`` off its
        place gives ICP no pull, and the part stays turned: a good flange then scored 21 against
        1.2 for its good neighbours (docs/design/template.md, "Turned between spins")."""
        step = 2 * math.pi / self.spins
        fractions = [f for j in range(1, self.sub_spins // 2 + 1) for f in (j, -j)]
        cands = [start]
        for i in axes:
            for f in fractions:
                r = _axis_rotation(self.axes[:, i], f * step / self.sub_spins)
                turn = np.eye(4)
                turn[:3, :3] = r
                turn[:3, 3] = self.centroid - r @ self.centroid
                cands.append(turn @ start)
        t, cost = self._icp(coarse, np.stack(cands), self.coarse_dist, self.coarse_iterations)
        return t[int(np.argmin(cost))]

    def _refine(self, src: np.ndarray, fine: np.ndarray, start: np.ndarray, n_hyp: int, t0: float) -> Registration:
        """Fine ICP from ``start`` (1×4×4), then the fitness query over every source point."""
        t, _ = self._icp(fine, start, self.fine_dist, self.fine_iterations)
        transform = t[0]
        moved = src @ transform[:3, :3].T + transform[:3, 3]
        d, j = self.tree.query(moved, distance_upper_bound=self.fine_dist, workers=1)
        ok = np.isfinite(d)
        fitness = float(ok.mean())
        rmse = float(np.sqrt(np.mean(d[ok] ** 2))) if ok.any() else math.inf
        return Registration(transform, fitness, rmse, time.perf_counter() - t0, n_hyp, moved, d, j)
