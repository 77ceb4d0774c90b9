"""How detectable is each defect at all? An oracle ceiling for a synthetic bench dataset (offline study).

    python scripts/oracle_ceiling.py DATASET OUT.npz [--classes a,b] [--workers 2]
    python scripts/oracle_ceiling.py --report OUT.npz [--eval EVAL_DIR] [--every]

Each test part of a synthetic dataset (``inspectd synth``, any layout) is made again from its
seed (``tools.synth.samples.scan_cloud`` / ``scan_camera``, checked against the file on disk),
and so is its exact twin: the same part, with the same dimensions and pose, without the defect.
No scorer can know the twin; an *oracle* that is handed it measures what the scan itself lets
any method see. Per part it records:

- ``dev_k`` (k = 1, 8, 32, 128): the largest |mean signed distance| from the scan's points to
  the twin's surface, averaged over each point's k nearest scan points (open3d's
  ``RaycastingScene``). A good scan gives scanner noise only (σ 0.05 mm, over √k). Camera
  frames: the depth difference to a render of the twin (same pose, independent noise), averaged
  over a window of about k pixels (:data:`WINDOW`).
- ``gap_max`` (point clouds): the largest distance from a point of the twin's surface (200 000
  area-uniform samples) to the nearest scan point: the radius of the largest uncovered spot.
- ``gap_area_t`` (t = 1.0, 1.5 mm): the twin's surface area, in mm², farther than t from the scan.
- ``cad_*`` (point clouds): the same against the class's *nominal* part (every dimension at its
  drawing value) after point-to-plane ICP: a comparison with a perfect CAD model.
  ``cad_face_dev_k`` also removes each face's shrunk median shift, as the template does.

``--report`` gives the mean over classes of each statistic's I-AUROC (good test parts against
each kind), per kind and magnitude bin. ``twin`` and ``nominal`` are the best statistic of each
cell (an upper bound chosen on the reported parts); the ``(one score)`` columns take one object
score per part (:data:`COMBINED`). With ``--eval``, a ``inspectd eval`` run on the same
dataset is printed beside them. Results: docs/results/detectability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensors.pointfiles import read_pcd  # noqa: E402
from workers.metrics import auroc  # noqa: E402

DEV_K = (1, 8, 32, 128)
GAP_T = (1.0, 1.5)
DENSE = 200_000
STATS = tuple(f"dev_{k}" for k in DEV_K) + ("gap_max",) + tuple(f"gap_area_{t}" for t in GAP_T)
FACE_STATS = tuple(f"face_dev_{k}" for k in DEV_K)
CAD_STATS = tuple(f"cad_{s}" for s in STATS + FACE_STATS)
FACE_SHRINK = 20.0
"""The template's default ``face_shrink``; its ``face_cos`` (0.99) and 1 mm voxels segment the faces."""
BINS = ("subtle", "moderate", "gross")


def _oracle_stats(canonical: np.ndarray, base: Any, seed: int,
                  faces: tuple[cKDTree, np.ndarray] | None = None) -> dict[str, float]:
    """The statistics above for one scan (``canonical``: in the frame of its twin ``base``).
    ``faces`` (a KD-tree of reference points and their face labels): ``face_dev_k`` too, the
    deviation less each face's shrunk median shift, as the template removes it."""
    import open3d as o3d

    from sensors.defects import sample_surface

    pts = np.asarray(canonical, dtype=np.float64)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(base))
    ans = scene.compute_closest_points(o3d.core.Tensor(pts.astype(np.float32)))
    closest = ans["points"].numpy().astype(np.float64)
    normal = ans["primitive_normals"].numpy().astype(np.float64)
    signed = np.einsum("ij,ij->i", pts - closest, normal)
    tree = cKDTree(pts)
    _, nbr = tree.query(pts, k=max(DEV_K), workers=1)
    out: dict[str, float] = {}
    for k in DEV_K:
        out[f"dev_{k}"] = float(np.abs(signed[nbr[:, :k]].mean(axis=1)).max())
    if faces is not None:
        from workers.template.reference import face_offsets

        label = faces[1][faces[0].query(pts, workers=1)[1]]
        shifted = signed - face_offsets(label, signed, FACE_SHRINK)
        for k in DEV_K:
            out[f"face_dev_{k}"] = float(np.abs(shifted[nbr[:, :k]].mean(axis=1)).max())
    dense = sample_surface(base, DENSE, np.random.default_rng(seed))
    gap, _ = tree.query(dense, k=1, workers=1)
    area = float(np.asarray(base.get_surface_area()))
    out["gap_max"] = float(gap.max())
    for t in GAP_T:
        out[f"gap_area_{t}"] = float((gap > t).mean() * area)
    return out


