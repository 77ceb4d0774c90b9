"""The fitted PatchCore-FPFH model as one ``nn.Module``: the memory bank as a buffer, and its search.

The bank (K×33 FPFH features kept by the coreset) is the buffer ``memory_bank``, so ``.to(device)``
moves it and ``state_dict()`` is the artifact (one tensor, ``memory_bank``, the name saved models
have always used). What the model computes is only what needs the bank: every feature's distance
to its nearest bank element (:meth:`PatchCoreModel.forward`) and PatchCore's reweighting of the
maximal feature (:meth:`PatchCoreModel.reweight`). The scorer (``workers.patchcore.scorer``)
computes features, fits the coreset, smooths and maps scores back to points.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.components.memory_bank import MemoryBank


class PatchCoreModel(nn.Module):
    """The FPFH memory bank (a buffer) with its exact nearest-neighbour search and reweighting."""

    memory_bank: torch.Tensor

    def __init__(self, bank: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("memory_bank", torch.zeros(0, 0))
        self._search: tuple[torch.Tensor, MemoryBank] | None = None
        if bank is not None:
            arr = np.ascontiguousarray(torch.as_tensor(bank).cpu().numpy(), dtype=np.float32)
            self.memory_bank = torch.from_numpy(MemoryBank(arr).array)  # refuses an empty or non-finite bank

    @property
    def fitted(self) -> bool:
        return self.memory_bank.numel() > 0

    def __len__(self) -> int:
        return int(self.memory_bank.shape[0]) if self.fitted else 0

    @property
    def bank(self) -> MemoryBank:
        """The bank's exact search (centred copy, transposed copy, norms) on the buffer's device,
        built once per bank tensor: a ``.to(device)`` gives a new tensor and so a new search."""
        if not self.fitted:
            raise RuntimeError("patchcore-fpfh is not fitted: call fit() or load an artifact first")
        if self._search is None or self._search[0] is not self.memory_bank:
            self._search = (self.memory_bank, MemoryBank(self.memory_bank.cpu().numpy(), self.memory_bank.device))
        return self._search[1]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``features`` centred on the bank mean, on the bank's device; the distance of each to
        its nearest bank element). The centred features feed :meth:`reweight`."""
        bank = self.bank
        q = bank.centre(features)
        return q, bank.nearest_distances(q)

    def reweight(self, centred_feature: torch.Tensor, neighbors: int) -> float:
        """PatchCore's weight of the maximal point's centred feature (1 when ``neighbors <= 1``)."""
        return self.bank.reweight(centred_feature, neighbors)

    def tensors(self) -> dict[str, np.ndarray]:
        """The artifact's tensors: ``state_dict()`` on the host (``memory_bank``)."""
        return {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> PatchCoreModel:
        """Rebuild a fitted model from :meth:`tensors`."""
        if "memory_bank" not in tensors:
            raise ValueError("patchcore-fpfh state has no 'memory_bank' tensor")
        return cls(tensors["memory_bank"]).eval()
