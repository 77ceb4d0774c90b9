"""The fitted IMRNet as one ``nn.Module``: the PMR network and, as buffers, what ``fit`` measured.

``net`` is the network (``workers.imrnet.network.IMRNet``); the buffers are the DFC feature
template, the training phase's (A_p, A_f) per template vector (``reference="patch"``), the pose
every cloud is registered to (``align="icp"``), the good parts' score statistics and two scalars
(the product scale and τ of the template regularization). ``state_dict()`` is the artifact: its
names (``net.*``, ``template``, ``template_ref``, ``align_reference``, ``score_stats``,
``scalars``) are the tensor names of a saved model; an optional buffer left empty is not saved.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from workers.imrnet.network import IMRNet, IMRNetConfig
from workers.imrnet.training import load_weights

OPTIONAL = ("template_ref", "align_reference")


class IMRNetModel(nn.Module):
    """The network with its template, reference scores, reference pose and score statistics."""

    template: torch.Tensor
    template_ref: torch.Tensor
    align_reference: torch.Tensor
    score_stats: torch.Tensor
    scalars: torch.Tensor

    def __init__(self, net: IMRNet | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("template", torch.zeros(0))
        """DFC features of every patch of the good parts' template reductions (Sec. 4.3)."""
        self.register_buffer("template_ref", torch.zeros(0))
        """Per template vector: the training phase's (A_p, A_f) of its patch; empty: none."""
        self.register_buffer("align_reference", torch.zeros(0))
        """The reduced first good cloud, the pose every cloud is registered to; empty: none."""
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
        """Mean and std of A_p, then of A_f, over the good training clouds."""
        self.register_buffer("scalars", torch.tensor([1.0, math.inf], dtype=torch.float64))
        """The product scale (clouds are divided by it) and τ of Eq. 19."""

    def tensors(self) -> dict[str, np.ndarray]:
        """The artifact's tensors: ``state_dict()`` on the host, empty optional buffers left out."""
        return {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()
                if not (k in OPTIONAL and v.numel() == 0)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], config: IMRNetConfig) -> IMRNetModel:
        """Rebuild a fitted model from :meth:`tensors` (strict: every weight of ``config``'s network)."""
        for key in ("template", "scalars", "score_stats"):
            if key not in tensors:
                raise ValueError(f"imrnet state has no {key!r} tensor")
        net = IMRNet(config)
        load_weights(net, tensors)
        model = cls(net.eval())

        def t(key: str, dtype: np.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(tensors[key], dtype=dtype))

        model.template = t("template", np.float32)
        model.scalars = t("scalars", np.float64).reshape(2)
        model.score_stats = t("score_stats", np.float64).reshape(4)
        for key in OPTIONAL:
            if key in tensors:
                setattr(model, key, t(key, np.float32))
        return model
