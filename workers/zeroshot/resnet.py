"""ResNet-50 in plain torch: the untrained, He-initialized CNN of 3DzAL's pseudo-anomaly module,
and the optional ImageNet RGB branch.

Paper: "Towards Zero-shot 3D Anomaly Localization" (3DzAL), Sec. 3.2 "Pseudo anomaly generation
with inductive bias": an untrained ResNet-50, randomly initialized with He initialization (He et
al., ICCV 2015), is fed an *ordered* point cloud (H×W with xyz in the three channels instead of
RGB); its multi-scale activation maps are fused into a soft mask and the top ``p`` = 0.1 % of
the points are the "points of interest" (POIs) of a task-irrelevant sample.

The architecture is torchvision's ResNet-50 v1.5 (stride on the 3×3 conv of each bottleneck),
with the same parameter names, so an ImageNet checkpoint of ``resnet50`` or
``wide_resnet50_2`` (``width_per_group=128``) loads into it (``load_checkpoint``); torchvision
itself is not used.

Choices where the paper is vague (all stated):

* He init = ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` on every conv (torchvision's
  choice), BatchNorm weight 1 / bias 0, the linear layer PyTorch's default. The network is
  run in ``eval()`` mode, so BatchNorm uses its initial running statistics (mean 0, variance 1)
  and is (up to eps) the identity: each image's mask depends on that image alone.
* Input: the ordered xyz is centred on the mean of its valid pixels and divided by their
  standard deviation (a camera frame sits hundreds of mm from the origin: without this the
  constant offset would dominate every activation); invalid (NaN) pixels are 0, as MVTec 3D-AD
  stores them.
* "The reciprocal second, third and fourth layer" (the sizes are lost in our copy of the paper):
  we count ResNet's four residual stages from the last, ``layer4`` being the first, so they are
  ``layer3`` (14×14 at 224 input), ``layer2`` (28×28) and ``layer1`` (56×56); the two coarser
  maps are resized (bilinear) to the size of the finest, as the paper resizes the second and
  third to the fourth. Each map is summed over channels and min-max normalized to [0, 1] before
  the average; the average is resized (bilinear) to the input size: the soft mask.
* Top p: the ``ceil(p · n)`` highest soft-mask values among the ``n`` *candidate* pixels (the
  part's foreground, not the supporting plane or unmeasured pixels), at least one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ResNet50",
    "he_init",
    "normalize_ordered_xyz",
    "fused_activation",
    "top_percent_mask",
    "load_checkpoint",
    "POI_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

POI_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3")
"""The reciprocal fourth, third and second stages (see the module docstring)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (1×1 → 3×3 (stride) → 1×1, expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    """ResNet-50 (layers 3-4-6-3); ``width_per_group=128`` gives Wide ResNet-50-2.

    ``forward_features(x, stages)`` returns the outputs of the named stages only and stops after
    the deepest one asked for (no work is spent on ``layer4`` / ``fc`` for the POI masks).
    """

    def __init__(self, width_per_group: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.width_per_group = int(width_per_group)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, self.width_per_group))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward_features(self, x: torch.Tensor, stages: Sequence[str] = POI_LAYERS) -> dict[str, torch.Tensor]:
        order = ("layer1", "layer2", "layer3", "layer4")
        unknown = set(stages) - set(order)
        if unknown:
            raise ValueError(f"unknown ResNet stage(s) {sorted(unknown)}; expected some of {order}")
        last = max(order.index(s) for s in stages)
        out: dict[str, torch.Tensor] = {}
        y = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i, name in enumerate(order[: last + 1]):
            y = getattr(self, name)(y)
            if name in stages:
                out[name] = y
            if i == last:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_features(x, ("layer4",))["layer4"]
        return self.fc(torch.flatten(self.avgpool(y), 1))


