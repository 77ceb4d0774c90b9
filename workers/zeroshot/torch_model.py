"""The fitted 3DzAL model as one ``nn.Module``: networks, memory bank and scales together.

f_θ (``encoder``), g_φ (``classifier``) and the optional RGB backbone (``rgb``) are submodules;
the memory bank and the numbers that put its feature blocks on one scale are buffers, so
``.to(device)`` moves all of it and ``state_dict()`` is the artifact (its names are the
artifact's tensor names: ``encoder.*``, ``classifier.*``, ``rgb.*``, ``memory_bank``,
``block_scale``, ``fpfh_mean``, ``dist_scale``, ``patch_scale``). What the model computes here
is only what needs its fitted state: the network input scaling, the combined feature of a patch,
its distance to the bank and PatchCore's reweighting. The scorer (``workers.zeroshot.scorer``)
cuts patches, fits, picks backends and maps scores back to points.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.components.memory_bank import MemoryBank
from workers.zeroshot.patches import normalize_patches
from workers.zeroshot.pointnet2 import PointNet2
from workers.zeroshot.resnet import ResNet50

FEATURE_DIM = 33
"""The learned feature has the FPFH's dimension so that Eq. 2's cosine is defined."""
BUFFERS = ("memory_bank", "block_scale", "fpfh_mean", "dist_scale", "patch_scale")


class ZeroShotModel(nn.Module):
    """f_θ, g_φ, the RGB backbone (each optional) and the memory bank with its block scales."""

    memory_bank: torch.Tensor
    block_scale: torch.Tensor
    fpfh_mean: torch.Tensor
    dist_scale: torch.Tensor
    patch_scale: torch.Tensor

    def __init__(self, encoder: PointNet2 | None = None, classifier: PointNet2 | None = None,
                 rgb: ResNet50 | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.rgb = rgb
        self.register_buffer("memory_bank", torch.zeros(0, 0))
        self.register_buffer("block_scale", torch.ones(self.n_blocks))
        self.register_buffer("fpfh_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("dist_scale", torch.ones(1))
        self.register_buffer("patch_scale", torch.ones(1))
        self._search: tuple[torch.Tensor, MemoryBank] | None = None

    @property
    def n_blocks(self) -> int:
        """Feature blocks of a patch: FPFH, then the learned one and the RGB one when present."""
        return 1 + int(self.encoder is not None) + int(self.rgb is not None)

    @property
    def fitted(self) -> bool:
        return self.memory_bank.numel() > 0

    @property
    def bank(self) -> MemoryBank:
        """The bank's exact search on the bank's device (built once per bank tensor)."""
        if self._search is None or self._search[0] is not self.memory_bank:
            self._search = (self.memory_bank, MemoryBank(self.memory_bank.cpu().numpy(), self.memory_bank.device))
        return self._search[1]

    def normalize(self, xyz: np.ndarray | torch.Tensor, fixed: bool) -> torch.Tensor:
        """Network input: each patch centred and divided by the training patches' median radius
        (``fixed``), or into its own unit ball."""
        return normalize_patches(xyz, float(self.patch_scale) if fixed else None)

    def combine(self, blocks: list[torch.Tensor], learned_weight: float) -> torch.Tensor:
        """The blocks (FPFH, learned, RGB as present) on one scale and concatenated: a bank feature."""
        weights = [1.0] + ([learned_weight] if self.encoder is not None else []) + ([1.0] if self.rgb is not None else [])
        scales = self.block_scale.tolist()
        return torch.cat([b / float(s) * w for b, s, w in zip(blocks, scales, weights, strict=True)], dim=1).float()

    def distances(self, features: torch.Tensor, reweight_neighbors: int) -> tuple[torch.Tensor, float]:
        """(distance of each feature to the bank / ``dist_scale``, on the features' device;
        PatchCore's weight of the farthest one)."""
        bank = self.bank
        q = bank.centre(features)
        dist = (bank.nearest_distances(q) / float(self.dist_scale)).to(features.device)
        w = bank.reweight(q[int(torch.argmax(dist))], reweight_neighbors)
        return dist.float(), w

    def tensors(self) -> dict[str, np.ndarray]:
        """The artifact's tensors: ``state_dict()`` on the host."""
        return {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], width: int) -> ZeroShotModel:
        """Rebuild a fitted model from :meth:`tensors` (PointNet++ ``width`` from the params)."""
        for key in BUFFERS[:4]:
            if key not in tensors:
                raise ValueError(f"zeroshot state has no {key!r} tensor")

        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith(prefix)}

        enc, clf, rgb = sub("encoder."), sub("classifier."), sub("rgb.")
        encoder = PointNet2(FEATURE_DIM, width=width) if enc else None
        classifier = PointNet2(2, width=width) if clf else None
        backbone = None
        if rgb:
            backbone = ResNet50(width_per_group=int(rgb["layer1.0.conv1.weight"].shape[0]))
            backbone.layer4 = nn.Sequential()  # as fitted: the features stop at layer3
            backbone.fc = nn.Identity()  # type: ignore[assignment]
        model = cls(encoder, classifier, backbone)
        n_scales = int(np.asarray(tensors["block_scale"]).size)
        if n_scales != model.n_blocks:
            raise ValueError(f"zeroshot state: {n_scales} block scales for {model.n_blocks} feature blocks")
        state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
        state.setdefault("patch_scale", torch.ones(1))
        state["memory_bank"] = torch.from_numpy(np.ascontiguousarray(tensors["memory_bank"], dtype=np.float32))
        MemoryBank(state["memory_bank"].numpy())  # refuses an empty or non-finite bank
        model.memory_bank = state["memory_bank"]  # the buffer takes the bank's shape
        model.load_state_dict(state, strict=True)
        return model.eval()
