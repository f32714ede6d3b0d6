"""Segmentation heads on ViT patch-token maps: a linear 1×1 head and a small multi-level FPN decoder.

Both take the list of ``B×D×h×w`` maps from ``backbone.forward_intermediates`` (the linear head uses
only the last) and return logits at the input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from insitu.registry import SEGMENTATION_HEADS


@SEGMENTATION_HEADS.register("linear")
class LinearSegHead(nn.Module):
    """A 1×1 convolution on the last layer's patch tokens, bilinearly upsampled to the image."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv(self.norm(maps[-1])), size=size, mode="bilinear", align_corners=False)


class FPNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    levels: int = Field(4, gt=0)
    decoder_dim: int = Field(64, gt=0)


@SEGMENTATION_HEADS.register("fpn")
class FPNDecoder(nn.Module):
    """A DPT/FPN-style decoder: reassemble L token maps at 4 scales, fuse top-down, predict.

    A plain ViT has one resolution, so (as in DPT) the early layers are upsampled (×4, ×2) and the
    last one downsampled (×0.5) to form a pyramid; fusion runs from coarse to fine with 3×3 convs.
    """

    Options = FPNOptions

    def __init__(self, in_dim: int, num_classes: int, levels: int = 4, decoder_dim: int = 64) -> None:
        super().__init__()
        dim = decoder_dim
        self.scales = _pyramid_scales(levels)
        self.project = nn.ModuleList(nn.Sequential(nn.Conv2d(in_dim, dim, 1), nn.GroupNorm(1, dim)) for _ in range(levels))
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.GELU()) for _ in range(levels))
        self.classify = nn.Conv2d(dim, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(maps) != len(self.project):
            raise ValueError(f"FPNDecoder was built for {len(self.project)} levels but got {len(maps)} maps")
        pyramid = [_rescale(p(m), s) for p, m, s in zip(self.project, maps, self.scales, strict=True)]
        x = self.fuse[-1](pyramid[-1])
        for level in range(len(pyramid) - 2, -1, -1):  # coarse to fine: upsample, add the lateral map, refine
            x = F.interpolate(x, size=pyramid[level].shape[-2:], mode="bilinear", align_corners=False) + pyramid[level]
            x = self.fuse[level](x)
        return F.interpolate(self.classify(x), size=size, mode="bilinear", align_corners=False)


def _pyramid_scales(levels: int) -> list[float]:
    """Resampling factor per level, finest first: 4, 2, 1, 0.5 for four levels (extra levels stay at 1)."""
    base = [4.0, 2.0, 1.0, 0.5][-levels:] if levels <= 4 else [4.0, 2.0] + [1.0] * (levels - 3) + [0.5]
    return base


def _rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1:
        return x
    size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
