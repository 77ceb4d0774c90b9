"""Would a gap score from the raw points help ``fused`` find holes? An offline study, not the scorer.

    python scripts/gap_score_study.py DATASET LAYOUT OUT.npz [--classes a,b]
    python scripts/gap_score_study.py --report OUT.npz

For each class, ``fused`` is enrolled as ``inspectd eval`` enrolls it (train split plus the
validation split's good parts, the last one held out for the scales, then refitted on all).
Per test part it records fused's object score and the *gap*: the largest distance, in mm, from
a reference point the good parts cover (visibility >= 0.75) to the nearest raw point of the part
(``gmax``, before voxels), the mean of the three largest (``g3``), and the same largest distance
to the part's voxel centroids (``vmax``); and each gap of the held-out part (its calibration).
``--report`` prints the mean I-AUROC over classes and per defect kind of fused alone, of each
gap alone, and of ``fused + w · max(0, gap / gap_held_out − m)`` over a grid of w and m.
Results: docs/design/template.md, "A gap score from the raw points".
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensors.datasets import list_samples  # noqa: E402
from tools.evaluation.protocol import preprocess_params, validation_good  # noqa: E402
from workers.fused import FusedScorer  # noqa: E402
from workers.metrics import auroc  # noqa: E402
from workers.preprocess import PreparedCloud, prepare  # noqa: E402

GAPS = ("gmax", "g3", "vmax")


def gaps(fused: FusedScorer, cloud: PreparedCloud, pose: np.ndarray) -> list[float]:
    """(gmax, g3, vmax) of a part registered at ``pose`` (see the module doc)."""
    model = fused.template.model
    assert model is not None and cloud.frame is not None
    raw = cloud.frame.points.reshape(-1, 3)[cloud.source_flat].astype(np.float64)
    ref = model.array("reference_points")[model.array("visibility") >= 0.75]
    ref = (ref - pose[:3, 3]) @ pose[:3, :3]
    d = np.sort(cKDTree(raw).query(ref, workers=1)[0])
    dv = cloud.tree.query(ref, workers=1)[0]
    return [float(d[-1]), float(d[-3:].mean()), float(dv.max())]


Features = Callable[[PreparedCloud, np.ndarray], list[float]]
"""A study's features of one part, from its prepared cloud and its registered pose."""


def collect_study(dataset: Path, layout: str, classes: list[str], out: Path, key: str,
                  fit_class: Callable[[list[PreparedCloud]], tuple[FusedScorer, Features, list[float]]]) -> None:
    """Per test part of every class: fused's object score and the study's features (saved as
    ``key``), with the class's calibration (``cal``). ``fit_class`` takes the enrolled clouds (train
    split plus the validation split's good parts, as ``inspectd eval`` enrolls them) and returns
    the fitted fused, the features of a part and the calibration."""
    pp = preprocess_params(layout, 1.0)
    cls_col, kind, label, score, feats, cal = [], [], [], [], [], []
    for cls in classes:
        enrolled = [prepare(s.load(), pp) for s in
                    list(list_samples(dataset, layout, cls, "train")) + list(validation_good(dataset, layout, cls, None))]
        fused, features, c_cal = fit_class(enrolled)
        for s in list_samples(dataset, layout, cls, "test"):
            c = prepare(s.load(), pp)
            r = fused.score(c)
            cls_col.append(cls)
            kind.append(s.defect)
            label.append(s.label)
            score.append(r.object_score)
            feats.append(features(c, np.asarray(r.pose)))
            cal.append(c_cal)
        print(cls, "done", flush=True)
    np.savez(out, cls=np.array(cls_col), kind=np.array(kind), label=np.array(label), fused=np.array(score),
             cal=np.array(cal), **{key: np.array(feats)})


def collect(dataset: Path, layout: str, classes: list[str], out: Path) -> None:
    def fit_class(enrolled: list[PreparedCloud]) -> tuple[FusedScorer, Features, list[float]]:
        first = FusedScorer(voxel_size=1.0, refit=False)  # the fit that scores the held-out part
        first.fit(enrolled)
        held = gaps(first, enrolled[-1], np.asarray(first.template.score(enrolled[-1]).pose))
        fused = FusedScorer(voxel_size=1.0)  # what eval serves: refitted on all
        fused.fit(enrolled)
        return fused, lambda c, pose: gaps(fused, c, pose), held

    collect_study(dataset, layout, classes, out, "gap", fit_class)


def iauroc_line(name: str, score: np.ndarray, cls: np.ndarray, kind: np.ndarray, label: np.ndarray) -> None:
    """Print ``name``, the mean I-AUROC over classes and the mean per defect kind of ``score``
    (one row per test part, with its class, defect kind and label); shared by the study scripts."""
    kinds = sorted(set(kind.tolist()) - {"good"})
    means, per = [], {k: [] for k in kinds}
    for c in sorted(set(cls.tolist())):
        sel = cls == c
        means.append(auroc(score[sel], label[sel]))
        for k in kinds:
            pick = sel & ((label == 0) | (kind == k))
            if (label[pick] == 1).any():
                per[k].append(auroc(score[pick], label[pick]))
    print(f"{name:28s} mean {np.mean(means):.3f}  " + " ".join(f"{k} {np.mean(v):.2f}" for k, v in per.items() if v))


def report(path: Path) -> None:
    z = np.load(path)
    cls, kind, label, fused, gap, cal = (z[k] for k in ("cls", "kind", "label", "fused", "gap", "cal"))

    def line(name: str, score: np.ndarray) -> None:
        iauroc_line(name, score, cls, kind, label)

    line("fused", fused)
    for i, g in enumerate(GAPS):
        line(f"{g} alone", gap[:, i])
        for w, m in itertools.product((0.5, 1.0, 2.0, 4.0), (1.0, 1.25, 1.5)):
            line(f"fused + {w} {g} (m {m})", fused + w * np.maximum(0.0, gap[:, i] / cal[:, i] - m))


def study_cli(doc: str, collect: Callable[[Path, str, list[str], Path], None],
              report: Callable[[list[Path]], None]) -> None:
    """The command line the study scripts share: ``DATASET LAYOUT OUT [--classes a,b]`` collects,
    ``--report OUT.npz [...]`` reports."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("dataset", nargs="?")
    ap.add_argument("layout", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--classes")
    ap.add_argument("--report", nargs="+")
    a = ap.parse_args()
    if a.report:
        report([Path(p) for p in a.report])
        return
    if not (a.dataset and a.layout and a.out):
        ap.error("DATASET LAYOUT OUT are needed unless --report")
    dataset = Path(a.dataset)
    classes = a.classes.split(",") if a.classes else sorted(p.name for p in dataset.iterdir() if p.is_dir())
    collect(dataset, a.layout, classes, Path(a.out))


if __name__ == "__main__":
    study_cli(__doc__, collect, lambda paths: report(paths[0]))
