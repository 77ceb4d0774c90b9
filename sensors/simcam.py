"""Simulated Zivid-style structured-light camera looking down at a part on a table.

Why: inspectd's organized-frame path (plane removal, scoring, anomaly maps) needs frames with
the artefacts of a real structured-light camera, and with pixel ground truth so a demo can
score itself. A part comes from ``sensors.parts`` (procedural, with part-to-part variation),
is subdivided to a uniform density and optionally gets one carved defect
(``sensors.defects``), following the Anomaly-ShapeNet pipeline (IMRNet, Li et al., CVPR 2024,
Sec. 3: mesh subdivision -> defect carving -> ground truth), and is then ray-cast.

Camera model (:class:`CameraParams`): an ideal pinhole ``distance`` mm above the table, looking
straight down (-z), image rows running along -y and columns along +x, with a square field of
view of ``fov_mm`` at the table plane. The part lies on a ``plane_size`` square table (z = 0)
that is part of the scene. Artefacts: depth noise along the viewing ray with sigma growing with
depth² (``sigma_ref`` at ``ref_depth``), a random ``dropout`` fraction of pixels, pixels seen at
grazing incidence (> ``max_incidence_deg``) invalid, and projector shadows: a pixel is invalid
when the projector (offset ``projector_baseline`` mm along +x from the camera) cannot see its
point. Invalid pixels are NaN in all three coordinates.

Frame convention: ``points`` are WORLD coordinates in mm (z up, table at z = 0, camera above
the origin), not camera coordinates; the daemon's plane removal works the same either way.

Ground truth: with ``reference`` (the defect-free mesh in the same pose), a pixel is anomalous
when its noise-free depth differs from the reference render by more than ``gt_tol`` mm, which
works alike for all six defect kinds (material added, removed or moved). The mask is geometric:
it may mark pixels that are invalid in the frame (e.g. the grazing walls of a hole).

Pose: the part is rotated about z by at most ±10° and shifted by at most ±5 mm in x and y, like
a fixture-guided part on a conveyor, so a memory-bank scorer sees similar poses across frames.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import open3d as o3d

from sensors.defects import DEFECT_KINDS, carve_defect
from sensors.frame import Frame, FrameMeta
from sensors.mesh import subdivide_uniform
from sensors.parts import make_part
from sensors.tolerance import DEFAULT_TOLERANCE, Tolerance

MIN_VISIBLE_GT_PIXELS = 20
"""A defective frame has at least this many valid ground-truth pixels (see simulate_frame)."""


@dataclass(frozen=True)
class CameraParams:
    """Structured-light camera above a table; lengths in mm. See the module docstring."""

    width: int = 400
    height: int = 400
    distance: float = 300.0
    """Camera (and projector) height above the table plane z = 0."""
    fov_mm: float = 120.0
    """Width (and height) of the field of view at the table plane."""
    sigma_ref: float = 0.05
    """Depth noise sigma at ``ref_depth``; it scales with (depth / ref_depth)²."""
    ref_depth: float = 300.0
    dropout: float = 0.003
    """Fraction of pixels randomly invalid."""
    max_incidence_deg: float = 80.0
    """Pixels whose surface is seen at a larger angle from its normal are invalid."""
    projector_baseline: float = 50.0
    """Projector offset along +x from the camera; 0 disables projector shadows."""
    plane_size: float = 400.0

    @property
    def focal_px(self) -> float:
        return self.width / 2.0 * self.distance / (self.fov_mm / 2.0)

    @property
    def origin(self) -> np.ndarray:
        return np.array([0.0, 0.0, self.distance])

    def ray_directions(self) -> np.ndarray:
        """Unit viewing rays (H, W, 3) in world coordinates; row 0 is at +y, column 0 at -x."""
        u = (np.arange(self.width) + 0.5 - self.width / 2.0) / self.focal_px
        w = (np.arange(self.height) + 0.5 - self.height / 2.0) / self.focal_px
        d = np.empty((self.height, self.width, 3))
        d[..., 0] = u[None, :]
        d[..., 1] = -w[:, None]
        d[..., 2] = -1.0
        return d / np.linalg.norm(d, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=8)
def _rays(camera: CameraParams) -> tuple[np.ndarray, o3d.core.Tensor]:
    """Cached unit ray directions (H, W, 3, read-only) and the float32 ray tensor to cast."""
    dirs = camera.ray_directions()
    dirs.setflags(write=False)
    rays = np.concatenate([np.broadcast_to(camera.origin, dirs.shape), dirs], axis=-1).astype(np.float32)
    return dirs, o3d.core.Tensor(rays)


def _scene(mesh: o3d.geometry.TriangleMesh, camera: CameraParams) -> o3d.t.geometry.RaycastingScene:
    h = camera.plane_size / 2.0
    plane_v = np.array([[-h, -h, 0.0], [h, -h, 0.0], [h, h, 0.0], [-h, h, 0.0]])
    plane_f = np.array([[0, 1, 2], [0, 2, 3]])
    v = np.concatenate([np.asarray(mesh.vertices), plane_v])
    f = np.concatenate([np.asarray(mesh.triangles), plane_f + len(mesh.vertices)])
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(v, dtype=np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(f, dtype=np.uint32)),
    )
    return scene


def _cast(
    mesh: o3d.geometry.TriangleMesh, camera: CameraParams
) -> tuple[o3d.t.geometry.RaycastingScene, dict]:
    """Noise-free cast: scene, ``t`` (H, W) ray length (inf = miss), ``normal`` (H, W, 3), ``dirs``."""
    scene = _scene(mesh, camera)
    dirs, rays = _rays(camera)
    hit = scene.cast_rays(rays)
    t = hit["t_hit"].numpy().astype(np.float64)
    normal = hit["primitive_normals"].numpy().astype(np.float64)
    return scene, {"t": t, "normal": normal, "dirs": dirs}


def _gt(cast: dict, ref_cast: dict, gt_tol: float) -> np.ndarray:
    """Pixels whose noise-free depth (z distance from the camera) differs by more than gt_tol."""
    dz = -cast["dirs"][..., 2]
    a, b = cast["t"] * dz, ref_cast["t"] * dz
    both_miss = ~np.isfinite(a) & ~np.isfinite(b)
    diff = np.where(both_miss, 0.0, np.abs(np.nan_to_num(a, posinf=1e9) - np.nan_to_num(b, posinf=1e9)))
    return (diff > gt_tol).astype(np.uint8)


def _measure(
    scene: o3d.t.geometry.RaycastingScene, cast: dict, camera: CameraParams, rng: np.random.Generator
) -> np.ndarray:
    """Noisy XYZ (H, W, 3) float32 with NaN where the camera would report no measurement."""
    t, normal, dirs = cast["t"], cast["normal"], cast["dirs"]
    valid = np.isfinite(t)
    cos_inc = np.abs(np.einsum("hwk,hwk->hw", normal, dirs))
    valid &= cos_inc > math.cos(math.radians(camera.max_incidence_deg))
    t = np.where(valid, t, 0.0)
    pts = camera.origin + t[..., None] * dirs
    if camera.projector_baseline > 0:
        proj = camera.origin + np.array([camera.projector_baseline, 0.0, 0.0])
        sel = np.flatnonzero(valid.reshape(-1))
        p = pts.reshape(-1, 3)[sel]
        to_proj = proj - p
        dist = np.linalg.norm(to_proj, axis=1, keepdims=True)
        rays = np.concatenate([p + to_proj / dist * 0.05, to_proj / dist], axis=1).astype(np.float32)
        shadow = scene.test_occlusions(o3d.core.Tensor(rays), tnear=0.0, tfar=float(dist.max())).numpy()
        flat = valid.reshape(-1)
        flat[sel[shadow]] = False
        valid = flat.reshape(valid.shape)
    depth = t * -dirs[..., 2]
    sigma = camera.sigma_ref * (depth / camera.ref_depth) ** 2
    t_noisy = t + rng.standard_normal(t.shape) * sigma
    valid &= rng.random(t.shape) >= camera.dropout
    out = (camera.origin + t_noisy[..., None] * dirs).astype(np.float32)
    out[~valid] = np.nan
    return out


def render(
    mesh: o3d.geometry.TriangleMesh,
    camera: CameraParams,
    rng: np.random.Generator,
    reference: o3d.geometry.TriangleMesh | None = None,
    gt_tol: float = 0.3,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Ray-cast ``mesh`` lying on the table into an organized frame.

    Returns ``(points, gt)``: ``points`` (H, W, 3) float32 world XYZ in mm, NaN where invalid;
    ``gt`` (H, W) uint8 (1 where the noise-free depth differs from the render of ``reference``
    by more than ``gt_tol`` mm), or None when no reference is given.
    """
    scene, cast = _cast(mesh, camera)
    points = _measure(scene, cast, camera, rng)
    gt = None if reference is None else _gt(cast, _cast(reference, camera)[1], gt_tol)
    return points, gt


