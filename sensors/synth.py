"""Synthetic 3D anomaly-detection benchmarks in the three public layouts (``inspectd synth``).

Why: a scorer must be measured on data with exact ground truth before it meets a line, and the
public datasets cannot ship with inspectd. This module runs the Anomaly-ShapeNet synthesis
pipeline (IMRNet, Li et al., CVPR 2024, Sec. 3: normal sample → mesh subdivision → defect
carving → ground truth) over the procedural part library of ``sensors.parts`` and writes the
result exactly as the published datasets are laid out, so ``sensors.datasets`` (and any
third-party loader) reads it like the real thing:

* ``mvtec3d`` (MVTec 3D-AD): organized frames rendered by the simulated structured-light camera
  (``sensors.simcam``: 400×400 px, 0.3 mm/px at the table, depth noise σ 0.05 mm at 300 mm,
  dropout, grazing-angle and projector-shadow holes), part on a table::

      <class>/train/good/{xyz/NNN.tiff, rgb/NNN.png}
      <class>/validation/good/{xyz, rgb}
      <class>/test/<good|bulge|concavity|hole|crack|break|bending>/{xyz, rgb, gt}/NNN.{tiff,png}

  XYZ TIFFs are float32 H×W×3 (invalid pixels 0, as MVTec), world coordinates in **metres**
  as in MVTec 3D-AD (z up, table at z = 0; ``dataset.json`` says ``"units": "m"``); ``rgb`` is a shaded grey rendering of the XYZ (Lambertian, from the normals
  of the organized grid); ``gt`` PNGs are 255 where anomalous (all black for good test parts,
  as published; train/validation have no gt).

* ``real3d`` (Real3D-AD)::

      <class>/train/<k>_template.pcd       k = 1..n_train: dense, almost noise-free templates
      <class>/test/<k>_<defect|good>.pcd    k = 1..n_test, kinds interleaved (seeded)
      <class>/gt/<k>_<defect>.txt           "x,y,z,label" per point (defective parts only)

* ``anomaly-shapenet`` (Anomaly-ShapeNet)::

      <class>/train/<class>_template<k>.pcd
      <class>/test/<defect><k>.pcd, positive<k>.pcd
      <class>/GT/<defect><k>.txt            "x y z label" per point (defective parts only)

  As in the published sets, a good test part has no label file (the loaders give it an
  all-zero mask) and the label file holds the same points, in the same order, as the PCD.

Pipeline for one part (vectorized numpy / open3d; no loop over points):

1. ``sensors.parts.make_part`` (class geometry with ±2 % part-to-part variation), then
   ``subdivide_uniform`` to edges ≤ 1 mm (IMRNet's mesh subdivision to a uniform density);
2. pose: every camera part and every point-cloud *test* part is rotated about z by
   U(−10°, 10°) and shifted by U(−5, 5) mm in x and y (point-cloud train parts stay canonical);
3. defective parts: one defect of the paper's six kinds, named as in the paper: ``bulge``,
   ``concavity`` (``sensors.defects``' ``dent``), ``hole``, ``crack``, ``break`` — carved by
   ``sensors.defects.carve_defect`` — and ``bending``, carved here by :func:`carve_bending`
   (``sensors.defects``' bending acts on 25–40 % of the part's length and so marks 12–29 % of
   the points, outside the 1–10 % the benchmark asks for; ours bends the end of the part
   holding 3–7 % of its surface, by 1.5–3 mm at its tip). Point clouds: the defect sits on
   a site facing a random direction of the upper hemisphere (z ≥ −0.3); camera frames: facing
   the camera on the first draw; re-draws (step 5) alternate between facing up and facing a
   direction 20–70° above the horizontal, as a defect sized by the whole surface (as
   ``sensors.defects`` does) can cover more than 10 % of what a camera sees of a small part;
4. ground truth and scan. Point clouds: ``sensors.defects.sample_cloud``: area-uniform
   samples of the (defective) surface, labelled on the noise-free points (distance > 0.25 mm
   to the defect-free mesh; for holes and cracks also points within 2.5 mm of the removed
   material (``RIM_MM``), as a point cloud has no points inside a hole and only its rim can be
   marked; breaks 1 mm), then isotropic gaussian scanner noise. Camera frames:
   ``sensors.simcam.render`` with the defect-free mesh as reference (a pixel is anomalous where
   the noise-free depth changes by > 0.3 mm).
5. anomalous fraction: a defective sample must have 1–10 % anomalous points (camera frames: of
   the pixels showing the part, and at least ``simcam.MIN_VISIBLE_GT_PIXELS`` of them measured);
   otherwise the defect is drawn again (new site and size, same kind), at most
   ``MAX_DEFECT_TRIES`` times, then ``RuntimeError``.

Point counts (``POINTS``): anomaly-shapenet 16 000 points per part (the paper's range is 8K–30K),
noise σ 0.05 mm; real3d test parts 16 000 points with σ 0.05 mm and train templates 32 000
points with σ 0.01 mm (Real3D-AD's templates are complete, clean scans, denser than the
tests). At the evaluation's 1 mm voxels these give a few thousand to ~10 000 voxels per part,
so PatchCore-FPFH scores a part in well under a second on 2 cores.

Classes: the first ``n_classes`` of ``sensors.parts.PART_CLASSES`` (in that order), so a
4-class set is ``flange, bracket, nut, shaft``. Determinism: every sample has its own generator
``np.random.default_rng([seed, class_index, sample_index])`` (class_index into PART_CLASSES,
sample_index running over train, validation, good test, defective test of the class), so the
output is byte-identical for a seed, whatever the number of worker processes. Samples are
generated by a spawn-safe process pool (2 processes on a 2-core machine: a 4-class set takes
well under 2 minutes). ``dataset.json`` at the root records layout, classes, seed, counts,
generator version, parameters and each sample's anomalous fraction.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "DEFECTS",
    "LAYOUTS",
    "POINTS",
    "synthesize",
    "carve_bending",
    "class_names",
    "shade",
]

GENERATOR_VERSION = "1.0.0"
LAYOUTS = ("mvtec3d", "real3d", "anomaly-shapenet")
DEFECTS: tuple[str, ...] = ("bulge", "concavity", "hole", "crack", "break", "bending")
"""The six defect kinds of Anomaly-ShapeNet, with the paper's names (folder / file names)."""
_CARVE_KIND = {"bulge": "bulge", "concavity": "dent", "hole": "hole", "crack": "crack", "break": "break"}
"""Paper name → ``sensors.defects`` kind (bending is carved by :func:`carve_bending`)."""

