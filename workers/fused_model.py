"""The fitted ``fused`` model as one ``nn.Module``: its two component models and their scales.

``template`` (``workers.template.torch_model.TemplateModel``) and ``patchcore``
(``workers.patchcore.torch_model.PatchCoreModel``) are submodules, the four typical good values
that put them on one scale are the buffer ``scales`` ([template object, template point,
patchcore object, patchcore point]), so ``.to(device)`` moves all of it. The artifact keeps the
names it always had: ``scales`` (float64) and each component's own tensors under ``template.`` and
``patchcore.``. What the model computes is the fusion itself (:meth:`FusedModel.combine`); the
scorer (``workers.fused``) fits the components, measures the scales and scores parts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.patchcore.torch_model import PatchCoreModel
from workers.template.torch_model import TemplateModel


class FusedModel(nn.Module):
    """The template and patchcore-fpfh models, and the scales that normalize each one's scores."""

    scales: torch.Tensor

    def __init__(self, template: TemplateModel, patchcore: PatchCoreModel, scales: np.ndarray) -> None:
        super().__init__()
        s = np.asarray(scales, dtype=np.float64).reshape(-1)
        if s.shape != (4,) or not np.isfinite(s).all() or (s <= 0).any():
            raise ValueError("fused state: 'scales' must be 4 positive finite values")
        self.template = template
        self.patchcore = patchcore
        self.register_buffer("scales", torch.from_numpy(s.copy()))

    @property
    def scale_array(self) -> np.ndarray:
        """``scales`` as a float64 host array."""
        return self.scales.detach().cpu().numpy()

    def combine(self, t_object: float, t_points: np.ndarray, p_object: float, p_points: np.ndarray,
                template_weight: float, patchcore_weight: float) -> tuple[float, np.ndarray]:
        """(fused object score, fused point scores, float64): each component's score divided by its
        typical good value, weighted and summed, so the sum has one scale whatever the product."""
        s = self.scale_array
        obj = template_weight * t_object / s[0] + patchcore_weight * p_object / s[2]
        pts = (template_weight * t_points.astype(np.float64) / s[1]
               + patchcore_weight * p_points.astype(np.float64) / s[3])
        return float(obj), pts

    def tensors(self) -> dict[str, np.ndarray]:
        """The artifact's tensors: ``scales`` and each component's tensors under its prefix."""
        out = {"scales": self.scale_array.astype(np.float64)}
        out.update({f"template.{k}": v for k, v in self.template.tensors().items()})
        out.update({f"patchcore.{k}": v for k, v in self.patchcore.tensors().items()})
        return out
