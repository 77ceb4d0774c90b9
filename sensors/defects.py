"""Defect carving on subdivided part meshes, and per-point ground truth for sampled scans.

Why: inspectd's scorers are trained on good parts only; to measure them (and to run a demo
that scores itself) we need defective parts with known anomalous regions. This module follows
the Anomaly-ShapeNet synthesis pipeline (IMRNet, Li et al., CVPR 2024, Sec. 3): a normal mesh
is first subdivided to a uniform density (``sensors.parts.subdivide_uniform``), then a defect
is carved into it (the paper sculpts them in Blender; here they are procedural), and the ground
truth is derived geometrically (the paper uses CloudCompare's cloud-to-mesh distance; here,
:func:`label_points` measures the distance to the original mesh with open3d's
``RaycastingScene``).

The six defect kinds of Anomaly-ShapeNet, :data:`DEFECT_KINDS`:

* ``bulge`` / ``dent`` (the paper's concavity): vertices move along their normals with a
  gaussian profile, amplitude 1-3 mm (a dent is limited to 60 % of the local wall thickness);
* ``hole``: the triangles within a radius of the site are removed (one wall, not a bore);
* ``crack``: a thin, slightly curved strip of triangles is removed and its banks pushed in
  (a V groove up to 1.5 mm deep);
* ``break``: a chunk near the part's outline is cut off by a plane; the vertices beyond the
  plane are projected onto it (a flat fracture face, slightly rough), so the mesh stays closed;
* ``bending``: the vertices beyond a vertical plane are rotated upwards about a horizontal axis
  on z = 0, by an angle growing linearly with their distance from the plane (up to 4-10°); the
  plane leaves 8-18 % of the surface beyond it;
* ``contamination`` (beyond the paper): foreign material stuck on the surface: a sphere half
  sunk into the surface at the site (the part's triangles inside it removed, its own triangles
  below the local tangent plane dropped), so it stands 1.5 radii proud;
* ``missing`` (beyond the paper): a feature that is not there: of the faces whose normal is the
  one nearest the site's direction, the one standing out most (the top of a boss, a pin, a
  tooth, a wall) is cut, with everything within a radius of its outermost vertex, flush to a
  plane some depth below it (parallel to the face), as if the feature had never been made.

Magnitudes: without ``severity`` the sizes are drawn as above (the Anomaly-ShapeNet-like
defaults). With ``severity`` s in [0, 1] (``inspectd synth --preset bench``) the size that
matters for detection follows s on a log scale from subtle to gross (:data:`SEVERITY_RANGES`:
bulge / dent amplitude 0.1-3 mm, i.e. down to 2× a 0.05 mm scanner noise; hole radius 1-8 mm;
crack depth 0.3-1.5 mm; break 1-8 % of the area; bending 1-10°; contamination 1-4 mm
radius; missing 0.3-3 mm cut depth), and ``info["magnitude"]`` records it.

Local defects are placed on a site visible from ``visible_from`` (vertex normal · direction >
0.3 and topmost along the direction, by a vertex z-buffer), so a camera looking the other
way sees them; sizes are drawn so that about 1-10 % of the surface is affected. All the
work is vectorized numpy; randomness comes only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import open3d as o3d

DEFECT_KINDS: tuple[str, ...] = ("bulge", "dent", "hole", "crack", "break", "bending")
ALL_KINDS: tuple[str, ...] = (*DEFECT_KINDS, "contamination", "missing")
"""The paper's six and the two beyond it; the simulated camera draws from the six by default."""

LOCAL_KINDS = frozenset({"bulge", "dent", "hole", "crack", "contamination", "missing"})
"""Kinds placed at a visible surface site (the others act on a side of the part)."""


# ---------------------------------------------------------------------------------------------
# geometry helpers


def _arrays(mesh: o3d.geometry.TriangleMesh) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mesh.vertices, dtype=np.float64).copy(), np.asarray(
        mesh.triangles, dtype=np.int64
    ).copy()


def _mesh(v: np.ndarray, f: np.ndarray) -> o3d.geometry.TriangleMesh:
    out = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32))
    )
    out.compute_vertex_normals()
    return out


def _face_cross(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])


