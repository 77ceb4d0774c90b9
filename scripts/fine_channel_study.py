"""Would a fine-scale channel on the raw points help ``fused`` find cracks? An offline study, not the scorer.

    python scripts/fine_channel_study.py DATASET LAYOUT OUT.npz [--classes a,b]
    python scripts/fine_channel_study.py --report OUT.npz [OUT2.npz ...]

For each class, ``fused`` is enrolled as ``inspectd eval`` enrolls it (train split plus the
validation split's good parts). Every part's **raw** points (before voxels) are moved by the
template's registration; each takes the signed point-to-plane deviation at its nearest
reference point, less the median of the same deviation over its k nearest raw points (a
high-pass: face shifts and smooth variation go, a groove a millimetre wide stays). Per reference
point, the mean and spread of that high-pass over the enrolled parts' raw points are the fine
tolerance map; a part's fine score per raw point is its high-pass less that mean, over that
spread (absolute, or inward only), averaged over its 1, 4 or 8 nearest raw points, and its
object score is the mean of the top 0.5 %. ``--report`` prints the mean I-AUROC over classes and
per defect kind of fused alone, of each variant alone, and of ``fused + w · max(0, fine / cal − m)``
(``cal``: the median over the enrolled parts). Results: docs/design/template.md, "Measured and
not taken (2026-12-05, fifth session, seed 1)".
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.fused import FusedScorer  # noqa: E402
from workers.preprocess import PreparedCloud  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gap_score_study import Features, collect_study, iauroc_line, study_cli  # noqa: E402

MEDIAN_K = (24, 48)
SMOOTH_K = (1, 4, 8)
VARIANTS = [f"k{k}-{side}-sm{m}" for k in MEDIAN_K for side in ("abs", "in") for m in SMOOTH_K]


class FineMap:
    """The fine tolerance map of one fitted ``fused`` (see the module doc)."""

    def __init__(self, fused: FusedScorer) -> None:
        model = fused.template.model
        assert model is not None
        self.fused, self.model = fused, model
        self.ref = model.array("reference_points")
        self.normals = model.array("reference_normals")
        self.stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def highpass(self, cloud: PreparedCloud, pose: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
        """(high-pass per median size, nearest reference point, raw neighbours) of ``cloud``'s raw points."""
        assert cloud.frame is not None
        raw = cloud.frame.points.reshape(-1, 3)[cloud.source_flat].astype(np.float64)
        moved = raw @ pose[:3, :3].T + pose[:3, 3]
        _, j = self.model.tree.query(moved, workers=1)
        d = np.einsum("ij,ij->i", moved - self.ref[j], self.normals[j])
        _, nb = cKDTree(raw).query(raw, k=max(MEDIAN_K) + 1, workers=1)
        return {k: d - np.median(d[nb[:, : k + 1]], axis=1) for k in MEDIAN_K}, j, nb

    def fit(self, enrolled: list[PreparedCloud]) -> None:
        n = len(self.ref)
        s1 = {k: np.zeros(n) for k in MEDIAN_K}
        s2 = {k: np.zeros(n) for k in MEDIAN_K}
        cnt = np.zeros(n)
        for c in enrolled:  # one iteration per good part, vectorized over its points
            h, j, _ = self.highpass(c, self.fused.template.register_part(c).transform)
            for k in MEDIAN_K:
                s1[k] += np.bincount(j, h[k], n)
                s2[k] += np.bincount(j, h[k] ** 2, n)
            cnt += np.bincount(j, minlength=n)
        for k in MEDIAN_K:
            mean = np.where(cnt > 0, s1[k] / np.maximum(cnt, 1), 0.0)
            var = np.where(cnt > 1, s2[k] / np.maximum(cnt, 1) - mean**2, 0.0).clip(min=0.0)
            self.stats[k] = (mean, var)

    def scores(self, cloud: PreparedCloud, pose: np.ndarray) -> list[float]:
        """The object score of every variant (``VARIANTS`` order)."""
        h, j, nb = self.highpass(cloud, pose)
        out = []
        for k in MEDIAN_K:
            mean, var = self.stats[k]
            floor = 1.4826 * np.median(np.abs(h[k] - np.median(h[k])))
            z = (h[k] - mean[j]) / np.sqrt(var[j] + floor**2)
            for side in (np.abs(z), -z):
                for m in SMOOTH_K:
                    y = side if m == 1 else side[nb[:, :m]].mean(axis=1)
                    top = max(5, int(round(0.005 * len(y))))
                    out.append(float(np.partition(y, len(y) - top)[-top:].mean()))
        return out


def collect(dataset: Path, layout: str, classes: list[str], out: Path) -> None:
    def fit_class(enrolled: list[PreparedCloud]) -> tuple[FusedScorer, Features, list[float]]:
        fused = FusedScorer(voxel_size=1.0)
        fused.fit(enrolled)
        fm = FineMap(fused)
        fm.fit(enrolled)
        cal = np.median([fm.scores(c, np.asarray(fused.template.score(c).pose)) for c in enrolled], axis=0)
        return fused, fm.scores, cal.tolist()

    collect_study(dataset, layout, classes, out, "fine", fit_class)


def report(paths: list[Path]) -> None:
    zs = [np.load(p) for p in paths]
    cls, kind, label, fused, fine, cal = (np.concatenate([z[k] for z in zs])
                                          for k in ("cls", "kind", "label", "fused", "fine", "cal"))

    def line(name: str, score: np.ndarray) -> None:
        iauroc_line(name, score, cls, kind, label)

    line("fused", fused)
    for i, name in enumerate(VARIANTS):
        line(f"{name} alone", fine[:, i])
    for i, name in enumerate(VARIANTS):
        for w, m in itertools.product((0.5, 1.0, 2.0), (1.0, 1.5)):
            line(f"fused + {w} {name} (m {m})", fused + w * np.maximum(0.0, fine[:, i] / cal[:, i] - m))


if __name__ == "__main__":
    study_cli(__doc__, collect, report)