def he_init(model: nn.Module, seed: int) -> nn.Module:
    """He (Kaiming) initialization, seeded: convs ``kaiming_normal_(fan_out, relu)``, BN 1/0."""
    gen = torch.Generator().manual_seed(int(seed))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = math.sqrt(2.0) / math.sqrt(fan_out)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)
    return model


def normalize_ordered_xyz(xyz: np.ndarray) -> torch.Tensor:
    """H×W×3 xyz (NaN = invalid) → 3×H×W float32, centred and scaled over valid pixels, invalid 0."""
    xyz = np.asarray(xyz, dtype=np.float32)
    valid = np.isfinite(xyz).all(axis=-1)
    out = np.zeros_like(xyz)
    if valid.any():
        v = xyz[valid].astype(np.float64)
        mean = v.mean(axis=0)
        std = float(np.sqrt(((v - mean) ** 2).sum(axis=1).mean())) or 1.0
        out[valid] = ((v - mean) / std).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


@torch.no_grad()
def fused_activation(model: ResNet50, x: torch.Tensor, stages: Sequence[str] = POI_LAYERS) -> torch.Tensor:
    """The fused multi-scale soft mask (B×H×W in [0, 1]) of a batch ``x`` (B×3×H×W).

    Per stage: sum over channels, min-max normalize each map to [0, 1]; resize every map to the
    finest stage's size (bilinear), average, resize to H×W (bilinear).
    """
    model.eval()
    feats = model.forward_features(x, stages)
    maps = []
    for name in stages:
        a = feats[name].sum(dim=1, keepdim=True)
        lo = a.amin(dim=(2, 3), keepdim=True)
        hi = a.amax(dim=(2, 3), keepdim=True)
        maps.append((a - lo) / (hi - lo).clamp_min(1e-12))
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    fused = torch.stack(
        [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    ).mean(dim=0)
    return F.interpolate(fused, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def top_percent_mask(soft: torch.Tensor | np.ndarray, candidates: np.ndarray | None, p: float) -> np.ndarray:
    """Boolean mask of the top ``p`` fraction (at least one) of ``soft`` among ``candidates``.

    ``soft`` is any shape; ``candidates`` a boolean mask of the same shape (None: all). Ties at
    the threshold are broken by a stable sort on the flat index, so exactly
    ``ceil(p · n_candidates)`` entries are selected.
    """
    s = np.asarray(soft, dtype=np.float64).reshape(-1)
    cand = np.ones_like(s, dtype=bool) if candidates is None else np.asarray(candidates, dtype=bool).reshape(-1)
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    idx = np.flatnonzero(cand)
    out = np.zeros(s.shape, dtype=bool)
    if idx.size == 0:
        return out.reshape(np.shape(soft))
    k = max(1, math.ceil(p * idx.size - 1e-9))
    order = np.argsort(-s[idx], kind="stable")[:k]
    out[idx[order]] = True
    return out.reshape(np.shape(soft))


def load_checkpoint(path: str | Path) -> ResNet50:
    """An ImageNet ResNet-50 / Wide ResNet-50-2 from a local file (never downloaded).

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``
    (a torchvision ``state_dict``, optionally wrapped in ``{"state_dict": ...}`` or prefixed
    ``module.``). The width is read from ``layer1.0.conv1.weight``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no RGB checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Mapping[str, torch.Tensor] = load_file(str(path))
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    state = {k.removeprefix("module."): v for k, v in state.items()}
    key = "layer1.0.conv1.weight"
    if key not in state:
        raise ValueError(f"{path} is not a torchvision ResNet-50 state_dict (no {key!r})")
    width = int(state[key].shape[0])  # 64 for resnet50, 128 for wide_resnet50_2
    model = ResNet50(width_per_group=width)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    needed = [k for k in missing if not k.startswith(("layer4.", "fc."))]
    if needed:
        raise ValueError(f"{path}: checkpoint lacks {len(needed)} tensors, e.g. {needed[:3]}")
    return model.eval()
