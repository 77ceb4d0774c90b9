"""``fused``: the golden-part comparison (``template``) and the local-feature bank (``patchcore-fpfh``) together.

Why: the two see different defects. The template's registered, tolerance-normalized deviation
sees a part that is wrong as a whole (a bend, a shallow bulge on a smooth face) that local
descriptors cannot; FPFH sees fine local geometry (a crack narrower than a voxel) that a 1 mm
reference blurs. Measured figures are in docs/results/template-fused.md.

How: at enrollment the good parts are split; the last ``validation_parts`` of them are the
validation split. Both components are fitted on the others and score the validation parts;
each component's scale is then the typical good value there: the mean object score for object
scores, the ``point_quantile`` quantile of all point scores for point maps. Then (``refit``)
both components are fitted again on all good parts. A part's fused object score is
``Σ_c w_c · object_c / scale_c`` and its point map ``Σ_c w_c · points_c / point_scale_c``: each
term says "how many times a typical good part", so the sum has one scale whatever the product.
The weights are parameters, fixed once on a validation seed, not per product. IMRNet is not a
component: on parts outside its pretraining it measured well below patchcore-fpfh (0.639 against
0.886 on the independent benchmark), so it would add mostly noise.

A template registration failure propagates: the object score becomes
``workers.template.FAILED_SCORE`` and the result carries ``registration_failed`` and a reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.patchcore import MemoryBankScorer
from workers.preprocess import PreparedCloud
from workers.scorer import Scorer, ScoreResult, register
from workers.template import FAILED_SCORE, TemplateScorer, TemplateScoreResult

COMPONENTS = ("template", "patchcore")


@register
class FusedScorer(Scorer):
    """Template deviation + PatchCore-FPFH, each normalized on good validation parts. See the module docstring."""

    name = "fused"
    version = "1.0.0"
    backends = ("torch-cpu", "torch-cuda")
    """The patchcore-fpfh component follows the backend; the template runs on the CPU."""

    def __init__(
        self,
        voxel_size: float = 1.0,
        template_weight: float = 1.0,
        patchcore_weight: float = 0.5,
        validation_parts: int = 1,
        point_quantile: float = 0.99,
        refit: bool = True,
        template: dict[str, Any] | None = None,
        patchcore: dict[str, Any] | None = None,
    ) -> None:
        if template_weight < 0 or patchcore_weight < 0 or template_weight + patchcore_weight <= 0:
            raise ValueError("the weights must be >= 0 and not both 0")
        if validation_parts < 1 or not 0.0 < point_quantile < 1.0:
            raise ValueError("validation_parts must be >= 1 and point_quantile in (0, 1)")
        self.voxel_size = float(voxel_size)
        self.template_weight = float(template_weight)
        self.patchcore_weight = float(patchcore_weight)
        self.validation_parts = int(validation_parts)
        self.point_quantile = float(point_quantile)
        self.refit = bool(refit)
        self.template_params = {"voxel_size": self.voxel_size, **(template or {})}
        self.patchcore_params = {"voxel_size": self.voxel_size, **(patchcore or {})}
        self.template = TemplateScorer(**self.template_params)
        self.patchcore = MemoryBankScorer(**self.patchcore_params)
        self.scales: np.ndarray | None = None
        """[template object, template point, patchcore object, patchcore point] typical good values."""

    # -- state ---------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {
            "voxel_size": self.voxel_size,
            "template_weight": self.template_weight,
            "patchcore_weight": self.patchcore_weight,
            "validation_parts": self.validation_parts,
            "point_quantile": self.point_quantile,
            "refit": self.refit,
            "template": {k: v for k, v in self.template.params().items() if k != "voxel_size"},
            "patchcore": {k: v for k, v in self.patchcore.params().items() if k != "voxel_size"},
        }

    def tensors(self) -> dict[str, np.ndarray]:
        if self.scales is None:
            raise RuntimeError("fused is not fitted: nothing to save")
        out = {"scales": self.scales.astype(np.float64)}
        out.update({f"template.{k}": v for k, v in self.template.tensors().items()})
        out.update({f"patchcore.{k}": v for k, v in self.patchcore.tensors().items()})
        return out

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> FusedScorer:
        if "scales" not in tensors:
            raise ValueError("fused state has no 'scales' tensor")
        scorer = cls(**params)

        def sub(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        scorer.template = TemplateScorer.from_state(scorer.template.params(), sub("template."))
        scorer.patchcore = MemoryBankScorer.from_state(scorer.patchcore.params(), sub("patchcore."))
        scales = np.asarray(tensors["scales"], dtype=np.float64).reshape(-1)
        if scales.shape != (4,) or not np.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError("fused state: 'scales' must be 4 positive finite values")
        scorer.scales = scales
        return scorer

    def use_backend(self, backend: str, cache_dir: Path | None = None) -> None:
        super().use_backend(backend, cache_dir)
        self.patchcore.use_backend(backend, cache_dir)

    @property
    def fitted(self) -> bool:
        return self.scales is not None

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
        self.patchcore.fit(train, progress)
        t_res = [self.template.score(c) for c in val]
        p_res = [self.patchcore.score(c) for c in val]
        q = self.point_quantile
        scales = np.array([
            np.mean([r.object_score for r in t_res]),
            np.quantile(np.concatenate([r.point_scores for r in t_res]), q),
            np.mean([r.object_score for r in p_res]),
            np.quantile(np.concatenate([r.point_scores for r in p_res]), q),
        ], dtype=np.float64)
        self.scales = np.where(np.isfinite(scales) & (scales > 1e-9), scales, 1.0)
        if self.refit:
            self.template.fit(clouds, progress)
            self.patchcore.fit(clouds, progress)

    def score(self, cloud: PreparedCloud) -> TemplateScoreResult:
        return self.score_many([cloud])[0]

    def score_many(self, clouds: Sequence[PreparedCloud]) -> list[TemplateScoreResult]:
        """Score a batch: the template part by part (a registration each), the patchcore
        component as one batch (``MemoryBankScorer.score_many``: one bank search for all)."""
        if self.scales is None:
            raise RuntimeError("fused is not fitted: call fit() or load an artifact first")
        t_res, t_s = [], []
        for cloud in clouds:
            t0 = time.perf_counter()
            t_res.append(self.template.score(cloud))
            t_s.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        p_res = self.patchcore.score_many(clouds)
        p_s = (time.perf_counter() - t1) / max(1, len(clouds))
        return [self.fuse(t, p, {"template": ts, "patchcore": p_s}) for t, p, ts in zip(t_res, p_res, t_s, strict=True)]

    def fuse(self, t: TemplateScoreResult, p: ScoreResult, stage_times: dict[str, float]) -> TemplateScoreResult:
        """One part's fused result from its two components' (see docs/design/fused.md;
        ``stage_times``: seconds per component)."""
        if self.scales is None:
            raise RuntimeError("fused is not fitted: call fit() or load an artifact first")
        s = self.scales
        assert s is not None
        obj = self.template_weight * t.object_score / s[0] + self.patchcore_weight * p.object_score / s[2]
        pts = (self.template_weight * t.point_scores.astype(np.float64) / s[1]
               + self.patchcore_weight * p.point_scores.astype(np.float64) / s[3])
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