_NOMINAL: dict[str, Any] = {}


def _nominal_fit(canonical: np.ndarray, cls: str) -> tuple[np.ndarray, Any, tuple[cKDTree, np.ndarray]]:
    """The scan moved onto the class's nominal part (every dimension at its nominal value) by
    point-to-plane ICP from where it lies (1 mm, then 0.5 mm correspondences), that part, and
    its faces (1 mm voxels of its surface, segmented as the template segments its reference)."""
    import open3d as o3d

    from sensors.defects import sample_surface
    from sensors.mesh import subdivide_uniform
    from sensors.parts import make_part
    from tools.synth.presets import MAX_EDGE_MM
    from workers.template.reference import fuse, segment_faces

    if cls not in _NOMINAL:
        mesh = subdivide_uniform(make_part(cls, np.random.default_rng(0), 0.0), MAX_EDGE_MM)
        target = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(sample_surface(mesh, DENSE,
                                                                                   np.random.default_rng(1))))
        target.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(16))
        ref = fuse([np.asarray(target.points)], 1.0)
        _NOMINAL[cls] = (mesh, target, (cKDTree(ref), segment_faces(ref, 1.0, 0.99)))
    mesh, target, faces = _NOMINAL[cls]
    source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(canonical, dtype=np.float64)))
    pose = np.eye(4)
    method = o3d.pipelines.registration.TransformationEstimationPointToPlane()
    for dist in (1.0, 0.5):
        pose = o3d.pipelines.registration.registration_icp(source, target, dist, pose, method).transformation
    moved = np.asarray(canonical, dtype=np.float64) @ pose[:3, :3].T + pose[:3, 3]
    return moved, mesh, faces


WINDOW = {1: 1, 8: 3, 32: 5, 128: 11}
"""Camera frames: the pixel window standing for ``dev_k`` (about k neighbours)."""


def _camera_stats(frame: np.ndarray, base: Any, seed: int) -> dict[str, float]:
    """``dev_k`` of a camera frame against a render of its twin (same pose and camera, independent
    noise and dropout): the largest |mean depth difference| over a window of valid pixels."""
    from scipy.ndimage import uniform_filter

    from sensors.simcam import CameraParams, render

    twin, _ = render(base, CameraParams(), np.random.default_rng([seed, 1 << 22]))
    diff = frame[..., 2].astype(np.float64) - twin[..., 2]
    ok = np.isfinite(diff)
    val = np.where(ok, diff, 0.0)
    out: dict[str, float] = {}
    for k, w in WINDOW.items():
        n = uniform_filter(ok.astype(np.float64), w, mode="constant")
        mean = uniform_filter(val, w, mode="constant") / np.maximum(n, 1e-12)
        out[f"dev_{k}"] = float(np.abs(mean[n >= 0.5]).max())  # at least half the window valid
    return out


