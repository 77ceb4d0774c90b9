"""Procedural library of industrial parts, as open3d triangle meshes in millimetres.

Why: the simulated camera (``sensors.simcam``) and the unorganized-scan simulator
(``sensors.defects.sample_cloud``) need many slightly different, defect-free instances of a
handful of part classes, the way a production line makes them. Following the Anomaly-ShapeNet
synthesis pipeline (IMRNet, Li et al., CVPR 2024, Sec. 3: normal sample -> mesh subdivision ->
defect carving -> ground truth), a part is first built coarsely here, then brought to a uniform
triangle density with :func:`subdivide_uniform` so that defects can be carved anywhere
(``sensors.defects``).

Parts are built from a few closed primitives (surfaces of revolution with an optional angular
radius modulation for hexagons, gear teeth and lobes; swept tubes; grid boxes; prisms; open3d's
``create_cylinder`` for hex heads), merged without booleans. Every component is a closed
surface with outward-facing triangles, and the primitives are emitted with pieces of at most
~3 mm (not open3d's long needle triangles), so subdivision stays cheap and uniform. A part rests on the z = 0 plane (min z = 0) and its
bounding box is centred on the xy origin; sizes are 30-80 mm across.

:func:`make_part` jitters each dimension by up to ``±variation`` (relative), deterministically
for the given ``numpy.random.Generator`` (no open3d randomness is used).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import open3d as o3d

Mesh = tuple[np.ndarray, np.ndarray]
"""Internal mesh: vertices (n, 3) float64 and triangles (m, 3) int64."""

Jitter = Callable[[float], float]

PART_CLASSES: tuple[str, ...] = (
    "flange",
    "bracket",
    "nut",
    "shaft",
    "cap",
    "gear",
    "washer",
    "pulley",
    "hinge",
    "elbow",
    "knob",
    "bolt",
)


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


def _merge(*meshes: Mesh) -> Mesh:
    vs, fs, off = [], [], 0
    for v, f in meshes:
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def _transform(m: Mesh, rot: np.ndarray | None = None, shift=(0.0, 0.0, 0.0)) -> Mesh:
    v, f = m
    if rot is not None:
        v = v @ rot.T
    return v + np.asarray(shift, dtype=np.float64), f


def _rot_to(direction) -> np.ndarray:
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


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _from_o3d(mesh: o3d.geometry.TriangleMesh) -> Mesh:
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


def _revolve(
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


def _sweep_arc(section, n: int, angle: float, radius: float) -> Mesh:
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


def _box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, step: float = 3.0) -> Mesh:
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


def _prism(poly, z0: float, z1: float) -> Mesh:
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


def _rod(p0, p1, r: float, n: int = 32, modulate=None) -> Mesh:
    """Closed cylinder of radius r from p0 to p1."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    length = float(np.linalg.norm(p1 - p0))
    m = _revolve(
        [(0, 0), (r, 0), (r, length), (0, length)], n, modulate=modulate, mod_mask=[0, 1, 1, 0], step=2.5
    )
    return _transform(m, _rot_to(p1 - p0), p0)


def _hex(phase: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """Radius factor of a regular hexagon of circumradius 1 (corners at phase + k*60°)."""

    def f(theta: np.ndarray) -> np.ndarray:
        t = np.mod(theta - phase, np.pi / 3) - np.pi / 6
        return math.cos(math.pi / 6) / np.cos(t)

    return f


def _finish(m: Mesh) -> o3d.geometry.TriangleMesh:
    v, f = m
    lo, hi = v.min(axis=0), v.max(axis=0)
    v = v - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32))
    )
    mesh.compute_vertex_normals()
    return mesh


# ---------------------------------------------------------------------------------------------
# part classes; each takes a jitter function j(nominal) -> jittered dimension


def _flange(j: Jitter) -> Mesh:
    rb, rh, rf, tf, th = j(10.0), j(18.0), j(35.0), j(8.0), j(22.0)
    ch = j(1.2)
    body = _revolve(
        [
            (rb, 0),
            (rf, 0),
            (rf, tf - ch),
            (rf - ch, tf),
            (rh, tf),
            (rh, th - ch),
            (rh - ch, th),
            (rb + ch, th),
            (rb, th - ch),
        ],
        96,
        loop=True,
    )
    parts = [body]
    pcd, hr, hh = j(27.0), j(4.0), j(4.0)
    for k in range(6):
        a = k * np.pi / 3 + np.pi / 6
        head = _from_o3d(o3d.geometry.TriangleMesh.create_cylinder(hr, hh, resolution=6, split=1))
        parts.append(_transform(head, _rot_z(a), (pcd * math.cos(a), pcd * math.sin(a), tf + hh / 2 - 0.2)))
    return _merge(*parts)


