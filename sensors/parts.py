"""Procedural library of industrial parts, as open3d triangle meshes in millimetres.

Why: the simulated camera (``sensors.simcam``) and the unorganized-scan simulator
(``sensors.defects.sample_cloud``) need many slightly different, defect-free instances of a
handful of part classes, the way a production line makes them. Following the Anomaly-ShapeNet
synthesis pipeline (IMRNet, Li et al., CVPR 2024, Sec. 3: normal sample -> mesh subdivision ->
defect carving -> ground truth), a part is first built coarsely here, then brought to a uniform
triangle density with ``sensors.mesh.subdivide_uniform`` so that defects can be carved anywhere
(``sensors.defects``).

Parts are built from the closed primitives of ``sensors.mesh`` (and open3d's ``create_cylinder``
for hex heads), merged without booleans. A part rests on the z = 0 plane (min z = 0) and its
bounding box is centred on the xy origin; sizes are 30-80 mm across.

:func:`make_part` jitters each dimension within a tolerance, deterministically for the given
``numpy.random.Generator`` (no open3d randomness is used): by default the permissible deviation
of ISO 2768-1 class m ("medium", the general tolerance most drawings state) for the dimension's
size, so that good parts differ the way good parts off one line do; or by a relative amount, for
shape families (IMRNet's pretraining pool).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import open3d as o3d

from sensors.mesh import (
    Mesh,
    box,
    finish,
    from_o3d,
    hex_profile,
    merge,
    prism,
    revolve,
    rod,
    rot_to,
    rot_z,
    sweep_arc,
    transform,
)
from sensors.tolerance import DEFAULT_TOLERANCE, Tolerance, permissible_deviation

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
# part classes; each takes a jitter function j(nominal) -> jittered dimension


def _flange(j: Jitter) -> Mesh:
    rb, rh, rf, tf, th = j(10.0), j(18.0), j(35.0), j(8.0), j(22.0)
    ch = j(1.2)
    body = revolve(
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
        head = from_o3d(o3d.geometry.TriangleMesh.create_cylinder(hr, hh, resolution=6, split=1))
        parts.append(transform(head, rot_z(a), (pcd * math.cos(a), pcd * math.sin(a), tf + hh / 2 - 0.2)))
    return merge(*parts)


def _bracket(j: Jitter) -> Mesh:
    w, d, t, h = j(60.0), j(40.0), j(6.0), j(42.0)
    base = box(-w / 2, w / 2, -d / 2, d / 2, 0, t)
    wall = box(-w / 2, w / 2, -d / 2, -d / 2 + t, t - 0.5, h)
    parts = [base, wall]
    g, gw = j(22.0), j(4.0)
    tri = [(-d / 2 + t - 0.3, t - 0.3), (-d / 2 + t + g, t - 0.3), (-d / 2 + t - 0.3, t + g)]
    for x in (-w / 2 + 3.0, w / 2 - 3.0 - gw):
        # triangular gusset in the yz plane, extruded along x
        gus = prism(tri, 0.0, gw)
        rot = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (y, z, x) -> (x, y, z)
        parts.append(transform(gus, rot, (x, 0.0, 0.0)))
    hr = j(5.0)
    for x in (-w / 4, w / 4):
        parts.append(rod((x, d / 4, t - 0.2), (x, d / 4, t + 3.0), hr, 32))
    return merge(*parts)


def _nut(j: Jitter) -> Mesh:
    r, rb, h, ch = j(20.0), j(10.0), j(16.0), j(1.0)
    return revolve(
        [(rb, ch), (rb + ch, 0), (r, 0), (r, h), (rb + ch, h), (rb, h - ch)],
        72,
        loop=True,
        modulate=hex_profile(),
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
    m = revolve(prof, 64)
    return transform(m, rot_to((1.0, 0.0, 0.0)))


def _cap(j: Jitter) -> Mesh:
    r, hs, hd = j(25.0), j(12.0), j(10.0)
    knurl = 40

    def mod(theta: np.ndarray) -> np.ndarray:
        return 1.0 + 0.035 * np.cos(knurl * theta)

    a = np.linspace(0, np.pi / 2, 10)[1:]
    dome = [(r * 0.92 * np.cos(t) + 0.0, hs + hd * np.sin(t)) for t in a]
    prof = [(0, 0), (r, 0), (r, hs), (r * 0.92, hs + 0.01)] + dome[:-1] + [(0, hs + hd)]
    mask = [0, 1, 1] + [0] * (len(prof) - 3)
    return revolve(prof, knurl * 4, modulate=mod, mod_mask=mask)


def _gear(j: Jitter) -> Mesh:
    teeth = 20
    rt, rb, rh = j(32.0), j(7.0), j(13.0)
    rr = j(rt * 0.86)
    t, th = j(9.0), j(15.0)
    ratio = rr / rt

    def mod(theta: np.ndarray) -> np.ndarray:
        u = np.mod(theta * teeth / (2 * np.pi), 1.0)
        trap = np.clip(np.minimum(u / 0.18, (0.68 - u) / 0.18), 0.0, 1.0)
        return ratio + (1.0 - ratio) * trap

    body = revolve(
        [(rb, 0), (rt, 0), (rt, t), (rh, t), (rh, th), (rb, th)],
        teeth * 12,
        loop=True,
        modulate=mod,
        mod_mask=[0, 1, 1, 0, 0, 0],
    )
    return body


def _washer(j: Jitter) -> Mesh:
    ro, ri, t, c = j(30.0), j(13.0), j(3.0), 0.5
    return revolve([(ri, 0), (ro, 0), (ro, t - c), (ro - c, t), (ri, t)], 128, loop=True)


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
    return revolve(prof, 128, loop=True)


def _hinge(j: Jitter) -> Mesh:
    lw, ll, t, rk = j(30.0), j(44.0), j(3.0), j(5.0)
    parts = [
        box(-lw - rk * 0.6, -rk * 0.6, -ll / 2, ll / 2, 0, t),
        box(rk * 0.6, lw + rk * 0.6, -ll / 2, ll / 2, 0, t),
    ]
    seg = ll / 5
    for k in range(5):
        y0 = -ll / 2 + k * seg + (0.3 if k else 0.0)
        y1 = -ll / 2 + (k + 1) * seg - (0.3 if k < 4 else 0.0)
        parts.append(rod((0, y0, rk), (0, y1, rk), rk, 40))
    pr = j(2.8)
    for sx in (-1, 1):
        for sy in (-1, 1):
            x = sx * (rk * 0.6 + lw * 0.55)
            parts.append(rod((x, sy * ll / 4, t - 0.2), (x, sy * ll / 4, t + 1.2), pr, 24))
    return merge(*parts)


def _elbow(j: Jitter) -> Mesh:
    rb, rp, rc, lc = j(30.0), j(9.0), j(11.0), j(7.0)
    section = [(rp * math.cos(a), rp * math.sin(a)) for a in np.linspace(0, 2 * np.pi, 32, endpoint=False)]
    arc = transform(sweep_arc(section, 36, np.pi / 2, rb), None, (0, 0, rc))
    leg = j(10.0)
    parts = [
        arc,
        rod((rb, 0.3, rc), (rb, -leg, rc), rp, 32),
        rod((0.3, rb, rc), (-leg, rb, rc), rp, 32),
        rod((rb, -leg + 0.2, rc), (rb, -leg - lc, rc), rc, 40),
        rod((-leg + 0.2, rb, rc), (-leg - lc, rb, rc), rc, 40),
    ]
    return merge(*parts)


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
    return revolve(prof, lobes * 24, modulate=mod, mod_mask=mask)


def _bolt(j: Jitter) -> Mesh:
    rh, hh, rs, ls = j(12.0), j(8.0), j(6.0), j(48.0)
    pitch, depth = 1.5, 0.55
    head = revolve([(0, 0), (rh, 0), (rh, hh), (0, hh)], 72, modulate=hex_profile(np.pi / 6), mod_mask=[0, 1, 1, 0])
    nz = int(ls / pitch)
    zs = hh - 0.2 + np.arange(2 * nz + 1) * (pitch / 2)
    rs_ = np.where(np.arange(2 * nz + 1) % 2 == 0, rs, rs - depth)
    prof = [(0.0, zs[0])] + list(zip(rs_, zs, strict=True)) + [(0.0, zs[-1])]
    shank = revolve(prof, 48)
    m = merge(head, shank)
    return transform(m, rot_to((1.0, 0.0, 0.0)))


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


def make_part(cls: str, rng: np.random.Generator,
              tolerance: Tolerance = DEFAULT_TOLERANCE) -> o3d.geometry.TriangleMesh:
    """A coarse, defect-free part of class ``cls`` (one of :data:`PART_CLASSES`), in mm.

    Every nominal dimension x becomes ``x + U(-t, t)`` drawn from ``rng``, with t its
    :func:`permissible_deviation` under ``tolerance`` (part-to-part variation, uniform over the
    band as a worst case; deterministic for the generator's state). The part rests on z = 0
    and its xy bounding box is centred on the origin. Call ``sensors.mesh.subdivide_uniform`` before
    carving defects or sampling.
    """
    if cls not in _BUILDERS:
        raise ValueError(f"unknown part class {cls!r}; known: {', '.join(PART_CLASSES)}")
    permissible_deviation(1.0, tolerance)  # an unknown class or a bad value fails before any draw

    def jitter(x: float) -> float:
        t = permissible_deviation(x, tolerance)
        return float(x) + float(rng.uniform(-t, t))

    return finish(_BUILDERS[cls](jitter))
