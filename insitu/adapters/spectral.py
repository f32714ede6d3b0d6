"""``spectral``: bottleneck adapters plus a trainable per-band change of the patch embedding (multispectral data).

A frozen base adapted to C bands by ``backbone.channel_init`` sees at most as many spectral directions as its
source had filters (``mean``: one, the sum of the bands; ``rgb_map``: three). This kind adds ``delta``, a
[D, C, p, p] filter bank that starts at zero and is added to the frozen patch embedding's output
(``tokens = frozen_embed(x) + conv(x, delta)``), so every band can get its own filters, learned by the
label-free objective together with the bottleneck adapters. An untrained set leaves the backbone's output
bit-identical. Its parameters live in the adapter set (and so in the package); the base stays frozen.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from insitu.adapters.bottleneck import BottleneckAdapters, BottleneckOptions
from insitu.registry import ADAPTERS


class SpectralOptions(BottleneckOptions):
    """``spectral``: the bottleneck options plus the patch embedding's shape (filled in from the backbone when built)."""

    kind: Literal["spectral"] = "spectral"  # type: ignore[assignment]
    in_chans: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)


@ADAPTERS.register("spectral")
class SpectralAdapters(BottleneckAdapters):
    """`BottleneckAdapters` plus a zero-initialised per-band patch-embedding delta (trained, stored with the adapters)."""

    kind = "spectral"
    Options = SpectralOptions

    def __init__(self, dim: int, options: SpectralOptions) -> None:
        super().__init__(dim, options)
        if options.in_chans is None or options.patch_size is None:
            raise TypeError("spectral adapters need in_chans and patch_size (insitu.adapters.create_adapters fills them in)")
        self.delta = nn.Parameter(torch.zeros(dim, options.in_chans, options.patch_size, options.patch_size))

    @property
    def first_block(self) -> int:
        return 0  # the patch embedding changes: no frozen prefix to cache or run without gradient

    def embed(self, vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The frozen embedding with ``conv(x, delta)`` added to the patch projection's output (before the position embedding)."""
        proj = vit.patch_embed.proj
        if x.shape[1] != self.delta.shape[1]:
            raise ValueError(f"spectral adapters were built for {self.delta.shape[1]} bands, the input has {x.shape[1]}")

        def add_delta(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            return out + F.conv2d(args[0], self.delta.to(args[0].dtype), stride=proj.stride, padding=proj.padding)

        handle = proj.register_forward_hook(add_delta)
        try:
            return super().embed(vit, x)
        finally:
            handle.remove()