def _bracket(j: Jitter) -> Mesh:
    w, d, t, h = j(60.0), j(40.0), j(6.0), j(42.0)
    base = _box(-w / 2, w / 2, -d / 2, d / 2, 0, t)
    wall = _box(-w / 2, w / 2, -d / 2, -d / 2 + t, t - 0.5, h)
    parts = [base, wall]
    g, gw = j(22.0), j(4.0)
    tri = [(-d / 2 + t - 0.3, t - 0.3), (-d / 2 + t + g, t - 0.3), (-d / 2 + t - 0.3, t + g)]
    for x in (-w / 2 + 3.0, w / 2 - 3.0 - gw):
        # triangular gusset in the yz plane, extruded along x
        gus = _prism(tri, 0.0, gw)
        rot = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (y, z, x) -> (x, y, z)
        parts.append(_transform(gus, rot, (x, 0.0, 0.0)))
    hr = j(5.0)
    for x in (-w / 4, w / 4):
        parts.append(_rod((x, d / 4, t - 0.2), (x, d / 4, t + 3.0), hr, 32))
    return _merge(*parts)


def _nut(j: Jitter) -> Mesh:
    r, rb, h, ch = j(20.0), j(10.0), j(16.0), j(1.0)
    return _revolve(
        [(rb, ch), (rb + ch, 0), (r, 0), (r, h), (rb + ch, h), (rb, h - ch)],
        72,
        loop=True,
        modulate=_hex(),
        mod_mask=[0, 0, 1, 1, 0, 0],
    )


def _shaft(j: Jitter) -> Mesh:
    r1, r2, r3, r4 = j(7.0), j(10.0), j(12.0), j(8.5)
    l1, l2, l3, l4 = j(12.0), j(18.0), j(32.0), j(18.0)
    c = 0.8
    z = np.cumsum([0, l1, l2, l3, l4])
    prof = [
        (0, 0),
        (r1 - c, 0),
        (r1, c),
        (r1, z[1]),
        (r2, z[1]),
        (r2, z[2]),
        (r3, z[2]),
        (r3, z[3]),
        (r4, z[3]),
        (r4, z[4] - c),
        (r4 - c, z[4]),
        (0, z[4]),
    ]
    m = _revolve(prof, 64)
    return _transform(m, _rot_to((1.0, 0.0, 0.0)))


def _cap(j: Jitter) -> Mesh:
    r, hs, hd = j(25.0), j(12.0), j(10.0)
    knurl = 40

    def mod(theta: np.ndarray) -> np.ndarray:
        return 1.0 + 0.035 * np.cos(knurl * theta)

    a = np.linspace(0, np.pi / 2, 10)[1:]
    dome = [(r * 0.92 * np.cos(t) + 0.0, hs + hd * np.sin(t)) for t in a]
    prof = [(0, 0), (r, 0), (r, hs), (r * 0.92, hs + 0.01)] + dome[:-1] + [(0, hs + hd)]
    mask = [0, 1, 1] + [0] * (len(prof) - 3)
    return _revolve(prof, knurl * 4, modulate=mod, mod_mask=mask)


def _gear(j: Jitter) -> Mesh:
    teeth = 20
    rt, rb, rh = j(32.0), j(7.0), j(13.0)
    rr = rt * j(0.86)
    t, th = j(9.0), j(15.0)
    ratio = rr / rt

    def mod(theta: np.ndarray) -> np.ndarray:
        u = np.mod(theta * teeth / (2 * np.pi), 1.0)
        trap = np.clip(np.minimum(u / 0.18, (0.68 - u) / 0.18), 0.0, 1.0)
        return ratio + (1.0 - ratio) * trap

    body = _revolve(
        [(rb, 0), (rt, 0), (rt, t), (rh, t), (rh, th), (rb, th)],
        teeth * 12,
        loop=True,
        modulate=mod,
        mod_mask=[0, 1, 1, 0, 0, 0],
    )
    return body


def _washer(j: Jitter) -> Mesh:
    ro, ri, t, c = j(30.0), j(13.0), j(3.0), 0.5
    return _revolve([(ri, 0), (ro, 0), (ro, t - c), (ro - c, t), (ri, t)], 128, loop=True)


def _pulley(j: Jitter) -> Mesh:
    rb, rh, rw, ro = j(6.0), j(12.0), j(24.0), j(32.0)
    hh, w0, w1, h = j(24.0), j(8.0), j(13.0), j(22.0)
    g = (ro - rw) * 0.6
    prof = [
        (rb, 0),
        (rh, 0),
        (rh, w0),
        (rw, w0),
        (rw, 0),
        (ro, 0),
        (ro, h * 0.15),
        (ro - g, h / 2),
        (ro, h * 0.85),
        (ro, h),
        (rw, h),
        (rw, w1),
        (rh, w1),
        (rh, hh),
        (rb, hh),
    ]
    return _revolve(prof, 128, loop=True)


