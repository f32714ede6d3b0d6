"""Segmentation heads on ViT patch-token maps: a linear 1×1 baseline and segmentation-models-pytorch
decoders (FPN, UPerNet) fed by a simple feature pyramid built from intermediate blocks.

Every head takes the list of ``B×D×h×w`` maps from ``backbone.forward_intermediates`` (last block
last) and returns logits at the input resolution. How the ViT is presented to smp, and why, is
written down in docs/downstream.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from insitu.registry import SEGMENTATION_HEADS

SCALES = (4.0, 2.0, 1.0, 0.5)  # the pyramid's resampling of the patch grid, finest first: strides p/4 … 2p


@SEGMENTATION_HEADS.register("linear")
class LinearSegHead(nn.Module):
    """A 1×1 convolution on the last layer's patch tokens, bilinearly upsampled to the image."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv(self.norm(maps[-1])), size=size, mode="bilinear", align_corners=False)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over L intermediate blocks: four maps at 4×, 2×, 1× and ½× the patch grid.

    Level i reads block ``round(i·(L-1)/3)`` (all four read the last block when L = 1, as in ViTDet;
    early blocks feed the fine levels otherwise, as in BEiT/MAE's UPerNet). Upsampling is learned
    (2×2 transposed convolutions), downsampling is max-pooling; each level is then projected to
    ``dim`` channels. An odd patch grid is first resized to the next even size, so that every
    level is exactly twice the next (smp's FPN adds levels after a fixed 2× upsampling).
    """

    def __init__(self, in_dim: int, levels: int, dim: int) -> None:
        super().__init__()
        self.sources = [round(i * (levels - 1) / (len(SCALES) - 1)) for i in range(len(SCALES))]
        self.levels = levels
        self.resample = nn.ModuleList(_resampler(in_dim, s) for s in SCALES)
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_dim, dim, 1), nn.GroupNorm(1, dim), nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim))
            for _ in SCALES
        )

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != self.levels:
            raise ValueError(f"the pyramid was built for {self.levels} blocks but got {len(maps)} maps")
        h, w = maps[-1].shape[-2:]
        even = (h + h % 2, w + w % 2)
        maps = [m if m.shape[-2:] == even else F.interpolate(m, size=even, mode="bilinear", align_corners=False) for m in maps]
        return [proj(res(maps[src])) for src, res, proj in zip(self.sources, self.resample, self.project, strict=True)]


def _resampler(dim: int, scale: float) -> nn.Module:
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.GroupNorm(1, dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, stride=2)
        )
    if scale == 2:
        return nn.ConvTranspose2d(dim, dim, 2, stride=2)
    return nn.Identity() if scale == 1 else nn.MaxPool2d(2)


class DecoderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    levels: int = Field(4, gt=0)
    decoder_dim: int = Field(64, gt=0)


class SmpDecoderHead(nn.Module):
    """Pyramid → an smp decoder → a 1×1 classifier, upsampled bilinearly to the image size."""

    Options = DecoderOptions

    def __init__(self, in_dim: int, num_classes: int, levels: int, decoder_dim: int) -> None:
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(in_dim, levels, decoder_dim)
        self.decoder, out_dim = self.build_decoder(decoder_dim)
        self.classify = nn.Conv2d(out_dim, num_classes, 1)

    def build_decoder(self, dim: int) -> tuple[nn.Module, int]:
        raise NotImplementedError

    def decode(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(pyramid)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.classify(self.decode(self.pyramid(maps))), size=size, mode="bilinear", align_corners=False)


@SEGMENTATION_HEADS.register("fpn")
class FPNHead(SmpDecoderHead):
    """smp's FPN decoder (Kirillov et al.'s panoptic FPN head): top-down fusion, every level upsampled to ¼ and summed."""

    def build_decoder(self, dim: int) -> tuple[nn.Module, int]:
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

        segmentation = 32 * -(-dim // 32)  # smp's segmentation blocks use GroupNorm(32, ·): a multiple of 32
        decoder = FPNDecoder([dim] * 4, encoder_depth=3, pyramid_channels=dim, segmentation_channels=segmentation, dropout=0.0)
        return decoder, decoder.out_channels


@SEGMENTATION_HEADS.register("upernet")
class UPerNetHead(SmpDecoderHead):
    """smp's UPerNet decoder: pyramid pooling on the coarsest level, FPN fusion, all levels concatenated at the finest."""

    def build_decoder(self, dim: int) -> tuple[nn.Module, int]:
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        # smp indexes encoder features from the input's resolution: [1, ½, ¼, ⅛, ...]; UPerNet reads the
        # levels from ¼ on, so the two finest entries are placeholders it skips
        return UPerNetDecoder([0, 0] + [dim] * 4, encoder_depth=5, decoder_channels=dim), dim

    def decode(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder([None, None, *pyramid])