POINTS: dict[str, dict[str, dict[str, float]]] = {
    "anomaly-shapenet": {"train": {"n": 16000, "noise": 0.05}, "test": {"n": 16000, "noise": 0.05}},
    "real3d": {"train": {"n": 32000, "noise": 0.01}, "test": {"n": 16000, "noise": 0.05}},
}
"""Points per part and isotropic scanner noise σ (mm), per point-cloud layout and split."""

FRACTION_RANGE = (0.01, 0.10)
MAX_DEFECT_TRIES = 24
MAX_EDGE_MM = 1.0
VARIATION = 0.02
POSE_MAX_DEG = 10.0
POSE_MAX_SHIFT_MM = 5.0
LABEL_TOL_MM = 0.25
RIM_MM = {"hole": 2.5, "crack": 2.5}
"""Rim of removed material marked anomalous in point clouds (default 1 mm, ``sensors.defects``)."""
DEFAULT_COUNTS = {"n_train": 4, "n_validation": 2, "n_test_good": 6, "n_test_per_defect": 1}


def class_names(n_classes: int) -> list[str]:
    """The first ``n_classes`` part classes of ``sensors.parts.PART_CLASSES``."""
    from sensors.parts import PART_CLASSES

    if not 1 <= n_classes <= len(PART_CLASSES):
        raise ValueError(f"--classes must be between 1 and {len(PART_CLASSES)} (the part library), got {n_classes}")
    return list(PART_CLASSES[:n_classes])


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _pose(rng: np.random.Generator) -> np.ndarray:
    """4×4: rotation about z by U(−10°, 10°), shift U(−5, 5) mm in x and y."""
    a = math.radians(rng.uniform(-POSE_MAX_DEG, POSE_MAX_DEG))
    pose = np.eye(4)
    pose[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    pose[:2, 3] = rng.uniform(-POSE_MAX_SHIFT_MM, POSE_MAX_SHIFT_MM, 2)
    return pose


def carve_bending(mesh: Any, rng: np.random.Generator, fraction: tuple[float, float] = (0.03, 0.07),
                  tip_mm: tuple[float, float] = (1.5, 3.0)) -> tuple[Any, dict[str, Any]]:
    """Bend the end of a part upwards: the paper's "bending", localized to 1–10 % of the surface.

    A vertical plane (normal ``u``, a random horizontal direction) is placed so that the part of
    the surface beyond it holds a fraction U(``fraction``) of the total area (by triangle area,
    as ``sensors.defects``' break). The vertices beyond it are rotated about the horizontal axis
    ``u × z`` through the plane's foot on the part's lowest z, by an angle growing linearly with
    their distance from the plane, so the tip rises by U(``tip_mm``) mm (angle clipped to
    3–25°). Returns ``(mesh, info)`` like ``carve_defect``.
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
    }
    return out, info


def _carve(base: Any, kind: str, rng: np.random.Generator, visible_from: np.ndarray) -> tuple[Any, dict[str, Any]]:
    from sensors.defects import carve_defect

    if kind == "bending":
        return carve_bending(base, rng)
    return carve_defect(base, _CARVE_KIND[kind], rng, visible_from=tuple(visible_from))


def _direction(rng: np.random.Generator) -> np.ndarray:
    """A random unit direction with z ≥ −0.3 (the part rests on its bottom face)."""
    while True:
        d = rng.normal(size=3)
        n = float(np.linalg.norm(d))
        if n > 1e-9 and d[2] / n >= -0.3:
            return d / n


def _camera_direction(rng: np.random.Generator, attempt: int) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    out: str
    layout: str
    cls: str
    class_index: int
    sample_index: int
    split: str  # train | validation | test
    kind: str  # good | one of DEFECTS
    rel: str  # the scan file, relative to out
    gt_rel: str | None  # the label file / gt PNG, relative to out
    rgb_rel: str | None
    seed: int


def _plan(out: Path, layout: str, classes: Sequence[str], seed: int, counts: dict[str, int],
          kinds: Sequence[str]) -> list[_Job]:
    from sensors.parts import PART_CLASSES

    jobs: list[_Job] = []
    for cls in classes:
        ci = PART_CLASSES.index(cls)
        entries: list[tuple[str, str]] = [("train", "good")] * counts["n_train"]
        if layout == "mvtec3d":
            entries += [("validation", "good")] * counts["n_validation"]
        entries += [("test", "good")] * counts["n_test_good"]
        entries += [("test", k) for k in kinds for _ in range(counts["n_test_per_defect"])]
        n_test = sum(1 for s, _ in entries if s == "test")
        # real3d numbers test parts 1..n_test with the kinds interleaved (seeded)
        numbering = np.random.default_rng([seed, ci, 1 << 20]).permutation(n_test) + 1
        per_folder: dict[tuple[str, str], int] = {}
        t = 0
        for si, (split, kind) in enumerate(entries):
            k = per_folder.get((split, kind), 0)
            per_folder[(split, kind)] = k + 1
            gt_rel = rgb_rel = None
            if layout == "mvtec3d":
                d = f"{cls}/{split}/{kind}"
                rel, rgb_rel = f"{d}/xyz/{k:03d}.tiff", f"{d}/rgb/{k:03d}.png"
                gt_rel = f"{d}/gt/{k:03d}.png" if split == "test" else None
            elif layout == "real3d":
                if split == "train":
                    rel = f"{cls}/train/{k + 1}_template.pcd"
                else:
                    stem = f"{numbering[t]}_{kind}"
                    t += 1
                    rel = f"{cls}/test/{stem}.pcd"
                    gt_rel = None if kind == "good" else f"{cls}/gt/{stem}.txt"
            else:  # anomaly-shapenet
                if split == "train":
                    rel = f"{cls}/train/{cls}_template{k}.pcd"
                else:
                    stem = f"positive{k}" if kind == "good" else f"{kind}{k}"
                    rel = f"{cls}/test/{stem}.pcd"
                    gt_rel = None if kind == "good" else f"{cls}/GT/{stem}.txt"
            jobs.append(_Job(str(out), layout, cls, ci, si, split, kind, rel, gt_rel, rgb_rel, seed))
    return jobs


def _in_range(frac: float) -> bool:
    return FRACTION_RANGE[0] <= frac <= FRACTION_RANGE[1]


def _run_cloud(job: _Job, rng: np.random.Generator, base: Any) -> dict[str, Any]:
    from sensors.defects import sample_cloud
    from sensors.pointfiles import write_pcd

    spec = POINTS[job.layout]["train" if job.split == "train" else "test"]
    n, noise = int(spec["n"]), float(spec["noise"])
    if job.split != "train":
        base.transform(_pose(rng))
    tries, fracs = 0, []
    if job.kind == "good":
        pts, lab = sample_cloud(base, base, n, rng, noise_sigma=noise)
    else:
        while True:
            tries += 1
            mesh, info = _carve(base, job.kind, rng, _direction(rng))
            pts, lab = sample_cloud(mesh, base, n, rng, noise_sigma=noise, info=info, tol=LABEL_TOL_MM,
                                    rim=RIM_MM.get(job.kind, 1.0))
            fracs.append(float(lab.mean()))
            if _in_range(fracs[-1]):
                break
            if tries >= MAX_DEFECT_TRIES:
                raise RuntimeError(
                    f"{job.cls} {job.kind}: no defect with {FRACTION_RANGE[0]:.0%}-{FRACTION_RANGE[1]:.0%} anomalous "
                    f"points in {tries} tries (fractions {', '.join(f'{x:.3f}' for x in fracs)})"
                )
    out = Path(job.out)
    write_pcd(out / job.rel, pts)
    if job.gt_rel is not None:
        sep = "," if job.layout == "real3d" else " "
        path = out / job.gt_rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = np.column_stack([pts.astype(np.float64), lab.astype(np.float64)])
        np.savetxt(path, table, fmt=["%.6f", "%.6f", "%.6f", "%d"], delimiter=sep)
    return {"n_points": int(len(pts)), "anomalous_fraction": round(float(lab.mean()), 6), "tries": tries}


def _run_camera(job: _Job, rng: np.random.Generator, base: Any) -> dict[str, Any]:
    from PIL import Image

    from sensors.pointfiles import write_xyz_tiff
    from sensors.simcam import MIN_VISIBLE_GT_PIXELS, CameraParams, render

    camera = CameraParams()
    base.transform(_pose(rng))
    tries, fracs = 0, []
    if job.kind == "good":
        pts, _ = render(base, camera, rng)
        gt = np.zeros(pts.shape[:2], np.uint8)
        frac = 0.0
    else:
        while True:
            tries += 1
            mesh, _info = _carve(base, job.kind, rng, _camera_direction(rng, tries))
            pts, gt = render(mesh, camera, rng, reference=base)
            valid = np.isfinite(pts).all(axis=-1)
            anomalous = gt.astype(bool)
            part = (valid & (np.nan_to_num(pts[..., 2], nan=0.0) > 0.5)) | anomalous
            frac = float(anomalous.sum() / max(int(part.sum()), 1))
            fracs.append(frac)
            if _in_range(frac) and int((anomalous & valid).sum()) >= MIN_VISIBLE_GT_PIXELS:
                break
            if tries >= MAX_DEFECT_TRIES:
                raise RuntimeError(
                    f"{job.cls} {job.kind}: no visible defect covering {FRACTION_RANGE[0]:.0%}-{FRACTION_RANGE[1]:.0%} "
                    f"of the part's pixels in {tries} tries (fractions {', '.join(f'{x:.3f}' for x in fracs)})"
                )
    out = Path(job.out)
    write_xyz_tiff(out / job.rel, pts / 1000.0)  # metres, as MVTec 3D-AD
    assert job.rgb_rel is not None
    (out / job.rgb_rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shade(pts)).save(out / job.rgb_rel)
    if job.gt_rel is not None:
        (out / job.gt_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((gt > 0).astype(np.uint8) * 255, mode="L").save(out / job.gt_rel)
    n_valid = int(np.isfinite(pts).all(axis=-1).sum())
    return {"n_points": n_valid, "anomalous_fraction": round(frac, 6), "tries": tries}


def _run_job(job: _Job) -> dict[str, Any]:
    """Generate and write one sample (runs in a worker process; module-level for spawn)."""
    from sensors.parts import make_part, subdivide_uniform

    t0 = time.perf_counter()
    rng = np.random.default_rng([job.seed, job.class_index, job.sample_index])
    base = subdivide_uniform(make_part(job.cls, rng, VARIATION), MAX_EDGE_MM)
    stats = _run_camera(job, rng, base) if job.layout == "mvtec3d" else _run_cloud(job, rng, base)
    return {"file": job.rel, "gt": job.gt_rel, "class": job.cls, "split": job.split, "defect": job.kind,
            **stats, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    """Create ``out``; clear a previous synth output there; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "dataset.json"
        if not meta.is_file():
            raise ValueError(f"{out} is not empty and holds no dataset.json: refusing to write a dataset into it")
        try:
            old = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta} is not valid JSON ({exc}); remove {out} first") from None
        for cls in old.get("classes", []) if isinstance(old, dict) else []:
            d = out / str(cls)
            if d.is_dir() and d.parent == out:
                shutil.rmtree(d)
        meta.unlink()
    out.mkdir(parents=True, exist_ok=True)


