"""``fused-defects``: the ``fused`` scorer plus a head that learns from operator-confirmed defects.

Fitted on good parts it is exactly ``fused`` (the defect bank is empty, the head adds nothing).
``fit_defects`` then takes confirmed-defect parts (``workers.confirmed``, from the label store)
with their marked regions and fills the defect bank of ``workers.defect_head``; from then on a
part that resembles a confirmed defect scores higher. ``inspectd enroll --scorer fused-defects
--defects DIR`` does both. The bank is part of the artifact (``defects.bank`` in
``model.safetensors``), the head's parameters are in ``meta.json``; nothing is pickled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from workers.components.memory_bank import MemoryBank
from workers.defect_head import HeadParams, bank_entries, descriptors, evidence, voxel_mask
from workers.fused import FusedParams, FusedScorer
from workers.params import infer_field
from workers.preprocess import PreparedCloud
from workers.template import TemplateScoreResult

BANK_KEY = "defects.bank"


class FusedDefectsParams(FusedParams):
    """Parameters of ``fused-defects``: those of ``fused`` and the defect head's."""

    defect_head: dict[str, Any] = infer_field({}, "Parameters of the defect head (workers.defect_head.HeadParams: "
                                              "weight, radius, base_power, ...); empty: the defaults.")


class FusedDefectsScorer(FusedScorer):
    """``fused`` + the defect-aware head of ``workers.defect_head``. See the module docstring."""

    name = "fused-defects"
    version = "1.0.0"

    Params = FusedDefectsParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.head = HeadParams(**self.hparams.defect_head)
        self.defect_bank = np.zeros((0, 34), np.float32)
        self.n_confirmed = 0
        self._bank: MemoryBank | None = None
        """``defect_bank`` ready to search (built on first use)."""

    # -- state ---------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {**super().params(), "defect_head": asdict(self.head)}

    def tensors(self) -> dict[str, np.ndarray]:
        return {**super().tensors(), BANK_KEY: self.defect_bank.astype(np.float32)}

    @classmethod
    def from_state(cls, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> FusedDefectsScorer:
        if BANK_KEY not in tensors:
            raise ValueError(f"fused-defects state has no {BANK_KEY!r} tensor")
        bank = np.asarray(tensors[BANK_KEY], np.float32)
        if bank.ndim != 2 or not np.isfinite(bank).all():
            raise ValueError(f"fused-defects state: {BANK_KEY!r} must be a finite 2-D array")
        scorer = super().from_state(params, {k: v for k, v in tensors.items() if k != BANK_KEY})
        assert isinstance(scorer, FusedDefectsScorer)
        scorer.defect_bank = bank
        scorer._bank = None
        return scorer

    # -- fit / score ---------------------------------------------------------------------------

    def describe(self, cloud: PreparedCloud) -> tuple[TemplateScoreResult, np.ndarray]:
        """The fused result and the per-point head descriptors of ``cloud`` (one FPFH pass)."""
        if self.scales is None:
            raise RuntimeError("fused-defects is not fitted: call fit() or load an artifact first")
        t0 = time.perf_counter()
        t = self.template.score(cloud)
        t1 = time.perf_counter()
        coarse, voxel_of = self.coarse(cloud)
        feat = self.patchcore.features_t(coarse)
        p = self.patchcore.score_features(coarse, feat)
        if voxel_of is not None:  # back onto the part's own points
            p.point_scores = p.point_scores[voxel_of]
            feat = feat[torch.from_numpy(voxel_of).to(feat.device)]
        t2 = time.perf_counter()
        base = self.fuse(t, p, {"template": t1 - t0, "patchcore": t2 - t1})
        desc = descriptors(feat.cpu().numpy(), t.point_scores, self.scales[3], self.scales[1])
        return base, desc

    def fit_defects(self, clouds: Sequence[PreparedCloud], point_masks: Sequence[np.ndarray | None]) -> int:
        """Fill the defect bank from confirmed-defect ``clouds`` (``point_masks``: each frame's marked
        region, one bool per input point, or None); returns the number of bank entries."""
        if len(clouds) != len(point_masks):
            raise ValueError("one mask (or None) per confirmed-defect cloud")
        entries = []
        for cloud, mask in zip(clouds, point_masks, strict=True):
            base, desc = self.describe(cloud)
            region = None if mask is None else voxel_mask(cloud.source_flat, cloud.voxel_of_source, len(cloud.points), mask)
            entries.append(bank_entries(desc, base.point_scores, region, self.head))
        width = self.defect_bank.shape[1] if not entries else entries[0].shape[1]
        self.defect_bank = np.concatenate(entries, axis=0) if entries else np.zeros((0, width), np.float32)
        self.n_confirmed = len(clouds)
        self._bank = None
        return len(self.defect_bank)

    def score(self, cloud: PreparedCloud) -> TemplateScoreResult:
        base, desc = self.describe(cloud)
        if len(self.defect_bank) == 0 or base.registration_failed:
            return self.dilate(base, cloud)
        t0 = time.perf_counter()
        if self._bank is None:
            self._bank = MemoryBank(self.defect_bank)
        gain, point_gain = evidence(cloud.points, desc, base.point_scores, self._bank, self.head)
        base.object_score = float(base.object_score + gain)
        base.point_scores = (base.point_scores + point_gain).astype(np.float32)
        base.timings["defect_head"] = time.perf_counter() - t0
        return self.dilate(base, cloud)

    def score_many(self, clouds: Sequence[PreparedCloud]) -> list[TemplateScoreResult]:
        """Part by part: the head's evidence is per part (``fused``'s batched path has no head)."""
        return [self.score(c) for c in clouds]
