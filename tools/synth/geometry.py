"""Geometry of ``inspectd synth``: part poses, where a defect goes, bending, ground-truth tolerance.

Why separate: ``tools.synth.writer`` plans and writes datasets; this module holds what it does to one
mesh (pose it, carve it, shade its render), so each file keeps one job. See ``tools.synth.writer``
for the pipeline these steps belong to.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["CARVE_KIND", "LABEL_TOL_MM", "POSE_MAX_DEG", "POSE_MAX_SHIFT_MM", "camera_defect_direction", "carve",
           "carve_bending", "defect_direction", "fixture_jitter", "label_tol", "pose_so3", "pose_z10",
           "random_rotation", "shade"]

CARVE_KIND = {"bulge": "bulge", "concavity": "dent", "hole": "hole", "crack": "crack", "break": "break",
              "contamination": "contamination", "missing": "missing"}
"""Paper name → ``sensors.defects`` kind (bending is carved by :func:`carve_bending`)."""
POSE_MAX_DEG = 10.0
POSE_MAX_SHIFT_MM = 5.0
LABEL_TOL_MM = 0.25


def pose_z10(rng: np.random.Generator) -> np.ndarray:
    """4×4: rotation about z by U(−10°, 10°), shift U(−5, 5) mm in x and y."""
    a = math.radians(rng.uniform(-POSE_MAX_DEG, POSE_MAX_DEG))
    pose = np.eye(4)
    pose[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    pose[:2, 3] = rng.uniform(-POSE_MAX_SHIFT_MM, POSE_MAX_SHIFT_MM, 2)
    return pose


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation (3×3), from a normalized gaussian quaternion."""
    q = rng.normal(size=4)
    w, x, y, z = q / max(float(np.linalg.norm(q)), 1e-12)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def pose_so3(rng: np.random.Generator) -> np.ndarray:
    """4×4: a uniformly random rotation about the part's centre, then a shift U(-5, 5) mm in x, y, z."""
    pose = np.eye(4)
    pose[:3, :3] = random_rotation(rng)
    pose[:3, 3] = rng.uniform(-POSE_MAX_SHIFT_MM, POSE_MAX_SHIFT_MM, 3)
    return pose