def _hinge(j: Jitter) -> Mesh:
    lw, ll, t, rk = j(30.0), j(44.0), j(3.0), j(5.0)
    parts = [
        _box(-lw - rk * 0.6, -rk * 0.6, -ll / 2, ll / 2, 0, t),
        _box(rk * 0.6, lw + rk * 0.6, -ll / 2, ll / 2, 0, t),
    ]
    seg = ll / 5
    for k in range(5):
        y0 = -ll / 2 + k * seg + (0.3 if k else 0.0)
        y1 = -ll / 2 + (k + 1) * seg - (0.3 if k < 4 else 0.0)
        parts.append(_rod((0, y0, rk), (0, y1, rk), rk, 40))
    pr = j(2.8)
    for sx in (-1, 1):
        for sy in (-1, 1):
            x = sx * (rk * 0.6 + lw * 0.55)
            parts.append(_rod((x, sy * ll / 4, t - 0.2), (x, sy * ll / 4, t + 1.2), pr, 24))
    return _merge(*parts)


def _elbow(j: Jitter) -> Mesh:
    rb, rp, rc, lc = j(30.0), j(9.0), j(11.0), j(7.0)
    section = [(rp * math.cos(a), rp * math.sin(a)) for a in np.linspace(0, 2 * np.pi, 32, endpoint=False)]
    arc = _transform(_sweep_arc(section, 36, np.pi / 2, rb), None, (0, 0, rc))
    leg = j(10.0)
    parts = [
        arc,
        _rod((rb, 0.3, rc), (rb, -leg, rc), rp, 32),
        _rod((0.3, rb, rc), (-leg, rb, rc), rp, 32),
        _rod((rb, -leg + 0.2, rc), (rb, -leg - lc, rc), rc, 40),
        _rod((-leg + 0.2, rb, rc), (-leg - lc, rb, rc), rc, 40),
    ]
    return _merge(*parts)


def _knob(j: Jitter) -> Mesh:
    r, h, rs, hs = j(26.0), j(12.0), j(9.0), j(10.0)
    lobes = 5

    def mod(theta: np.ndarray) -> np.ndarray:
        return 0.8 + 0.2 * np.cos(lobes * theta)

    c = j(2.5)
    prof = [
        (0, 0),
        (r, 0),
        (r, h - c),
        (r - c * 0.4, h - c * 0.3),
        (r - c, h),
        (rs, h),
        (rs, h + hs - 1.5),
        (rs - 1.5, h + hs),
        (0, h + hs),
    ]
    mask = [0, 1, 1, 1, 1, 0, 0, 0, 0]
    return _revolve(prof, lobes * 24, modulate=mod, mod_mask=mask)


def _bolt(j: Jitter) -> Mesh:
    rh, hh, rs, ls = j(12.0), j(8.0), j(6.0), j(48.0)
    pitch, depth = 1.5, 0.55
    head = _revolve([(0, 0), (rh, 0), (rh, hh), (0, hh)], 72, modulate=_hex(np.pi / 6), mod_mask=[0, 1, 1, 0])
    nz = int(ls / pitch)
    zs = hh - 0.2 + np.arange(2 * nz + 1) * (pitch / 2)
    rs_ = np.where(np.arange(2 * nz + 1) % 2 == 0, rs, rs - depth)
    prof = [(0.0, zs[0])] + list(zip(rs_, zs, strict=True)) + [(0.0, zs[-1])]
    shank = _revolve(prof, 48)
    m = _merge(head, shank)
    return _transform(m, _rot_to((1.0, 0.0, 0.0)))


_BUILDERS: dict[str, Callable[[Jitter], Mesh]] = {
    "flange": _flange,
    "bracket": _bracket,
    "nut": _nut,
    "shaft": _shaft,
    "cap": _cap,
    "gear": _gear,
    "washer": _washer,
    "pulley": _pulley,
    "hinge": _hinge,
    "elbow": _elbow,
    "knob": _knob,
    "bolt": _bolt,
}
assert tuple(_BUILDERS) == PART_CLASSES


def make_part(cls: str, rng: np.random.Generator, variation: float = 0.02) -> o3d.geometry.TriangleMesh:
    """A coarse, defect-free part of class ``cls`` (one of :data:`PART_CLASSES`), in mm.

    Every nominal dimension is multiplied by ``1 + U(-variation, variation)`` drawn from ``rng``
    (part-to-part variation; deterministic for the generator's state). The part rests on z = 0
    and its xy bounding box is centred on the origin. Call :func:`subdivide_uniform` before
    carving defects or sampling.
    """
    if cls not in _BUILDERS:
        raise ValueError(f"unknown part class {cls!r}; known: {', '.join(PART_CLASSES)}")

    def jitter(x: float) -> float:
        return float(x) * (1.0 + float(rng.uniform(-variation, variation)))

    return _finish(_BUILDERS[cls](jitter))


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