def synthesize(
    out: str | Path,
    layout: str,
    n_classes: int,
    seed: int,
    n_train: int = DEFAULT_COUNTS["n_train"],
    n_test_good: int = DEFAULT_COUNTS["n_test_good"],
    n_test_per_defect: int = DEFAULT_COUNTS["n_test_per_defect"],
    progress: bool = True,
    n_validation: int = DEFAULT_COUNTS["n_validation"],
    kinds: Sequence[str] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write a synthetic dataset in ``layout`` under ``out``; return what ``dataset.json`` holds.

    ``n_classes``: the first N classes of ``sensors.parts.PART_CLASSES``. Per class:
    ``n_train`` good training parts, ``n_validation`` good validation parts (mvtec3d only),
    ``n_test_good`` good test parts and ``n_test_per_defect`` defective test parts of each kind
    in ``kinds`` (default: all six of :data:`DEFECTS`). Defaults: 4 train, 2 validation, 6 good
    and 6 defective (one per kind) test parts: 16 train + 48 test samples for 4 classes.
    ``workers``: processes (default ``min(2, CPUs)``, 1 = in this process); the output does not
    depend on it. A previous synth output in ``out`` is replaced; any other non-empty folder
    is refused (``ValueError``).
    """
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    kinds = list(DEFECTS if kinds is None else kinds)
    bad = [k for k in kinds if k not in DEFECTS]
    if bad:
        raise ValueError(f"unknown defect kind(s) {', '.join(bad)}; expected some of {', '.join(DEFECTS)}")
    counts = {"n_train": n_train, "n_validation": n_validation if layout == "mvtec3d" else 0,
              "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect}
    for key, value in counts.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if n_train < 1:
        raise ValueError("n_train must be >= 1 (a scorer needs good training parts)")
    if n_test_good + n_test_per_defect * len(kinds) < 1:
        raise ValueError("the test split would be empty")
    classes = class_names(n_classes)
    out = Path(out)
    _prepare_out(out)
    # a placeholder until the end, so that an interrupted run is recognized (and replaced) as ours
    (out / "dataset.json").write_text(json.dumps({"generator": "inspectd sensors.synth", "status": "incomplete",
                                                   "classes": classes}) + "\n")
    jobs = _plan(out, layout, classes, seed, counts, kinds)
    n_workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    n_workers = min(n_workers, len(jobs))
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=f"synth {layout}", unit="part", disable=not progress)
    try:
        if n_workers <= 1:
            for job in jobs:
                results.append(_run_job(job))
                bar.update()
        else:
            import multiprocessing as mp

            # longest jobs first (defective camera parts retry) for a balanced pool
            order = sorted(range(len(jobs)), key=lambda i: (jobs[i].kind == "good", i))
            with mp.get_context("spawn").Pool(n_workers) as pool:
                by_index: dict[int, dict[str, Any]] = {}
                for i, res in zip(order, pool.imap(_run_job, [jobs[i] for i in order], chunksize=1), strict=True):
                    by_index[i] = res
                    bar.update()
            results = [by_index[i] for i in range(len(jobs))]
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0

    defective = [r["anomalous_fraction"] for r in results if r["defect"] != "good"]
    info: dict[str, Any] = {
        "generator": "inspectd sensors.synth",
        "generator_version": GENERATOR_VERSION,
        "layout": layout,
        "units": "m" if layout == "mvtec3d" else "mm",
        "classes": classes,
        "class_selection": "the first N classes of sensors.parts.PART_CLASSES",
        "seed": seed,
        "defect_kinds": kinds,
        "counts": {
            "per_class": {"train": counts["n_train"], "validation": counts["n_validation"],
                          "test_good": counts["n_test_good"], "test_defective": counts["n_test_per_defect"] * len(kinds),
                          "test_per_defect": counts["n_test_per_defect"]},
            "train": sum(r["split"] == "train" for r in results),
            "validation": sum(r["split"] == "validation" for r in results),
            "test": sum(r["split"] == "test" for r in results),
            "total": len(results),
        },
        "anomalous_fraction": {"required": list(FRACTION_RANGE),
                               "min": min(defective) if defective else None,
                               "max": max(defective) if defective else None},
        "parameters": _parameters(layout),
        "samples": [{k: v for k, v in r.items() if k != "seconds"} for r in results],
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    info["elapsed_seconds"] = elapsed
    info["workers"] = n_workers
    return info


def _parameters(layout: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "subdivision_max_edge_mm": MAX_EDGE_MM,
        "part_variation": VARIATION,
        "pose": ("test parts" if layout != "mvtec3d" else "all parts")
        + f": rotation about z U(-{POSE_MAX_DEG}, {POSE_MAX_DEG}) deg, shift U(-{POSE_MAX_SHIFT_MM}, "
        f"{POSE_MAX_SHIFT_MM}) mm in x, y",
        "max_defect_tries": MAX_DEFECT_TRIES,
        "defect_source": {**{k: f"sensors.defects.carve_defect({v!r})" for k, v in _CARVE_KIND.items()},
                          "bending": "sensors.synth.carve_bending"},
    }
    if layout == "mvtec3d":
        from sensors.simcam import CameraParams

        p["camera"] = asdict(CameraParams())
        p["gt"] = "pixels whose noise-free depth differs from the defect-free render by > 0.3 mm"
    else:
        p["points"] = POINTS[layout]
        p["gt"] = (f"points farther than {LABEL_TOL_MM} mm from the defect-free mesh, or within the rim of removed "
                   f"material (hole, crack: {RIM_MM['hole']} mm; break: 1 mm)")
    return p
