"""``template``: registration onto a fused golden part and a tolerance-normalized deviation.
Design and choices: docs/design/template.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.base import Scorer, ScoreResult
from workers.components.knn import smooth_over_neighbours
from workers.components.registration import Registrar, Registration, rotation_angle_deg
from workers.params import ScorerParams, fit_field, infer_field
from workers.preprocess import PreparedCloud
from workers.template.reference import build_reference, segment_faces, tolerance_map
from workers.template.torch_model import TemplateModel

log = logging.getLogger("inspectd.template")

FAILED_SCORE = 1.0e6
"""Object score of a part that could not be registered: above any threshold, so never a pass."""
MIN_POINTS = 10
OBJECT_RIM_K = 8
"""Part points that carry a missing point's gap into the object score, whatever the map's rim
(``rim_k``): a wide rim marks a hole's damage on the map, and in the object score it would weigh
a good part's few sampling gaps as much (docs/design/template.md, "The rim of a hole")."""


@dataclass
class TemplateScoreResult(ScoreResult):
    """A :class:`ScoreResult` plus what registration found (for the verdict header)."""

    registration_fitness: float = 0.0
    registration_rmse: float = 0.0
    pose: list[list[float]] = field(default_factory=list)
    """4×4 rigid transform taking the part onto the reference, row-major."""
    rotation_deg: float = 0.0
    registration_failed: bool = False
    review_reason: str | None = None

    def verdict_fields(self) -> dict[str, Any]:
        """What the verdict header should carry (JSON-ready). ``registration_failed`` means: ``review``."""
        return {
            "registration_fitness": round(self.registration_fitness, 4),
            "registration_rmse": round(self.registration_rmse, 4),
            "registration_pose": self.pose,
            "registration_rotation_deg": round(self.rotation_deg, 2),
            "registration_failed": self.registration_failed,
            "review_reason": self.review_reason,
        }


class TemplateParams(ScorerParams):
    """Parameters of ``template`` (design: docs/design/template.md)."""

    coarse_dist_factor: float = fit_field(5.0, "Coarse ICP correspondence distance, in voxels.", gt=0)
    fine_dist_factor: float = fit_field(2.0, "Fine (point-to-plane) ICP correspondence distance, in voxels.", gt=0)
    fusion_rounds: int = fit_field(2, "Rounds of registering the good parts onto the fused reference.", ge=0)
    fusion_min_fitness: float = fit_field(0.9, "A good part registered under this fitness while the reference is "
                                          "fused is left out of it (0: every part is fused).", ge=0, le=1)
    seed: int = fit_field(0, "Seed of registration's sampling.")
    face_cos: float = fit_field(0.99, "Neighbouring reference points whose normals agree this closely (|cos|) "
                                "lie on one face; 1 turns the face shifts off.", gt=0, le=1)
    face_shrink: float = fit_field(20.0, "A face's median shift is shrunk by n / (n + this) for a face of n "
                                   "points.", ge=0)
    min_fitness: float = infer_field(0.6, "Registration fitness under this: the part is flagged for review.",
                                     ge=0, le=1)
    missing_dist_factor: float = infer_field(2.0, "A covered reference point with no part point this near "
                                             "(in voxels) is missing material.", gt=0)
    min_visibility: float = infer_field(0.75, "Fraction of good parts that must cover a reference point for "
                                        "it to count as missing (clouds).", ge=0, le=1)
    min_visibility_organized: float = infer_field(0.95, "... and on a camera frame, where what a view shows "
                                                  "varies with the part's pose.", ge=0, le=1)
    smoothing_k: int = infer_field(32, "Deviations are averaged over this many nearest points (clouds).", ge=0)
    smoothing_k_organized: int = infer_field(8, "... and over this many on a camera frame, whose view shows "
                                             "one side of the part.", ge=0)
    rim_k: int = infer_field(128, "Part points nearest a missing reference point that take its gap: the rim "
                             "of a hole, around it, as far as about 6 voxels (clouds).", ge=0)
    rim_k_organized: int = infer_field(8, "... and on a camera frame, whose ground truth is the defect's own "
                                       "pixels.", ge=0)
    top_fraction: float = infer_field(0.005, "The object score is the mean of this top fraction of point "
                                      "scores.", gt=0, le=1)
    top_min: int = infer_field(5, "... and of at least this many points.", ge=0)