def _one(args: tuple[Any, str]) -> dict[str, Any]:
    """Remake one test job, check it against its file, and measure it against its twin."""
    job, root = args
    from sensors.mesh import subdivide_uniform
    from sensors.parts import make_part
    from sensors.pointfiles import read_xyz_tiff
    from tools.synth.presets import MAX_EDGE_MM
    from tools.synth.samples import sample_rng, scan_camera, scan_cloud

    rng = sample_rng(job)
    base = subdivide_uniform(make_part(job.cls, rng, job.tolerance), MAX_EDGE_MM)
    if job.layout == "mvtec3d":
        frame = scan_camera(job, rng, base)
        on_disk_m = read_xyz_tiff(Path(root) / job.rel).astype(np.float64)
        err = float(np.nanmax(np.abs(on_disk_m * 1000.0 - frame.points)))
        if err > 1e-2 or (np.isnan(on_disk_m) != np.isnan(frame.points)).any():
            raise RuntimeError(f"{job.rel}: the remade frame differs from the file by {err:.3g} mm")
        return {"cls": job.cls, "kind": job.kind, "rel": job.rel,
                **_camera_stats(frame.points, frame.base, job.sample_index)}
    scan = scan_cloud(job, rng, base)
    on_disk, _ = read_pcd(Path(root) / job.rel)
    err = float(np.abs(np.asarray(on_disk, dtype=np.float64) - scan.points).max())
    if err > 1e-4:
        raise RuntimeError(f"{job.rel}: the remade scan differs from the file by {err:.3g} mm")
    stats = _oracle_stats(scan.canonical, scan.base, job.sample_index)
    moved, nominal, faces = _nominal_fit(scan.canonical, job.cls)
    cad = {f"cad_{k}": v for k, v in _oracle_stats(moved, nominal, job.sample_index, faces).items()}
    return {"cls": job.cls, "kind": job.kind, "rel": job.rel, **stats, **cad}


def measure(dataset: Path, out: Path, classes: list[str] | None, workers: int) -> None:
    """Measure every test part of ``dataset`` (its ``dataset.json`` replans the jobs) into ``out``."""
    from sensors.tolerance import DEFAULT_TOLERANCE
    from tools.synth.writer import plan_jobs

    meta = json.loads((dataset / "dataset.json").read_text())
    if "ISO 2768-m" not in meta["parameters"]["part_tolerance"]:
        raise SystemExit("only datasets made with the default tolerance (ISO 2768-m) are replanned here")
    per = meta["counts"]["per_class"]
    counts = {"n_train": per["train"], "n_validation": per["validation"], "n_test_good": per["test_good"],
              "n_test_per_defect": per["test_per_defect"], "n_validation_per_defect": per["validation_per_defect"]}
    jobs = plan_jobs(dataset, meta["layout"], meta["classes"], meta["seed"], counts, meta["defect_kinds"],
                     meta["pose"], meta["magnitudes"].startswith("graded"), DEFAULT_TOLERANCE)
    jobs = [j for j in jobs if j.split == "test" and (classes is None or j.cls in classes)]
    bins = {s["file"]: s.get("magnitude", {}).get("bin", "") for s in meta["samples"]}
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(_one, [(j, str(dataset)) for j in jobs], chunksize=4)
    else:
        rows = [_one((j, str(dataset))) for j in jobs]
    np.savez(out, cls=np.array([r["cls"] for r in rows]), kind=np.array([r["kind"] for r in rows]),
             rel=np.array([r["rel"] for r in rows]), bin=np.array([bins.get(r["rel"], "") for r in rows]),
             **{s: np.array([r[s] for r in rows]) for s in STATS + CAD_STATS if s in rows[0]})
    print(f"{len(rows)} test parts measured -> {out}")


COMBINED = {"twin (one score)": ("dev_32", "gap_max"), "nominal (one score)": ("cad_dev_8", "cad_gap_max"),
            "nominal, face shifts (one score)": ("cad_face_dev_32", "cad_gap_max")}
"""One object score per oracle, for the mean over all kinds: the larger of two statistics, each
standardized by the class's good test parts (an oracle's calibration, on the reported parts)."""


