"""Mesh building blocks of the part library (``sensors.parts``), as numpy arrays in millimetres.

Closed primitives (surfaces of revolution with an optional angular radius modulation for
hexagons, gear teeth and lobes; swept tubes; grid boxes; prisms; rods), merged without
booleans: every component is a closed surface with outward-facing triangles, emitted with
pieces of at most ~3 mm (not open3d's long needle triangles), so that :func:`subdivide_uniform`
stays cheap and uniform. Subdivision brings a coarse part to a uniform triangle density
(IMRNet's mesh subdivision, Li et al., CVPR 2024, Sec. 3) so that defects can be carved
anywhere (``sensors.defects``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import open3d as o3d

Mesh = tuple[np.ndarray, np.ndarray]
"""Internal mesh: vertices (n, 3) float64 and triangles (m, 3) int64."""


# ---------------------------------------------------------------------------------------------
# mesh helpers (vertices, triangles as numpy arrays)


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def _outward(m: Mesh) -> Mesh:
    """Flip a closed component's triangles if they face inwards (negative signed volume)."""
    v, f = m
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    if _signed_volume(v, f) < 0:
        f = f[:, ::-1]
    return v, np.ascontiguousarray(f)


def merge(*meshes: Mesh) -> Mesh:
    vs, fs, off = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def transform(m: Mesh, rot: np.ndarray | None = None, shift=(0.0, 0.0, 0.0)) -> Mesh:
    v, f = m
    if rot is not None:
        v = v @ rot.T
    return v + np.asarray(shift, dtype=np.float64), f


def rot_to(direction) -> np.ndarray:
    """Rotation matrix taking +z to ``direction`` (unit vector)."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    z = np.array([0.0, 0.0, 1.0])
    c = float(z @ d)
    if c > 1 - 1e-12:
        return np.eye(3)
    if c < -1 + 1e-12:
        return np.diag([1.0, -1.0, -1.0])
    axis = np.cross(z, d)
    s = np.linalg.norm(axis)
    k = axis / s
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * kx + (1 - c) * kx @ kx


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def from_o3d(mesh: o3d.geometry.TriangleMesh) -> Mesh:
    return _outward((np.asarray(mesh.vertices).copy(), np.asarray(mesh.triangles).astype(np.int64)))


def _resample(
    profile: np.ndarray, weight: np.ndarray, step: float, loop: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Insert points along each profile segment so that no piece is longer than ``step``."""
    m = len(profile)
    nxt = np.roll(profile, -1, axis=0)
    wn = np.roll(weight, -1)
    seg_len = np.linalg.norm(nxt - profile, axis=1)
    pieces = np.maximum(1, np.ceil(seg_len / step).astype(int))
    if not loop:
        pieces[-1] = 1  # last point: emit itself only
    seg = np.repeat(np.arange(m), pieces)
    t = (np.arange(len(seg)) - np.repeat(np.cumsum(pieces) - pieces, pieces)) / pieces[seg]
    pts = profile[seg] + t[:, None] * (nxt[seg] - profile[seg])
    w = weight[seg] + t * (wn[seg] - weight[seg])
    return pts, w


def revolve(
    profile,
    n: int,
    loop: bool = False,
    modulate: Callable[[np.ndarray], np.ndarray] | None = None,
    mod_mask=None,
    step: float = 3.0,
) -> Mesh:
    """Surface of revolution about z of a polyline profile of (r, z) points.

    Profile segments are first resampled to pieces of at most ``step`` mm, so the quads stay
    of bounded aspect ratio. Profile points with r == 0 become single pole vertices. ``loop``
    closes the profile (last point joins the first), for solids with a bore. Points with
    ``mod_mask`` weight w get their radius multiplied by ``1 + w * (modulate(theta) - 1)``
    (hexagon, gear teeth, lobes, knurl); inserted points interpolate w.
    """
    p0 = np.asarray(profile, dtype=np.float64)
    w0 = np.zeros(len(p0)) if mod_mask is None else np.asarray(mod_mask, dtype=np.float64)
    p, w = _resample(p0, w0, step, loop)
    m = len(p)
    theta = np.arange(n) * (2 * np.pi / n)
    factor = modulate(theta) if modulate is not None else np.ones(n)
    pole = p[:, 0] <= 1e-12
    ring_r = p[:, 0:1] * (1.0 + w[:, None] * (factor[None, :] - 1.0))  # (m, n)
    verts = np.stack(
        [ring_r * np.cos(theta)[None, :], ring_r * np.sin(theta)[None, :], np.repeat(p[:, 1:2], n, 1)], -1
    )
    # pole rings collapse to one vertex each
    counts = np.where(pole, 1, n)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = start[:, None] + np.where(pole[:, None], 0, np.arange(n)[None, :])  # (m, n)
    keep = ~pole[:, None] | (np.arange(n)[None, :] == 0)
    v = verts[keep]
    rows = np.arange(m - 1) if not loop else np.arange(m)
    i0, i1 = idx[rows], idx[(rows + 1) % m]
    a, b = i0, np.roll(i0, -1, axis=1)
    c, d = np.roll(i1, -1, axis=1), i1
    f = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return _outward((v, f))