class TemplateScorer(Scorer):
    """Golden-part comparison with a tolerance map. See the module docstring."""

    name = "template"
    version = "1.0.0"

    Params = TemplateParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.model: TemplateModel | None = None
        """The fused reference and its tolerance map (``workers.template.torch_model``)."""
        self._registrar: Registrar | None = None
        self.faces: np.ndarray | None = None
        """Face label per reference point (``reference.segment_faces``; None: face shifts off)."""
        self.fit_fitness: list[float] = []

    # -- state ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("template is not fitted: nothing to save")
        return self.model.tensors()

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> TemplateScorer:
        # an artifact fitted before face shifts existed has a tolerance map measured without them
        scorer = cls(**{"face_cos": 1.0, **params})
        scorer._set_model(TemplateModel.from_tensors(tensors))
        return scorer

    def _registrar_kw(self) -> dict[str, Any]:
        # a registration that would be flagged failed first retries with more hypotheses
        return {"coarse_dist": self.coarse_dist_factor * self.voxel_size,
                "fine_dist": self.fine_dist_factor * self.voxel_size, "seed": self.seed,
                "retry_below": self.min_fitness}

    def _set_model(self, model: TemplateModel) -> None:
        """Hold ``model`` and the registrar onto its reference surface."""
        self.model = model
        self.faces = self._faces(model.array("reference_points"))
        self._registrar = Registrar(model.array("reference_points"), model.array("reference_normals"),
                                    tree=model.tree, **self._registrar_kw())

    def _faces(self, points: np.ndarray) -> np.ndarray | None:
        """The reference's faces (recomputed from the points, so artifacts need no new tensor)."""
        return None if self.face_cos >= 1.0 else segment_faces(points, self.voxel_size, self.face_cos)

    @property
    def fitted(self) -> bool:
        return self.model is not None

    # -- fit / score ---------------------------------------------------------------------------

    @staticmethod
    def _points(cloud: PreparedCloud) -> np.ndarray:
        pts = np.asarray(cloud.points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < MIN_POINTS or not np.isfinite(pts).all():
            raise ValueError(f"template needs a finite M×3 cloud of at least {MIN_POINTS} points, "
                             f"got shape {pts.shape}")
        return pts

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        if len(clouds) == 0:
            raise ValueError("template needs at least one good training cloud")
        parts = [self._points(c) for c in clouds]
        # while fusing, a part under fusion_min_fitness first retries with more hypotheses
        kw = {**self._registrar_kw(), "retry_below": max(self.min_fitness, self.fusion_min_fitness)}
        points, normals, registered, fitness = build_reference(parts, self.voxel_size, kw, self.fusion_rounds,
                                                               self.fusion_min_fitness)
        offset, spread, vis = tolerance_map(registered, points, normals,
                                            self.missing_dist_factor * self.voxel_size, 0.02 * self.voxel_size,
                                            self._faces(points), self.face_shrink)
        self.fit_fitness = fitness
        if len(registered) < len(parts):
            low = ", ".join(f"{i}: {f:.2f}" for i, f in enumerate(fitness) if f < self.fusion_min_fitness)
            log.warning("template: %d of %d good parts registered under fitness %.2f while the reference was "
                        "fused and were left out of it (part index: fitness) %s", len(parts) - len(registered),
                        len(parts), self.fusion_min_fitness, low)
        self._set_model(TemplateModel(points, normals, offset, spread, vis))

    def register_part(self, cloud: PreparedCloud) -> Registration:
        """The registration of ``cloud`` onto the reference (pose, fitness, RMSE)."""
        if self._registrar is None:
            raise RuntimeError("template is not fitted: call fit() or load an artifact first")
        return self._registrar.register(self._points(cloud))

    def visibility_for(self, cloud: PreparedCloud) -> float:
        """Fraction of the good parts that must cover a reference point for it to count as missing:
        ``min_visibility`` on a cloud, ``min_visibility_organized`` on a camera frame, where
        shadows and grazing faces that come and go with the pose leave reference points uncovered
        in good views (chosen on seed 1: docs/design/template.md, "Missing material on camera
        frames")."""
        organized = cloud.frame is not None and cloud.frame.organized
        return self.min_visibility_organized if organized else self.min_visibility

    def rim_for(self, cloud: PreparedCloud) -> int:
        """Part points that take a missing reference point's gap: ``rim_k`` on a cloud, where a
        hole's damage is marked on its rim, ``rim_k_organized`` on a camera frame (both chosen on
        seed 1 of the bench preset: docs/design/template.md, "The rim of a hole")."""
        organized = cloud.frame is not None and cloud.frame.organized
        return self.rim_k_organized if organized else self.rim_k

    def smoothing_for(self, cloud: PreparedCloud) -> int:
        """Neighbours a point's deviation is averaged over: ``smoothing_k`` on a cloud, where a bend
        or a shallow bulge spans many points, ``smoothing_k_organized`` on a camera frame
        (both chosen on seed 1 of the bench preset: docs/design/fused.md)."""
        organized = cloud.frame is not None and cloud.frame.organized
        return self.smoothing_k_organized if organized else self.smoothing_k

    def score(self, cloud: PreparedCloud) -> TemplateScoreResult:
        if self.model is None or self._registrar is None:
            raise RuntimeError("template is not fitted: call fit() or load an artifact first")
        pts = self._points(cloud)
        t0 = time.perf_counter()
        reg = self._registrar.register(pts)
        assert reg.moved is not None and reg.nearest_distance is not None and reg.nearest_index is not None
        t1 = time.perf_counter()
        dev = self.model.deviation(reg.moved, self.voxel_size, self.faces, self.face_shrink,
                                   (reg.nearest_distance, reg.nearest_index))
        t2 = time.perf_counter()
        # the part's own searches run on the cloud's KD-tree in the part's frame (built once per
        # cloud and shared with patchcore-fpfh in ``fused``): a rigid motion keeps every distance
        missing_dist = self.missing_dist_factor * self.voxel_size
        covered = np.zeros(len(self.model.reference_points), dtype=bool)
        covered[reg.nearest_index[reg.nearest_distance < missing_dist]] = True
        rim = self.rim_for(cloud)
        missing_object, missing = self.model.missing(cloud.tree, missing_dist, self.visibility_for(cloud),
                                                     (min(rim, OBJECT_RIM_K), rim), reg.transform, covered)
        t3 = time.perf_counter()
        k_smooth = self.smoothing_for(cloud)
        nbr = cloud.neighbours(k_smooth) if k_smooth > 1 else None
        smoothed = smooth_over_neighbours(pts, dev, k_smooth, neighbours=nbr)
        scores = np.maximum(smoothed, missing).astype(np.float32)
        object_points = np.maximum(smoothed, missing_object)
        k = min(len(scores), max(self.top_min, int(round(self.top_fraction * len(scores)))))
        object_score = float(np.partition(object_points, len(scores) - k)[-k:].mean())
        failed = reg.fitness < self.min_fitness
        reason = None
        if failed:
            reason = (f"registration failed: fitness {reg.fitness:.3f} < {self.min_fitness:.3f} "
                      f"(rmse {reg.rmse:.3f})")
            object_score = FAILED_SCORE
        t4 = time.perf_counter()
        return TemplateScoreResult(
            object_score=object_score,
            point_scores=scores,
            timings={"registration": t1 - t0, "deviation": t2 - t1, "missing": t3 - t2, "smooth": t4 - t3},
            registration_fitness=reg.fitness,
            registration_rmse=reg.rmse,
            pose=reg.transform.tolist(),
            rotation_deg=rotation_angle_deg(reg.transform),
            registration_failed=failed,
            review_reason=reason,
        )
