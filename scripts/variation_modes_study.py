"""Would removing the good parts' variation modes help the template? An offline study, not the scorer.

    python scripts/variation_modes_study.py DATASET --classes washer,hinge,flange [--modes 0,2,4,8]

Real3D-layout datasets only. For each class, the template is fitted on the train split and the
validation split's good parts (as ``inspectd eval`` enrolls them). Each enrolled part's signed
deviation, after the face shifts, is averaged onto the reference points and over 16 reference
neighbours: one field per part. The first m singular vectors of those fields, less their mean,
are the *modes*. A part's field is projected on them by a least-squares fit, trimmed three times
at 3 robust sigmas so that a defect does not pull it, and the projection is removed from its
points' deviations. Offset and spread are measured on the enrolled parts after the same
removal; the spread is inflated by n / (n − m − 1). The object score is the template's: the
deviation over the spread, averaged over 32 neighbours, then the top 0.5 %. The
missing-material term is left out, so holes are not comparable with the scorer's figures.
Prints the mean I-AUROC over the classes, per magnitude bin and per kind. Results:
docs/design/template.md, "Narrow faces and the variation modes of the good parts".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensors.datasets import list_samples  # noqa: E402
from tools.evaluation.protocol import preprocess_params, validation_good  # noqa: E402
from workers.components.knn import smooth_over_neighbours  # noqa: E402
from workers.metrics import auroc  # noqa: E402
from workers.preprocess import PreparedCloud, prepare  # noqa: E402
from workers.template import TemplateScorer  # noqa: E402
from workers.template.reference import face_offsets, signed_deviation  # noqa: E402

KEYS = ("ALL", "subtle", "moderate", "gross", "bending", "bulge", "concavity", "crack", "hole", "missing")
FIELD_NEIGHBOURS = 16


class Fields:
    """A fitted template and, per cloud, its points' deviations and its denoised field on the reference."""

    def __init__(self, clouds: list[PreparedCloud]) -> None:
        self.scorer = TemplateScorer(voxel_size=1.0)
        self.scorer.fit(clouds)
        model = self.scorer.model
        assert model is not None and self.scorer.faces is not None
        self.ref, self.normals, self.tree = model.array("reference_points"), model.array("reference_normals"), model.tree
        self.nb = cKDTree(self.ref).query(self.ref, k=FIELD_NEIGHBOURS)[1]

    def of(self, cloud: PreparedCloud) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(signed deviation per point after face shifts, distance, nearest reference point, field, observed)."""
        reg = self.scorer.register_part(cloud)
        s, d, j = signed_deviation(reg.moved, self.ref, self.normals, self.tree,
                                   (reg.nearest_distance, reg.nearest_index))
        s = s - face_offsets(self.scorer.faces[j], s, self.scorer.face_shrink)
        n = len(self.ref)
        count = np.bincount(j, minlength=n)[self.nb].sum(axis=1)
        field = np.bincount(j, s, n)[self.nb].sum(axis=1) / np.maximum(count, 1)
        return s, d, j, field, count > 0


def coefficients(field: np.ndarray, seen: np.ndarray, mean: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """Trimmed least-squares coefficients of ``field − mean`` on ``modes`` (m × N) over the seen points."""
    w = seen.astype(float)
    dv = np.where(seen, field - mean, 0.0)
    c = np.zeros(len(modes))
    for _ in range(3):
        a = modes * w
        c = np.linalg.solve(a @ modes.T + 1e-9 * np.eye(len(modes)), a @ dv)
        r = dv - c @ modes
        w = seen * (np.abs(r) < 3 * (1.4826 * np.median(np.abs(r[seen])) + 1e-9))
    return c


def study(dataset: Path, cls: str, ms: list[int], meta: dict, table: dict) -> None:
    pp = preprocess_params("real3d", 1.0)
    enrolled = [prepare(s.load(), pp) for s in list_samples(dataset, "real3d", cls, "train")
                + validation_good(dataset, "real3d", cls, None)]
    f = Fields(enrolled)
    enr = [f.of(c) for c in enrolled]
    g, seen = np.array([e[3] for e in enr]), np.array([e[4] for e in enr])
    mean = np.where(seen.sum(0) > 0, (g * seen).sum(0) / np.maximum(seen.sum(0), 1), 0.0)
    _, sv, vt = np.linalg.svd(np.where(seen, g - mean, 0.0), full_matrices=False)
    print(cls, "singular values", np.round(sv[:6], 2), flush=True)
    tests = []
    for t in list_samples(dataset, "real3d", cls, "test"):
        c = prepare(t.load(), pp)
        m = meta[f"{cls}/test/{t.path.stem}.pcd"]
        tests.append((m["defect"], m.get("magnitude", {}).get("bin", ""), c, f.of(c)))
    n_ref, n = len(f.ref), len(enrolled)
    for m in ms:
        modes = vt[:m]
        s1, s2, cnt, pooled = np.zeros(n_ref), np.zeros(n_ref), np.zeros(n_ref), []
        for s, _, j, field, ok in enr:
            r = s - ((coefficients(field, ok, mean, modes) @ modes)[j] if m else 0.0)
            s1 += np.bincount(j, r, n_ref)
            s2 += np.bincount(j, r * r, n_ref)
            cnt += np.bincount(j, minlength=n_ref)
            pooled.append(r)
        off = np.where(cnt > 0, s1 / np.maximum(cnt, 1), 0.0)
        var = np.where(cnt > 1, s2 / np.maximum(cnt, 1) - off**2, 0.0).clip(0) * n / max(1, n - m - 1)
        allp = np.concatenate(pooled)
        spread = np.sqrt(var + max(1.4826 * np.median(np.abs(allp - np.median(allp))), 0.02) ** 2)
        obj = []
        for _, _, c, (s, d, j, field, ok) in tests:
            corr = (coefficients(field, ok, mean, modes) @ modes)[j] if m else 0.0
            dev = np.maximum(np.abs(s - corr - off[j]), d - 1.0) / spread[j]
            sm = smooth_over_neighbours(c.points, dev, 32, neighbours=c.neighbours(32))
            k = max(5, int(round(0.005 * len(sm))))
            obj.append(np.partition(sm, len(sm) - k)[-k:].mean())
        obj_a = np.array(obj)
        good = np.array([t[0] == "good" for t in tests])
        for key in KEYS:
            sel = np.array([t[0] != "good" and (key == "ALL" or key in (t[0], t[1])) for t in tests])
            if sel.any():
                pick = good | sel
                table[m][key].append(auroc(obj_a[pick], sel[pick].astype(int)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--classes", required=True, help="comma-separated")
    ap.add_argument("--modes", default="0,2,4,8", help="comma-separated numbers of modes")
    a = ap.parse_args()
    meta = {s["file"]: s for s in json.loads((a.dataset / "dataset.json").read_text())["samples"]}
    ms = [int(x) for x in a.modes.split(",")]
    table: dict = defaultdict(lambda: defaultdict(list))
    for cls in a.classes.split(","):
        study(a.dataset, cls, ms, meta, table)
    print("modes " + "".join(f"{k[:8]:>9s}" for k in KEYS))
    for m in ms:
        print(f"{m:<5d} " + "".join(f"{np.mean(table[m][k]):9.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