def triangle_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Area of every triangle."""
    return 0.5 * np.linalg.norm(_face_cross(v, f), axis=1)


def vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (n, 3)."""
    fc = _face_cross(v, f)
    idx = f.reshape(-1)
    acc = np.stack([np.bincount(idx, np.repeat(fc[:, k], 3), minlength=len(v)) for k in range(3)], axis=1)
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    return acc / np.maximum(norm, 1e-12)


def _scene(v: np.ndarray, f: np.ndarray) -> o3d.t.geometry.RaycastingScene:
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(v, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(f, dtype=np.uint32)),
    )
    return scene


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x)


def _tangent_frame(n: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Two unit tangents (t, b) at normal n, t rotated by ``angle`` in the tangent plane."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(n, helper))
    e2 = np.cross(n, e1)
    t = math.cos(angle) * e1 + math.sin(angle) * e2
    return t, np.cross(n, t)


def _rotate(p: np.ndarray, axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rodrigues rotation of points p (n, 3) about unit ``axis`` by per-point ``angle`` (n,)."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return p * c + np.cross(axis, p) * s + np.outer(p @ axis, axis) * (1 - c)


def _column_extremes(
    v: np.ndarray, direction: np.ndarray, cell: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Height ``v · direction`` of the highest and lowest vertex in each vertex's column.

    Columns are ``cell`` mm squares in the plane normal to ``direction`` (a vertex z-buffer:
    cheap, no BVH; subdivided meshes have several vertices per column).
    """
    e1, e2 = _tangent_frame(direction, 0.0)
    h = v @ direction
    ij = np.floor(np.stack([v @ e1, v @ e2], axis=1) / cell).astype(np.int64)
    ij -= ij.min(axis=0)
    key = ij[:, 0] * (int(ij[:, 1].max()) + 1) + ij[:, 1]
    _, col = np.unique(key, return_inverse=True)
    col = col.reshape(-1)
    order = np.lexsort((h, col))
    first = np.flatnonzero(np.r_[True, col[order][1:] != col[order][:-1]])
    last = np.r_[first[1:] - 1, len(order) - 1]
    return h[order][last][col], h[order][first][col]


def _pick_site(
    v: np.ndarray, n: np.ndarray, rng: np.random.Generator, direction: np.ndarray
) -> tuple[int, float]:
    """A random vertex facing ``direction`` (n·dir > 0.3) and topmost in its column as seen
    along it (so nothing hides it), and the material thickness below it along ``direction``."""
    top, bottom = _column_extremes(v, direction)
    h = v @ direction
    facing = n @ direction > 0.3
    cand = np.flatnonzero(facing & (h >= top - 0.5))
    if len(cand) == 0:
        cand = np.flatnonzero(facing)
    if len(cand) == 0:
        raise ValueError("no surface faces the given direction")
    site = int(rng.choice(cand))
    return site, float(h[site] - bottom[site])


def _offset_for_area(height: np.ndarray, area: np.ndarray, frac: float) -> float:
    """The height (per triangle) above which lie triangles holding ``frac`` of the area."""
    order = np.argsort(-height)
    cum = np.cumsum(area[order])
    return float(height[order[min(int(np.searchsorted(cum, frac * cum[-1])), len(order) - 1)]])


SEVERITY_RANGES: dict[str, tuple[str, str, float, float]] = {
    "bulge": ("amplitude", "mm", 0.1, 3.0),
    "dent": ("depth", "mm", 0.1, 3.0),
    "hole": ("radius", "mm", 1.0, 8.0),
    "crack": ("depth", "mm", 0.3, 1.5),
    "break": ("area_fraction", "1", 0.01, 0.08),
    "bending": ("angle", "deg", 1.0, 10.0),
    "contamination": ("radius", "mm", 1.0, 4.0),
    "missing": ("depth", "mm", 0.3, 3.0),
}
"""Per kind: the quantity a severity sets, its unit, and its value at severity 0 and 1 (log scale)."""


def severity_value(kind: str, severity: float) -> float:
    """The magnitude of ``kind`` at ``severity`` in [0, 1] (geometric interpolation, see above)."""
    _, _, lo, hi = SEVERITY_RANGES[kind]
    s = float(np.clip(severity, 0.0, 1.0))
    return float(lo * (hi / lo) ** s)


# ---------------------------------------------------------------------------------------------
# carving


def carve_defect(
    mesh: o3d.geometry.TriangleMesh,
    kind: str,
    rng: np.random.Generator,
    visible_from=(0.0, 0.0, 1.0),
    severity: float | None = None,
) -> tuple[o3d.geometry.TriangleMesh, dict[str, Any]]:
    """Carve one defect of ``kind`` (one of :data:`ALL_KINDS`) into a copy of ``mesh``.

    ``severity`` (optional, in [0, 1]): set the defect's magnitude from subtle to gross (see the
    module doc); ``info["magnitude"]`` then records ``{"quantity", "value", "unit", "severity"}``.

    ``mesh`` should be subdivided (edges of ~1 mm) so the defect has vertices to move.
    Returns ``(defective_mesh, info)``. ``info`` holds ``kind``, ``centre`` (mm, list),
    ``radius`` (mm, the defect's extent), ``affected_fraction`` (of the surface area: triangles
    moved by > 0.25 mm or removed) and kind-specific parameters, all JSON-friendly, plus, for
    ``hole``, ``crack`` and ``break``, ``removed_triangles``: an (K, 3, 3) float array with the
    original coordinates of the triangles that were removed (or collapsed onto the fracture
    plane), used by :func:`label_points` to mark the rim of missing material.
    """
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(ALL_KINDS)}")
    v0, f = _arrays(mesh)
    v = v0.copy()
    n = vertex_normals(v, f)
    area = triangle_areas(v, f)
    extra: tuple[np.ndarray, np.ndarray] | None = None
    total_area = float(area.sum())
    direction = _unit(visible_from)
    keep = np.ones(len(f), dtype=bool)
    info: dict[str, Any] = {"kind": kind}

    if kind in LOCAL_KINDS:
        site, thick = _pick_site(v, n, rng, direction)
        p, nc = v[site], n[site]
        rel = v - p
        dist = np.linalg.norm(rel, axis=1)
        facing = np.clip(n @ nc, 0.0, 1.0)  # 0 on walls at right angles and on the far side
        info.update(centre=p.tolist(), normal=nc.tolist(), wall_thickness=round(thick, 3))

        if kind in ("bulge", "dent"):
            frac = rng.uniform(0.02, 0.06)
            radius = float(np.clip(math.sqrt(frac * total_area / math.pi), 3.0, 12.0))
            amp = rng.uniform(1.0, 3.0) if severity is None else severity_value(kind, severity)
            if kind == "dent":
                amp = -min(amp, 0.6 * thick)
            sigma = radius / 2.0
            disp = amp * np.exp(-0.5 * (dist / sigma) ** 2) * facing
            v += n * disp[:, None]
            info.update(radius=radius, amplitude=float(amp))
        elif kind == "hole":
            frac = rng.uniform(0.01, 0.03)
            radius = float(np.clip(math.sqrt(frac * total_area / math.pi), 2.5, 8.0))
            if severity is not None:
                radius = severity_value(kind, severity)
            c = v[f].mean(axis=1) - p
            fn = _face_cross(v, f)
            fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
            keep = ~(
                (np.linalg.norm(c, axis=1) < radius)
                & (fn @ nc > 0.2)
                & (np.abs(c @ nc) < max(1.0, 0.5 * radius))
            )
            info.update(radius=radius)
        elif kind == "contamination":
            radius = rng.uniform(0.8, 3.0) if severity is None else severity_value(kind, severity)
            centre = p + nc * (0.5 * radius)
            keep = np.linalg.norm(v[f].mean(axis=1) - centre, axis=1) > radius
            blob = o3d.geometry.TriangleMesh.create_sphere(radius, resolution=max(8, int(4 * radius)))
            bv, bf = _arrays(blob)
            bv += centre
            bf = bf[(bv[bf].mean(axis=1) - p) @ nc > 0.0]  # below the tangent plane: inside the part
            extra = (bv, bf)
            info.update(radius=float(radius), height=float(1.5 * radius))
        elif kind == "missing":
            fn = _face_cross(v, f)
            fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
            axis = fn[int(np.argmax(fn @ direction))]  # the face normal nearest the direction
            on_face = np.zeros(len(v), dtype=bool)
            on_face[f[fn @ axis > 0.95].reshape(-1)] = True
            top = int(np.argmax(np.where(on_face, v @ axis + 1e-3 * rng.random(len(v)), -np.inf)))
            depth = rng.uniform(1.0, 3.0) if severity is None else severity_value(kind, severity)
            reach = rng.uniform(3.0, 6.0)
            p = v[top]
            near = on_face & (np.linalg.norm(v - p, axis=1) < reach)
            nc = axis
            h = (v - p) @ nc
            level = float(h[near].max()) - depth
            lateral = np.linalg.norm((v - p) - np.outer(h, nc), axis=1)
            cut = (lateral < reach) & (h > level)
            v[cut] -= np.outer(h[cut] - level, nc)
            info.update(centre=p.tolist(), normal=nc.tolist(), radius=float(reach), depth=float(depth))
        else:  # crack
            length = float(np.clip(rng.uniform(1.5, 2.5) * math.sqrt(0.03 * total_area / math.pi), 8.0, 25.0))
            width = rng.uniform(0.8, 1.5)
            depth = min(rng.uniform(0.8, 1.5) if severity is None else severity_value(kind, severity), 0.6 * thick)
            if severity is not None:  # a subtle crack is also shorter and narrower
                length *= 0.4 + 0.6 * float(severity)
                width *= 0.5 + 0.5 * float(severity)
            bend = rng.uniform(-0.03, 0.03)
            t, b = _tangent_frame(nc, rng.uniform(0, np.pi))

            def coords(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                along = x @ t
                return along, x @ b - bend * along**2, x @ nc

            along, across, normal_off = coords(rel)
            taper = np.clip((length / 2 - np.abs(along)) / (0.2 * length), 0.0, 1.0)
            local = (np.abs(normal_off) < 3.0) * facing
            groove = depth * np.clip(1.0 - np.abs(across) / (1.5 * width), 0.0, 1.0) * taper * local
            v -= nc * groove[:, None]
            ca, cx, cn = coords(v0[f].mean(axis=1) - p)
            keep = ~((np.abs(cx) < width / 2) & (np.abs(ca) < 0.45 * length) & (np.abs(cn) < 3.0))
            keep |= (n[f] @ nc).min(axis=1) < 0.2
            info.update(
                radius=length / 2, length=length, width=float(width), depth=float(depth), direction=t.tolist()
            )

    elif kind == "break":
        frac = rng.uniform(0.03, 0.08) if severity is None else severity_value(kind, severity)
        az, tilt = rng.uniform(0, 2 * np.pi), math.radians(rng.uniform(15.0, 50.0))
        m = np.array([math.cos(az) * math.cos(tilt), math.sin(az) * math.cos(tilt), math.sin(tilt)])
        s0 = _offset_for_area(v[f].mean(axis=1) @ m, area, frac)
        s = v @ m
        beyond = s > s0
        k = rng.normal(size=(2, 3)) * (2 * np.pi / 6.0)
        ph = rng.uniform(0, 2 * np.pi, 2)
        rough = rng.uniform(0.2, 0.5) * (
            0.5 + 0.25 * np.sin(v @ k[0] + ph[0]) + 0.25 * np.sin(v @ k[1] + ph[1])
        )
        v[beyond] -= ((s[beyond] - s0) + rough[beyond])[:, None] * m
        removed = beyond[f].any(axis=1)
        info["removed_triangles"] = v0[f[removed]]
        cut = v0[beyond]
        centre = cut.mean(axis=0) if len(cut) else v0.mean(axis=0)
        radius = float(np.linalg.norm(cut - centre, axis=1).max()) if len(cut) else 0.0
        info.update(centre=centre.tolist(), radius=radius, plane_normal=m.tolist(), plane_offset=s0)

    else:  # bending
        az = rng.uniform(0, 2 * np.pi)
        u = np.array([math.cos(az), math.sin(az), 0.0])
        s = v @ u
        s_max = float(s.max())
        s0 = _offset_for_area(v[f].mean(axis=1) @ u, area, rng.uniform(0.08, 0.18))
        angle = math.radians(rng.uniform(4.0, 10.0) if severity is None else severity_value(kind, severity))
        pivot = s0 * u + np.array([0.0, 0.0, float(v[:, 2].min())])
        axis = _unit(np.cross(u, [0.0, 0.0, 1.0]))
        beyond = s > s0
        phi = angle * (s[beyond] - s0) / (s_max - s0)
        v[beyond] = _rotate(v[beyond] - pivot, axis, phi) + pivot
        cut = v0[beyond]
        centre = cut.mean(axis=0)
        info.update(
            centre=centre.tolist(),
            radius=float(np.linalg.norm(cut - centre, axis=1).max()),
            angle_deg=math.degrees(angle),
            direction=u.tolist(),
            plane_offset=s0,
        )

    if kind in ("hole", "crack"):
        info["removed_triangles"] = v0[f[~keep]]
    moved = np.linalg.norm(v - v0, axis=1) > 0.25
    affected = moved[f].any(axis=1) | ~keep
    if kind == "break":
        affected |= beyond[f].any(axis=1)
    info["affected_fraction"] = float(area[affected].sum() / total_area)
    if severity is not None:
        quantity, unit, _, _ = SEVERITY_RANGES[kind]
        info["magnitude"] = {"quantity": quantity, "unit": unit, "severity": round(float(severity), 4),
                             "value": round(severity_value(kind, severity), 4)}
    if extra is not None:
        return _mesh(np.concatenate([v, extra[0]]), np.concatenate([f[keep], extra[1] + len(v)])), info
    return _mesh(v, f[keep]), info


# ---------------------------------------------------------------------------------------------
# ground truth and unorganized scans


def label_points(
    points: np.ndarray,
    original: o3d.geometry.TriangleMesh,
    info: dict[str, Any] | None = None,
    tol: float = 0.25,
    rim: float = 1.0,
) -> np.ndarray:
    """Per-point ground truth (uint8, 1 = anomalous) for points sampled on a defective part.

    A point is anomalous when its distance to the ORIGINAL (defect-free) mesh surface exceeds
    ``tol`` mm (material added, pushed in, bent or cut away), or, when ``info`` (from
    :func:`carve_defect`) has ``removed_triangles`` (hole, crack, break), when it lies within
    ``rim`` mm of the removed material, which marks the edges of a hole that has no points.
    Pass noise-free points; ``tol`` should exceed the mesh's own approximation error.
    """
    pts = np.ascontiguousarray(points, dtype=np.float32)
    if len(pts) == 0:
        return np.zeros(0, dtype=np.uint8)
    v, f = _arrays(original)
    label = _scene(v, f).compute_distance(o3d.core.Tensor(pts)).numpy() > tol
    removed = None if info is None else info.get("removed_triangles")
    if removed is not None and len(removed):
        rv = np.asarray(removed, dtype=np.float64).reshape(-1, 3)
        rf = np.arange(len(rv)).reshape(-1, 3)
        label |= _scene(rv, rf).compute_distance(o3d.core.Tensor(pts)).numpy() < rim
    return label.astype(np.uint8)


def sample_surface(mesh: o3d.geometry.TriangleMesh, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """``n_points`` points uniformly distributed over the mesh surface (area-weighted), float64."""
    v, f = _arrays(mesh)
    area = triangle_areas(v, f)
    tri = rng.choice(len(f), size=n_points, p=area / area.sum())
    r1, r2 = rng.random(n_points), rng.random(n_points)
    flip = r1 + r2 > 1.0
    r1[flip], r2[flip] = 1.0 - r1[flip], 1.0 - r2[flip]
    a, b, c = v[f[tri, 0]], v[f[tri, 1]], v[f[tri, 2]]
    return a + r1[:, None] * (b - a) + r2[:, None] * (c - a)


def sample_cloud(
    defective: o3d.geometry.TriangleMesh,
    original: o3d.geometry.TriangleMesh,
    n_points: int,
    rng: np.random.Generator,
    noise_sigma: float = 0.0,
    info: dict[str, Any] | None = None,
    tol: float = 0.25,
    rim: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An unorganized scan (PMAX-style, as in Real3D-AD / Anomaly-ShapeNet) and its labels.

    Samples ``n_points`` uniformly over the surface of ``defective``, labels the noise-free
    points with :func:`label_points` against ``original`` (pass the carve ``info`` to also mark
    the rims of holes, cracks and breaks), then adds isotropic gaussian scanner noise of
    ``noise_sigma`` mm. For a good part (``defective is original``) all labels are 0.
    Returns ``(points float32 (N, 3), labels uint8 (N,))``.
    """
    pts = sample_surface(defective, n_points, rng)
    if defective is original:
        labels = np.zeros(n_points, dtype=np.uint8)
    else:
        labels = label_points(pts, original, info, tol=tol, rim=rim)
    if noise_sigma > 0:
        pts = pts + rng.normal(scale=noise_sigma, size=pts.shape)
    return pts.astype(np.float32), labels
