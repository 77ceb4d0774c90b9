"""``fused``: ``template`` and ``patchcore-fpfh``, each normalized on held-out good parts, summed.
The fitted state is ``workers.fused_model.FusedModel`` (both component models and the scales);
this scorer fits the components, measures the scales and scores parts. Design and measured
choices: docs/design/fused.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import model_validator

from workers.base import Scorer, ScoreResult
from workers.components.knn import max_over_neighbours
from workers.fused_model import FusedModel
from workers.params import ScorerParams, fit_field, infer_field
from workers.patchcore import PatchCoreFPFHScorer
from workers.preprocess import PreparedCloud, voxel_downsample
from workers.template import FAILED_SCORE, TemplateScorer, TemplateScoreResult

COMPONENTS = ("template", "patchcore")


class FusedParams(ScorerParams):
    """Parameters of ``fused`` (design: docs/design/fused.md)."""

    validation_parts: int = fit_field(1, "Good parts held out of the first fit to measure each component's "
                                      "typical good score.", ge=1)
    point_quantile: float = fit_field(0.99, "Quantile of the validation parts' point scores that is a "
                                      "component's point scale.", gt=0, lt=1)
    refit: bool = fit_field(True, "Fit both components again on all good parts after the scales are measured.")
    template: dict[str, Any] = fit_field({}, "Parameters of the template component (voxel_size excepted).")
    patchcore: dict[str, Any] = fit_field({}, "Parameters of the patchcore-fpfh component (voxel_size excepted).")
    patchcore_voxel_factor: float = fit_field(
        1.5, "The patchcore-fpfh component describes the part at this many voxels: its cloud is the part's "
        "points downsampled again to voxel_size × this (its radii, in voxels, grow with it), and each point "
        "takes the score of the coarse voxel it falls in.", ge=1)
    template_weight: float = infer_field(1.0, "Weight of the template's normalized scores.", ge=0)
    patchcore_weight: float = infer_field(0.5, "Weight of patchcore-fpfh's normalized scores.", ge=0)
    map_dilate_k: int = infer_field(16, "The point map takes at each point the largest fused score of its this "
                                    "many nearest points (itself included; 1: none). The object score is not "
                                    "taken from the map, so it does not change.", ge=1)

    @model_validator(mode="after")
    def _some_weight(self) -> FusedParams:
        if self.template_weight + self.patchcore_weight <= 0:
            raise ValueError("template_weight and patchcore_weight must not both be 0")
        return self


class FusedScorer(Scorer):
    """Template deviation + PatchCore-FPFH, each normalized on good validation parts. See the module docstring."""

    name = "fused"
    version = "1.0.0"
    backends = ("torch-cpu", "torch-cuda")
    """The patchcore-fpfh component follows the backend; the template runs on the CPU."""

    Params = FusedParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.template_params = {"voxel_size": self.voxel_size, **self.hparams.template}
        self.patchcore_params = {"voxel_size": self.voxel_size * self.patchcore_voxel_factor,
                                 **self.hparams.patchcore}
        self.template = TemplateScorer(**self.template_params)
        self.patchcore = PatchCoreFPFHScorer(**self.patchcore_params)
        self.model: FusedModel | None = None
        """Both component models and their scales (``workers.fused_model``), set by fit or load."""

    # -- state ---------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "template": {k: v for k, v in self.template.params().items() if k != "voxel_size"},
            "patchcore": {k: v for k, v in self.patchcore.params().items() if k != "voxel_size"},
        }

    def coarse(self, cloud: PreparedCloud) -> tuple[PreparedCloud, np.ndarray | None]:
        """The cloud the patchcore component sees and, when it is coarser than ``cloud``, the coarse
        voxel of each of ``cloud``'s points (``None``: the same cloud)."""
        if self.patchcore_voxel_factor == 1.0:
            return cloud, None
        pts, voxel_of = voxel_downsample(np.asarray(cloud.points), self.patchcore.voxel_size)
        return PreparedCloud(points=pts, source_flat=np.arange(len(voxel_of)), voxel_of_source=voxel_of), voxel_of

    def patchcore_score_many(self, clouds: Sequence[PreparedCloud]) -> list[ScoreResult]:
        """The patchcore component's results on ``clouds``, its point scores on their own points."""
        coarse = [self.coarse(c) for c in clouds]
        results = self.patchcore.score_many([c for c, _ in coarse])
        for r, (_, voxel_of) in zip(results, coarse, strict=True):
            if voxel_of is not None:
                r.point_scores = r.point_scores[voxel_of]
        return results

    def tensors(self) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("fused is not fitted: nothing to save")
        return self.model.tensors()

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> FusedScorer:
        if "scales" not in tensors:
            raise ValueError("fused state has no 'scales' tensor")
        # an artifact fitted before the factor existed describes the part at its own voxels
        scorer = cls(**{"patchcore_voxel_factor": 1.0, **params})

        def sub(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        scorer.template = TemplateScorer.from_state(scorer.template.params(), sub("template."))
        scorer.patchcore = PatchCoreFPFHScorer.from_state(scorer.patchcore.params(), sub("patchcore."))
        scorer._set_model(np.asarray(tensors["scales"], dtype=np.float64))
        return scorer

    def _set_model(self, scales: np.ndarray) -> None:
        """Hold the fused model of the two fitted components and ``scales``."""
        if self.template.model is None or self.patchcore.model is None:
            raise RuntimeError("fused: both components must be fitted first")
        self.model = FusedModel(self.template.model, self.patchcore.model, scales)

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        super().use_backend(backend, cache_dir)
        self.patchcore.use_backend(backend, cache_dir)

    @property
    def fitted(self) -> bool:
        return self.model is not None

    @property
    def scales(self) -> np.ndarray | None:
        """[template object, template point, patchcore object, patchcore point] typical good values."""
        return None if self.model is None else self.model.scale_array

    @property
    def batches(self) -> bool:
        """Batching shares work in the patchcore component only: it follows that component's device."""
        return self.patchcore.batches

    @property
    def memory_bank_size(self) -> int:
        return self.patchcore.memory_bank_size

    # -- fit / score ---------------------------------------------------------------------------

    def fit(self, clouds: Sequence[PreparedCloud], progress: bool = False) -> None:
        if len(clouds) < 2:
            raise ValueError("fused needs at least 2 good training clouds (one is held out to normalize)")
        n_val = min(self.validation_parts, len(clouds) - 1)
        train, val = list(clouds[:-n_val]), list(clouds[-n_val:])
        self.template.fit(train, progress)
        self.patchcore.fit([self.coarse(c)[0] for c in train], progress)
        t_res = [self.template.score(c) for c in val]
        p_res = self.patchcore_score_many(val)
        q = self.point_quantile
        scales = np.array([
            np.median([r.object_score for r in t_res]),
            np.quantile(np.concatenate([r.point_scores for r in t_res]), q),
            np.median([r.object_score for r in p_res]),
            np.quantile(np.concatenate([r.point_scores for r in p_res]), q),
        ], dtype=np.float64)
        scales = np.where(np.isfinite(scales) & (scales > 1e-9), scales, 1.0)
        if self.refit:
            self.template.fit(clouds, progress)
            self.patchcore.fit([self.coarse(c)[0] for c in clouds], progress)
        self._set_model(scales)

    def score(self, cloud: PreparedCloud) -> TemplateScoreResult:
        return self.score_many([cloud])[0]

    def score_many(self, clouds: Sequence[PreparedCloud]) -> list[TemplateScoreResult]:
        """Score a batch: the template part by part (a registration each), the patchcore
        component as one batch (``PatchCoreFPFHScorer.score_many``: one bank search for all)."""
        if self.model is None:
            raise RuntimeError("fused is not fitted: call fit() or load an artifact first")
        t_res, t_s = [], []
        for cloud in clouds:
            t0 = time.perf_counter()
            t_res.append(self.template.score(cloud))
            t_s.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        p_res = self.patchcore_score_many(clouds)
        p_s = (time.perf_counter() - t1) / max(1, len(clouds))
        return [self.dilate(self.fuse(t, p, {"template": ts, "patchcore": p_s}), cloud)
                for t, p, ts, cloud in zip(t_res, p_res, t_s, clouds, strict=True)]

    def dilate(self, result: TemplateScoreResult, cloud: PreparedCloud) -> TemplateScoreResult:
        """``result`` with its point map dilated over ``map_dilate_k`` neighbours, in place.

        Why: a defect's ground truth, and what an operator needs marked, is wider than where the
        components fire: a hole's score sits on its rim points, a crack's on the floor of its
        groove, while the damaged region runs some millimetres around them. A dilation over 16
        neighbours (about 2 voxels) lifted P-AUROC and AUPRO on both point-cloud layouts of the
        bench preset's tuning seed (docs/design/fused.md, "A wider map")."""
        if self.map_dilate_k > 1:
            result.point_scores = max_over_neighbours(result.point_scores, cloud.neighbours(self.map_dilate_k))
        return result

    def fuse(self, t: TemplateScoreResult, p: ScoreResult, stage_times: dict[str, float]) -> TemplateScoreResult:
        """One part's fused result from its two components' (see docs/design/fused.md;
        ``stage_times``: seconds per component)."""
        if self.model is None:
            raise RuntimeError("fused is not fitted: call fit() or load an artifact first")
        obj, pts = self.model.combine(t.object_score, t.point_scores, p.object_score, p.point_scores,
                                      self.template_weight, self.patchcore_weight)
        if t.registration_failed:
            obj = FAILED_SCORE
        timings = {f"template_{k}": v for k, v in t.timings.items()}
        timings.update({f"patchcore_{k}": v for k, v in p.timings.items()})
        timings.update(stage_times)
        return TemplateScoreResult(
            object_score=float(obj),
            point_scores=pts.astype(np.float32),
            timings=timings,
            registration_fitness=t.registration_fitness,
            registration_rmse=t.registration_rmse,
            pose=t.pose,
            rotation_deg=t.rotation_deg,
            registration_failed=t.registration_failed,
            review_reason=t.review_reason,
        )
