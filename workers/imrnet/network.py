"""The IMRNet point-patch mask reconstruction network (PMR, Li et al., CVPR 2024, Sec. 4.2).

Point-MAE (Pang et al., ECCV 2022) style, as Sec. 5.3 says the backbone is "directly adopted from
Point-MAE":

* **Tokens** (Eq. 10): a mini-PointNet per patch (shared MLP → max-pool → concat the pooled
  feature to every point → shared MLP → max-pool), as Point-MAE's ``Encoder``.
* **Positional embedding** of the patch centres: a 2-layer MLP (3 → 128 → d, GELU).
* **Asymmetric encoder / decoder** (Eq. 11): pre-norm transformer blocks; the encoder sees only the
  visible tokens, the decoder sees the encoded visible tokens plus one shared learned mask token
  per masked patch; the centre embedding is added before every block (Point-MAE).
* **Prediction head**: one fully connected layer from the last decoder layer's tokens to the
  ``k × 3`` coordinates of the masked patches (Eq. 11, "a simple fully connected layer").
* **Loss** (Eq. 12): L2 Chamfer distance between each predicted and ground-truth masked patch,
  averaged over patches (Point-MAE's ``ChamferDistanceL2``: mean of both directed terms).
* **Features for DFC** (Sec. 4.3, Eqs. 16–17): the outputs of decoder layers 1, 2, 3 for an
  *unmasked* cloud (all tokens visible, no mask token), each layer normalized by a parameter-free
  layer norm (so the three layers weigh alike in Eq. 18's distance) and concatenated.

Pure ``torch.nn``; grouping, kNN and mask index selection happen outside the module, so the two
inference graphs (:meth:`IMRNet.reconstruct`, :meth:`IMRNet.features`) export to ONNX with plain
MatMul / Softmax / Gelu / LayerNorm / ReduceMax ops (see ``workers.imrnet.onnx_export``).

Choices: BatchNorm in the mini-PointNet as Point-MAE (it folds into an affine op at inference);
no dropout / drop-path (few-shot fine-tuning on 4 parts, CPU budget); attention written out
(q·kᵀ/√d, softmax) instead of ``scaled_dot_product_attention`` for a clean ONNX graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class IMRNetConfig:
    """Sizes of the network and of its point patches.

    CPU default (``small``): 2048 points per cloud, 128 centres × 32 neighbours (patches cover the
    cloud twice, like the paper's 8192 points in 256 × 64 patches), width 128, 4 heads,
    4 encoder and 3 decoder layers (DFC reads decoder layers 1–3, so the decoder needs 3),
    MLP ratio 4, mini-PointNet widths 64/128 then 256: 1.54 M parameters (3.1 MB in float16),
    one training step on a batch of 8 clouds takes ~0.5 s on one (shared) CPU core; the
    mini-PointNet over 8 × 128 × 32 points dominates. :meth:`paper` gives the paper's sizes
    (Point-MAE: 8192 points, 256 × 64, width 384, 6 heads, 12 encoder / 4 decoder layers).
    """

    n_points: int = 2048
    n_centers: int = 128
    group_size: int = 32
    dim: int = 128
    heads: int = 4
    enc_depth: int = 4
    dec_depth: int = 3
    mlp_ratio: float = 4.0
    embed_hidden: int = 64
    """Width of the mini-PointNet's first shared MLP (its second one is twice that)."""
    feature_layers: tuple[int, ...] = (1, 2, 3)
    """Decoder layers (1-based) whose outputs DFC compares (Sec. 5.3: 1st, 2nd and 3rd)."""

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError("dim must be a multiple of heads")
        if self.group_size < 1 or self.n_centers < 2 or self.n_points < self.group_size:
            raise ValueError("need n_centers >= 2 and n_points >= group_size >= 1")
        if not self.feature_layers or max(self.feature_layers) > self.dec_depth or min(self.feature_layers) < 1:
            raise ValueError("feature_layers must be 1-based decoder layer numbers <= dec_depth")

    @classmethod
    def paper(cls) -> IMRNetConfig:
        return cls(n_points=8192, n_centers=256, group_size=64, dim=384, heads=6, enc_depth=12, dec_depth=4,
                   embed_hidden=128)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IMRNetConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "feature_layers" in kw:
            kw["feature_layers"] = tuple(int(x) for x in kw["feature_layers"])
        return cls(**kw)

    @property
    def feature_dim(self) -> int:
        return self.dim * len(self.feature_layers)


class PatchEmbed(nn.Module):
    """Mini-PointNet (Eq. 10): a patch of k points (B×n×k×3) → one token (B×n×d)."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2 * hidden)
        self.fc3 = nn.Linear(4 * hidden, 4 * hidden)
        self.bn3 = nn.BatchNorm1d(4 * hidden)
        self.fc4 = nn.Linear(4 * hidden, dim)

    def forward(self, neigh: torch.Tensor) -> torch.Tensor:
        b, n, k, _ = neigh.shape
        x = neigh.reshape(b * n * k, 3)
        x = self.fc2(F.relu(self.bn1(self.fc1(x))))  # (bnk, 2h)
        x = x.reshape(b * n, k, -1)
        g = x.max(dim=1, keepdim=True).values.expand(-1, k, -1)
        x = torch.cat([g, x], dim=2).reshape(b * n * k, -1)
        x = self.fc4(F.relu(self.bn3(self.fc3(x))))
        return x.reshape(b * n, k, -1).max(dim=1).values.reshape(b, n, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block (ViT / Point-MAE)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class IMRNet(nn.Module):
    """Tokens + centre embedding → encoder (visible) → decoder (+ mask tokens) → head."""

    def __init__(self, config: IMRNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or IMRNetConfig()
        self.config = cfg
        self.embed = PatchEmbed(cfg.dim, cfg.embed_hidden)
        self.enc_pos = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, cfg.dim))
        self.dec_pos = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, cfg.dim))
        self.encoder = nn.ModuleList([Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth)])
        self.enc_norm = nn.LayerNorm(cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.decoder = nn.ModuleList([Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth)])
        self.dec_norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 3 * cfg.group_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # -- building blocks --------------------------------------------------------------------------

    def encode(self, neigh: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Visible patches (B×n×k×3) and their centres (B×n×3) → encoded tokens (B×n×d)."""
        x = self.embed(neigh)
        pos = self.enc_pos(centers)
        for blk in self.encoder:
            x = blk(x + pos)
        return self.enc_norm(x)

    def decode(self, x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decoder over tokens x (B×n×d) at ``centers``: (final normed tokens, per-layer outputs)."""
        pos = self.dec_pos(centers)
        layers = []
        for blk in self.decoder:
            x = blk(x + pos)
            layers.append(x)
        return self.dec_norm(x), layers

    # -- the two inference graphs ----------------------------------------------------------------

    def reconstruct(self, neigh_vis: torch.Tensor, center_vis: torch.Tensor, center_mask: torch.Tensor) -> torch.Tensor:
        """Eq. 11: predicted masked patches (B×m×k×3, relative to their centres) from the visible ones."""
        b, m = center_mask.shape[0], center_mask.shape[1]
        x_vis = self.encode(neigh_vis, center_vis)
        mask_tok = self.mask_token.expand(b, m, -1)
        x = torch.cat([x_vis, mask_tok], dim=1)
        centers = torch.cat([center_vis, center_mask], dim=1)
        y, _ = self.decode(x, centers)
        n_vis = center_vis.shape[1]
        pred = self.head(y[:, n_vis:])
        return pred.reshape(b, m, self.config.group_size, 3)

    def features(self, neigh: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Eqs. 16–17: decoder layers (1, 2, 3) of an unmasked cloud, layer-normed, concatenated (B×n×3d)."""
        x = self.encode(neigh, centers)
        _, layers = self.decode(x, centers)
        d = self.config.dim
        feats = [F.layer_norm(layers[i - 1], (d,)) for i in self.config.feature_layers]
        return torch.cat(feats, dim=2)

    def forward(
        self, neigh: torch.Tensor, centers: torch.Tensor, vis_idx: torch.Tensor, mask_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: (predicted masked patches, their ground truth), both B×m×k×3."""
        nv, c = gather_patches(neigh, centers, vis_idx)
        nm, cm = gather_patches(neigh, centers, mask_idx)
        return self.reconstruct(nv, c, cm), nm


def gather_patches(neigh: torch.Tensor, centers: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Select patches ``idx`` (B×m) from neighbourhoods (B×n×k×3) and centres (B×n×3)."""
    rows = torch.arange(neigh.shape[0]).unsqueeze(1)
    return neigh[rows, idx], centers[rows, idx]


def random_mask(
    batch: int, n: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random masking (Sec. 4.2): (visible indices B×(n−m), masked indices B×m), ``m = round(ratio·n)``.

    At least one patch stays visible and at least one is masked.
    """
    m = mask_count(n, ratio)
    perm = torch.rand(batch, n, generator=generator).argsort(dim=1)
    return perm[:, m:], perm[:, :m]


def mask_count(n: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise ValueError("mask ratio must be in (0, 1)")
    return int(min(max(round(ratio * n), 1), n - 1))


def chamfer_l2(a: torch.Tensor, b: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Eq. 12: L2 Chamfer distance between point sets a (…×p×3) and b (…×q×3), batched.

    ``mean_a min_b ‖a−b‖² + mean_b min_a ‖a−b‖²`` per set; averaged over the leading dims when
    ``reduce``. Exactly 0 for identical sets.
    """
    d = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(dim=-1)
    per_set = d.min(dim=-1).values.mean(dim=-1) + d.min(dim=-2).values.mean(dim=-1)
    return per_set.mean() if reduce else per_set


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
