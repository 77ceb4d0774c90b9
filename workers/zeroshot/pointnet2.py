"""A small PointNet++ (Qi et al., NeurIPS 2017) in plain torch: 3DzAL's patch encoder and classifier.

3DzAL (Sec. 3.2, 3.3) uses two PointNet++ networks on patches: the learned-feature network
f_θ (trained with the contrastive + disentanglement losses) and the normalcy classifier g_φ
(trained with BCE on normal vs. pseudo-abnormal patches), both "adapted to the input resolution"
of one 8×8 patch, i.e. 64 points.

Architecture (single-scale grouping, sized for CPU; the paper's widths are not given, its
networks have 6.8 M parameters each, ours ~22 k with the default ``width`` = 16):

* SA1: farthest-point sampling of ``npoint`` = 8 centres, ball query of radius 0.4 (in the
  normalized patch frame, see ``workers.zeroshot.patches.normalize_patches``), 16 neighbours,
  shared MLP 3 → w → w → 2w on the neighbours' offsets, max-pool;
* SA2: group-all, shared MLP (2w + 3) → 4w → 8w on the SA1 features and centres, max-pool;
* head: 8w → 4w → ``out_dim`` (ReLU between), no normalization layers (deterministic, and
  the same behaviour in training and at test time, where Eq. 8 back-propagates to the input).

Why so small: on 2 shared CPU cores one training step (128 patches) takes ~0.05 s at w = 16
with 8 SA1 centres, ~0.2 s at w = 32 with 16 (measured), and a leave-one-out evaluation trains
two networks per fold.

Everything is batched over patches; FPS loops over its ``npoint`` picks, never over points.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["farthest_point_sample", "ball_query", "PointNet2"]


def farthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """Indices (B×npoint) of farthest-point samples of every cloud in ``xyz`` (B×N×3).

    Deterministic: each cloud starts from its point farthest from its centroid.
    """
    b, n, _ = xyz.shape
    npoint = min(npoint, n)
    idx = torch.empty(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device)
    far = ((xyz - xyz.mean(dim=1, keepdim=True)) ** 2).sum(-1).argmax(dim=1)
    rows = torch.arange(b, device=xyz.device)
    for i in range(npoint):
        idx[:, i] = far
        d = ((xyz - xyz[rows, far].unsqueeze(1)) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.argmax(dim=1)
    return idx


def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, nsample: int) -> torch.Tensor:
    """Indices (B×S×nsample) of up to ``nsample`` points of ``xyz`` (B×N×3) within ``radius`` of
    each centre (B×S×3), the nearest first; slots left empty repeat the nearest point (the
    centre itself when centres are points of ``xyz``), as in PointNet++.
    """
    d = torch.cdist(centres, xyz)  # B×S×N
    k = min(nsample, xyz.shape[1])
    dk, ik = torch.topk(d, k, dim=-1, largest=False, sorted=True)
    return torch.where(dk <= radius, ik, ik[..., :1].expand_as(ik))


class SharedMLP(nn.Sequential):
    def __init__(self, channels: list[int]) -> None:
        layers: list[nn.Module] = []
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers)


class PointNet2(nn.Module):
    """PointNet++ SSG over B×N×3 patches → B×out_dim (see the module docstring)."""

    def __init__(
        self,
        out_dim: int,
        npoint: int = 8,
        radius: float = 0.4,
        nsample: int = 16,
        width: int = 16,
    ) -> None:
        super().__init__()
        self.npoint, self.radius, self.nsample = int(npoint), float(radius), int(nsample)
        w = int(width)
        self.sa1 = SharedMLP([3, w, w, 2 * w])
        self.sa2 = SharedMLP([2 * w + 3, 4 * w, 8 * w])
        self.head = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, out_dim))

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        b = xyz.shape[0]
        rows = torch.arange(b, device=xyz.device)[:, None]
        fps = farthest_point_sample(xyz, self.npoint)
        centres = xyz[rows, fps]  # B×S×3
        group = ball_query(xyz, centres, self.radius, self.nsample)  # B×S×K
        local = xyz[rows[:, :, None], group] - centres.unsqueeze(2)  # B×S×K×3
        f1 = self.sa1(local).amax(dim=2)  # B×S×2w
        f2 = self.sa2(torch.cat([f1, centres], dim=-1)).amax(dim=1)  # B×8w
        return self.head(f2)