def _pose(rng: np.random.Generator) -> np.ndarray:
    """4x4 pose: rotation about z by U(-10°, 10°), shift by U(-5, 5) mm in x and y."""
    a = math.radians(rng.uniform(-10.0, 10.0))
    pose = np.eye(4)
    pose[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    pose[:2, 3] = rng.uniform(-5.0, 5.0, 2)
    return pose


def simulate_frame(
    product: str,
    defective: bool,
    rng: np.random.Generator,
    camera: CameraParams | None = None,
    seq: int = 0,
    sensor_id: str = "simcam-0",
    part_id: str | None = None,
    defect_kinds: tuple[str, ...] = DEFECT_KINDS,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    max_edge: float = 1.0,
    gt_tol: float = 0.3,
    max_retries: int = 8,
) -> Frame:
    """One organized frame of a part of class ``product`` (a ``sensors.parts`` class).

    Builds the part (within ``tolerance``: ``sensors.parts.make_part``), subdivides it to
    ``max_edge`` mm, poses it (see the module docstring), carves one defect of a kind drawn from
    ``defect_kinds`` when ``defective``, and renders it. A defect must show in at least
    :data:`MIN_VISIBLE_GT_PIXELS` valid ground-truth pixels; otherwise a new defect (kind and
    site) is drawn, up to ``max_retries`` times, then RuntimeError. ``meta.truth`` is
    ``{"defective": bool, "defect": kind or None}``, ``gt_mask`` the pixel ground truth (all
    zeros for a good part). Deterministic for the generator's state.
    """
    camera = camera or CameraParams()
    base = subdivide_uniform(make_part(product, rng, tolerance), max_edge)
    base.transform(_pose(rng))
    kind = None
    if not defective:
        scene, cast = _cast(base, camera)
        points = _measure(scene, cast, camera, rng)
        gt = np.zeros(points.shape[:2], dtype=np.uint8)
    else:
        ref_cast = _cast(base, camera)[1]
        for _ in range(max_retries):
            kind = str(rng.choice(list(defect_kinds)))
            mesh, _info = carve_defect(base, kind, rng, visible_from=(0.0, 0.0, 1.0))
            scene, cast = _cast(mesh, camera)
            gt = _gt(cast, ref_cast, gt_tol)
            points = _measure(scene, cast, camera, rng)
            if int((gt.astype(bool) & np.isfinite(points).all(axis=-1)).sum()) >= MIN_VISIBLE_GT_PIXELS:
                break
        else:
            raise RuntimeError(f"no visible defect on {product} after {max_retries} tries")
    meta = FrameMeta(
        sensor_id=sensor_id,
        product=product,
        part_id=part_id or f"{product}-{seq:06d}",
        seq=seq,
        capture_time=time.time(),
        units="mm",
        truth={"defective": bool(defective), "defect": kind},
    )
    return Frame(points=points, meta=meta, gt_mask=gt)