def fixture_jitter(mesh: Any, rng: np.random.Generator) -> None:
    """The z10 pose plus a tilt of up to 2° about a random horizontal axis; the part rests on z = 0."""
    mesh.transform(pose_z10(rng))
    az, tilt = rng.uniform(0.0, 2.0 * math.pi), math.radians(rng.uniform(0.0, 2.0))
    axis = np.array([math.cos(az), math.sin(az), 0.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt_m = np.eye(4)
    tilt_m[:3, :3] = np.eye(3) + math.sin(tilt) * k + (1 - math.cos(tilt)) * (k @ k)
    mesh.transform(tilt_m)
    mesh.translate((0.0, 0.0, -float(np.asarray(mesh.vertices)[:, 2].min())))


def carve_bending(mesh: Any, rng: np.random.Generator, fraction: tuple[float, float] = (0.03, 0.07),
                  tip_mm: tuple[float, float] = (1.5, 3.0), severity: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Bend the end of a part upwards: the paper's "bending", localized to 1–10 % of the surface.

    A vertical plane (normal ``u``, a random horizontal direction) is placed so that the part of
    the surface beyond it holds a fraction U(``fraction``) of the total area (by triangle area,
    as ``sensors.defects``' break). The vertices beyond it are rotated about the horizontal axis
    ``u × z`` through the plane's foot on the part's lowest z, by an angle growing linearly with
    their distance from the plane, so the tip rises by U(``tip_mm``) mm (angle clipped to
    3–25°). With ``severity`` in [0, 1] the angle is set instead, 1-10° on a log scale
    (``sensors.defects.SEVERITY_RANGES``), and ``info["magnitude"]`` records it. ``info["tip_mm"]``
    is how far the tip moved. Returns ``(mesh, info)`` like ``carve_defect``.
    """
    import open3d as o3d

    from sensors.defects import triangle_areas

    v0 = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.triangles, dtype=np.int64)
    area = triangle_areas(v0, f)
    az = rng.uniform(0.0, 2.0 * math.pi)
    u = np.array([math.cos(az), math.sin(az), 0.0])
    frac = rng.uniform(*fraction)
    sc = v0[f].mean(axis=1) @ u
    order = np.argsort(-sc)
    cum = np.cumsum(area[order])
    s0 = float(sc[order[min(int(np.searchsorted(cum, frac * cum[-1])), len(order) - 1)]])
    s = v0 @ u
    lever = max(float(s.max()) - s0, 1e-6)
    tip = rng.uniform(*tip_mm)
    angle = float(np.clip(math.asin(min(1.0, tip / lever)), math.radians(3.0), math.radians(25.0)))
    if severity is not None:
        from sensors.defects import severity_value

        angle = math.radians(severity_value("bending", severity))
    beyond = s > s0
    axis = np.cross(u, [0.0, 0.0, 1.0])
    axis /= np.linalg.norm(axis)
    pivot = s0 * u + np.array([0.0, 0.0, float(v0[:, 2].min())])
    p = v0[beyond] - pivot
    phi = angle * (s[beyond] - s0) / lever
    c, sn = np.cos(phi)[:, None], np.sin(phi)[:, None]
    rotated = p * c + np.cross(axis, p) * sn + np.outer(p @ axis, axis) * (1.0 - c)
    v = v0.copy()
    v[beyond] = rotated + pivot
    out = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32)))
    out.compute_vertex_normals()
    cut = v0[beyond]
    centre = cut.mean(axis=0) if len(cut) else v0.mean(axis=0)
    moved = np.linalg.norm(v - v0, axis=1) > LABEL_TOL_MM
    info = {
        "kind": "bending",
        "centre": centre.tolist(),
        "radius": float(np.linalg.norm(cut - centre, axis=1).max()) if len(cut) else 0.0,
        "angle_deg": math.degrees(angle),
        "direction": u.tolist(),
        "plane_offset": s0,
        "affected_fraction": float(area[moved[f].any(axis=1)].sum() / area.sum()),
        "tip_mm": float(lever * math.sin(angle)),
    }
    if severity is not None:
        info["magnitude"] = {"quantity": "angle", "unit": "deg", "severity": round(float(severity), 4),
                             "value": round(math.degrees(angle), 4)}
    return out, info


def carve(base: Any, kind: str, rng: np.random.Generator, visible_from: np.ndarray,
           severity: float | None = None) -> tuple[Any, dict[str, Any]]:
    from sensors.defects import carve_defect

    if kind == "bending":
        return carve_bending(base, rng, severity=severity)
    return carve_defect(base, CARVE_KIND[kind], rng, visible_from=tuple(visible_from), severity=severity)


def label_tol(info: dict[str, Any], default: float) -> float:
    """Ground-truth tolerance: ``default``, or half the defect's displacement when that is smaller
    (a 0.1 mm bulge is anomalous where it rises by more than 0.05 mm), for graded magnitudes."""
    mag = info.get("magnitude")
    if not mag:
        return default
    if info.get("kind") == "bending":
        return min(default, 0.5 * float(info["tip_mm"]))
    if mag["unit"] == "mm" and info.get("kind") in ("bulge", "dent", "missing", "crack"):
        return min(default, 0.5 * float(mag["value"]))
    return default


def defect_direction(rng: np.random.Generator) -> np.ndarray:
    """A random unit direction with z ≥ −0.3 (the part rests on its bottom face)."""
    while True:
        d = rng.normal(size=3)
        n = float(np.linalg.norm(d))
        if n > 1e-9 and d[2] / n >= -0.3:
            return d / n


def camera_defect_direction(rng: np.random.Generator, attempt: int) -> np.ndarray:
    """Where a camera part's defect faces: straight up on odd attempts (1, 3, ...), otherwise a
    face inclined 20-70° from the horizontal. A defect carved on the top face of a small part can
    cover more than 10 % of what the camera sees of it (``sensors.defects`` sizes defects by the
    whole surface); on an inclined face the camera sees less of it."""
    if attempt % 2 == 1:
        return np.array([0.0, 0.0, 1.0])
    az = rng.uniform(0.0, 2.0 * math.pi)
    el = math.radians(rng.uniform(20.0, 70.0))
    return np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])


def shade(points: np.ndarray) -> np.ndarray:
    """A grey Lambertian rendering (H×W×3 uint8) of an organized XYZ image; invalid pixels black.

    Normals from the cross product of the grid's finite differences; light from above-left.
    """
    p = np.asarray(points, dtype=np.float64)
    du = np.gradient(p, axis=1)
    dv = np.gradient(p, axis=0)
    n = np.cross(du, dv)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    light = np.array([-0.3, 0.3, 1.0]) / math.sqrt(1.18)
    g = 30.0 + 200.0 * np.abs(np.nan_to_num(n @ light))
    g[~np.isfinite(p).all(axis=-1)] = 0.0
    return np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