def sweep_arc(section, n: int, angle: float, radius: float) -> Mesh:
    """Closed tube: a convex (u, z) cross-section loop, centred at (radius, 0) in the xz plane,
    swept about z from theta 0 to ``angle``; both ends capped with a fan."""
    s = np.asarray(section, dtype=np.float64)
    k = len(s)
    theta = np.linspace(0.0, angle, n + 1)
    r = radius + s[:, 0]
    v = np.stack(
        [
            r[None, :] * np.cos(theta)[:, None],
            r[None, :] * np.sin(theta)[:, None],
            np.repeat(s[None, :, 1], n + 1, 0),
        ],
        -1,
    ).reshape(-1, 3)
    idx = np.arange((n + 1) * k).reshape(n + 1, k)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = np.roll(idx[1:], -1, axis=1), idx[1:]
    f = [np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)]
    centres = np.array([[radius * math.cos(t), radius * math.sin(t), s[:, 1].mean()] for t in (0.0, angle)])
    ci = len(v) + np.arange(2)
    v = np.concatenate([v, centres])
    f.append(np.stack([np.full(k, ci[0]), np.roll(idx[0], -1), idx[0]], -1))
    f.append(np.stack([np.full(k, ci[1]), idx[-1], np.roll(idx[-1], -1)], -1))
    return _outward((v, np.concatenate(f)))


def box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, step: float = 3.0) -> Mesh:
    """Closed axis-aligned box whose faces are grids of cells at most ``step`` mm wide."""
    lo, hi = np.array([x0, y0, z0], float), np.array([x1, y1, z1], float)
    cells = np.maximum(1, np.ceil((hi - lo) / step).astype(int))
    shape = tuple(cells + 1)
    on_surface = np.zeros(shape, dtype=bool)
    on_surface[[0, -1], :, :] = on_surface[:, [0, -1], :] = on_surface[:, :, [0, -1]] = True
    ids = np.full(shape, -1, dtype=np.int64)
    ids[on_surface] = np.arange(int(on_surface.sum()))
    grid = np.stack(np.nonzero(on_surface), axis=1)
    v = lo + grid / cells * (hi - lo)
    faces = []
    for axis in range(3):
        for side, sign in ((0, -1.0), (-1, 1.0)):
            sheet = np.take(ids, side if side == 0 else shape[axis] - 1, axis=axis)  # 2D (u, w)
            a, b = sheet[:-1, :-1], sheet[1:, :-1]
            c, d = sheet[1:, 1:], sheet[:-1, 1:]
            tri = np.concatenate(
                [np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)]
            )
            nrm = np.cross(v[tri[0, 1]] - v[tri[0, 0]], v[tri[0, 2]] - v[tri[0, 0]])
            if nrm[axis] * sign < 0:
                tri = tri[:, ::-1]
            faces.append(tri)
    return v, np.concatenate(faces)


def prism(poly, z0: float, z1: float) -> Mesh:
    """Extrusion along z of a convex polygon (k, 2)."""
    p = np.asarray(poly, dtype=np.float64)
    k = len(p)
    v = np.concatenate([np.c_[p, np.full(k, z0)], np.c_[p, np.full(k, z1)]])
    i = np.arange(k)
    j = (i + 1) % k
    sides = np.concatenate([np.stack([i, j, j + k], -1), np.stack([i, j + k, i + k], -1)])
    fan = np.arange(1, k - 1)
    bottom = np.stack([np.zeros(k - 2, int), fan + 1, fan], -1)
    top = np.stack([np.full(k - 2, k), fan + k, fan + 1 + k], -1)
    return _outward((v, np.concatenate([sides, bottom, top])))