def _z_by_class(score: np.ndarray, cls: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """``score`` standardized per class by the mean and standard deviation of its good parts."""
    out = np.empty_like(score, dtype=np.float64)
    for c in np.unique(cls):
        m, g = cls == c, (cls == c) & (kind == "good")
        out[m] = (score[m] - score[g].mean()) / max(float(score[g].std()), 1e-12)
    return out


def _mean_auroc(score: np.ndarray, cls: np.ndarray, kind: np.ndarray, pick: np.ndarray) -> float:
    """Mean over classes of the AUROC of ``score``: the class's good parts against its ``pick`` parts."""
    vals = []
    for c in np.unique(cls):
        good, bad = (cls == c) & (kind == "good"), (cls == c) & pick
        if good.any() and bad.any():
            y = np.r_[np.zeros(good.sum()), np.ones(bad.sum())]
            vals.append(auroc(np.r_[score[good], score[bad]], y))
    return float(np.mean(vals)) if vals else float("nan")


def _eval_scores(eval_dir: Path, rel: np.ndarray) -> np.ndarray:
    """Object scores of an ``inspectd eval`` run, in the order of ``rel`` (by file stem and class)."""
    by_key: dict[tuple[str, str], float] = {}
    for f in (eval_dir / "scores").glob("*/*.npz"):
        with np.load(f) as z:
            by_key[(f.parent.name, f.stem)] = float(z["object_score"])
    # point clouds: <class>/scores/<stem>; camera frames: <class>/<kind>_<stem> (stems repeat per kind)
    keys = [(r.split("/")[0], Path(r).stem if r.endswith(".pcd") else f"{r.split('/')[2]}_{Path(r).stem}")
            for r in rel]
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise SystemExit(f"{eval_dir}: no scores for {len(missing)} parts, e.g. {missing[0]}")
    return np.array([by_key[k] for k in keys])


def report(path: Path, eval_dir: Path | None, every: bool = False) -> None:
    """Print the I-AUROC table per kind and magnitude bin (see the module docstring)."""
    z = np.load(path)
    cls, kind, bins = z["cls"], z["kind"], z["bin"]
    names = [s for s in STATS + CAD_STATS if s in z.files]
    scores = {s: z[s] for s in names}
    if eval_dir is not None:
        scores["eval"] = _eval_scores(eval_dir, z["rel"])
    for head, pair in COMBINED.items():  # camera frames have no gap: their one score is the deviation's
        present = [p for p in pair if p in scores]
        if present and pair[0] in present:
            scores[head] = np.max([_z_by_class(scores[p], cls, kind) for p in present], axis=0)
    kinds = [k for k in dict.fromkeys(kind.tolist()) if k != "good"]
    cols = [(k, b) for k in (*kinds, "all") for b in (None, *BINS)]
    def pick(k: str, b: str | None) -> np.ndarray:
        return ((kind != "good") if k == "all" else (kind == k)) & ((bins == b) if b else True)

    table = {s: [_mean_auroc(v, cls, kind, pick(k, b)) for k, b in cols] for s, v in scores.items()}
    heads = {"twin": [s for s in names if s in STATS],
             "nominal": [s for s in names if s in CAD_STATS and not s.startswith("cad_face")],
             "nominal, face shifts": [s for s in names if s.startswith("cad_face") or s == "cad_gap_max"]}
    for head, group in heads.items():
        if group and not (head.endswith("shifts") and len(group) == 1):
            table[head] = [max(table[s][i] for s in group) for i in range(len(cols))]
    shown = [h for h in (*heads, *COMBINED, "eval") if h in table] + (names if every else [])
    print(f"{path}: {len(kind)} test parts, {len(np.unique(cls))} classes; I-AUROC, mean over classes")
    print("| kind | " + " | ".join(shown) + " |")
    print("|---|" + "---:|" * len(shown))
    for i, (k, b) in enumerate(cols):
        print(f"| {k}{' ' + b if b else ''} | " + " | ".join(f"{table[h][i]:.3f}" for h in shown) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", type=Path)
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--classes", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--every", action="store_true", help="print every statistic's column too")
    a = ap.parse_args()
    if a.report is not None:
        report(a.report, a.eval, a.every)
    elif a.dataset is not None and a.out is not None:
        measure(a.dataset, a.out, a.classes.split(",") if a.classes else None, a.workers)
    else:
        ap.error("give DATASET OUT.npz, or --report OUT.npz")


if __name__ == "__main__":
    main()