def rod(p0, p1, r: float, n: int = 32, modulate=None) -> Mesh:
    """Closed cylinder of radius r from p0 to p1."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    length = float(np.linalg.norm(p1 - p0))
    m = revolve(
        [(0, 0), (r, 0), (r, length), (0, length)], n, modulate=modulate, mod_mask=[0, 1, 1, 0], step=2.5
    )
    return transform(m, rot_to(p1 - p0), p0)


def hex_profile(phase: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """Radius factor of a regular hexagon of circumradius 1 (corners at phase + k*60°)."""

    def f(theta: np.ndarray) -> np.ndarray:
        t = np.mod(theta - phase, np.pi / 3) - np.pi / 6
        return math.cos(math.pi / 6) / np.cos(t)

    return f


def finish(m: Mesh) -> o3d.geometry.TriangleMesh:
    v, f = m
    lo, hi = v.min(axis=0), v.max(axis=0)
    v = v - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32))
    )
    mesh.compute_vertex_normals()
    return mesh


# ---------------------------------------------------------------------------------------------
# subdivision


def _split_long_edges(v: np.ndarray, f: np.ndarray, max_edge: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """One conforming refinement round: every edge longer than ``max_edge`` is split at its
    midpoint, once for both triangles sharing it (no T-junctions), and each triangle is
    re-triangulated by how many of its edges were split (1 -> 2, 2 -> 3, 3 -> 4 triangles;
    the quad of the 2-split case is cut along its shorter diagonal)."""
    a = f.reshape(-1)
    b = f[:, [1, 2, 0]].reshape(-1)
    key = np.minimum(a, b) * len(v) + np.maximum(a, b)
    ukey, inv = np.unique(key, return_inverse=True)
    e0, e1 = ukey // len(v), ukey % len(v)
    split = np.linalg.norm(v[e0] - v[e1], axis=1) > max_edge
    if not split.any():
        return v, f, False
    mid = np.full(len(ukey), -1, dtype=np.int64)
    mid[split] = len(v) + np.arange(int(split.sum()))
    v = np.concatenate([v, 0.5 * (v[e0[split]] + v[e1[split]])])
    tri_edge = inv.reshape(-1, 3)  # edge ids of (v0v1, v1v2, v2v0)
    s = split[tri_edge]
    cnt = s.sum(axis=1)
    out = [f[cnt == 0]]

    def rolled(sel: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = (np.arange(3)[None, :] + k[:, None]) % 3
        return np.take_along_axis(f[sel], order, axis=1), mid[
            np.take_along_axis(tri_edge[sel], order, axis=1)
        ]

    sel = np.flatnonzero(cnt == 1)
    fv, m = rolled(sel, np.argmax(s[sel], axis=1))  # split edge is now v0v1
    out += [np.stack([fv[:, 0], m[:, 0], fv[:, 2]], 1), np.stack([m[:, 0], fv[:, 1], fv[:, 2]], 1)]
    sel = np.flatnonzero(cnt == 2)
    fv, m = rolled(sel, (np.argmin(s[sel], axis=1) + 1) % 3)  # unsplit edge is now v2v0
    out.append(np.stack([m[:, 0], fv[:, 1], m[:, 1]], 1))
    short_a = (
        np.linalg.norm(v[fv[:, 0]] - v[m[:, 1]], axis=1) <= np.linalg.norm(v[m[:, 0]] - v[fv[:, 2]], axis=1)
    )[:, None]
    out.append(
        np.where(
            short_a, np.stack([fv[:, 0], m[:, 0], m[:, 1]], 1), np.stack([fv[:, 0], m[:, 0], fv[:, 2]], 1)
        )
    )
    out.append(
        np.where(
            short_a, np.stack([fv[:, 0], m[:, 1], fv[:, 2]], 1), np.stack([m[:, 0], m[:, 1], fv[:, 2]], 1)
        )
    )
    sel = np.flatnonzero(cnt == 3)
    fv, m = f[sel], mid[tri_edge[sel]]
    out += [
        np.stack([fv[:, 0], m[:, 0], m[:, 2]], 1),
        np.stack([fv[:, 1], m[:, 1], m[:, 0]], 1),
        np.stack([fv[:, 2], m[:, 2], m[:, 1]], 1),
        m,
    ]
    return v, np.concatenate(out), True


def subdivide_uniform(mesh: o3d.geometry.TriangleMesh, max_edge: float) -> o3d.geometry.TriangleMesh:
    """Mesh subdivision to a uniform density (IMRNet Sec. 3, "mesh subdivision").

    Repeatedly splits every edge longer than ``max_edge`` (mm) at its midpoint, conformingly
    (shared edges are split once, for both triangles), until no edge is longer. Only long edges
    are split, so small features keep their few triangles, and the result stays as watertight as
    the input, which matters when defects later move vertices. Needle triangles multiply more
    than well-shaped ones, which is why the part builders already emit triangles of bounded
    aspect ratio. Returns a new mesh with vertex normals; the input is not modified.
    """
    if max_edge <= 0:
        raise ValueError("max_edge must be > 0")
    v = np.asarray(mesh.vertices, dtype=np.float64).copy()
    f = np.asarray(mesh.triangles, dtype=np.int64).copy()
    for _ in range(200):
        v, f, changed = _split_long_edges(v, f, max_edge)
        if not changed:
            break
    out = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32))
    )
    out.compute_vertex_normals()
    return out
