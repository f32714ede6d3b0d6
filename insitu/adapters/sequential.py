"""Houlsby-style sequential adapters: a bottleneck after each sublayer, before its residual add.

For an adapted block: ``h = attn(ln1(x)); x = x + h + s·A1(h)``, then
``h = mlp(ln2(x)); x = x + h + s·A2(h)``. ``up`` starts at zero, so untrained adapters are the
identity on the sublayer output (the original Houlsby form ``h + A(h)``, with a scale).
"""

from __future__ import annotations

import torch
from torch import nn

from insitu.adapters.base import AdapterSet
from insitu.adapters.bottleneck import Bottleneck


class SequentialAdapters(AdapterSet):
    kind = "sequential"

    def __init__(self, dim: int, blocks: list[int], bottleneck_dim: int = 64, scale: float = 1.0) -> None:
        super().__init__(blocks)
        self.dim, self.bottleneck_dim, self.scale = dim, bottleneck_dim, scale
        self.attn_adapters = nn.ModuleDict({str(i): Bottleneck(dim, bottleneck_dim) for i in blocks})
        self.mlp_adapters = nn.ModuleDict({str(i): Bottleneck(dim, bottleneck_dim) for i in blocks})

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = str(index)
        h = block.ls1(block.attn(block.norm1(x)))
        x = x + block.drop_path1(h + self.scale * self.attn_adapters[key](h))
        h = block.ls2(block.mlp(block.norm2(x)))
        return x + block.drop_path2(h + self.scale * self.mlp_adapters[key](h))

    def config(self) -> dict:
        return {"kind": self.kind, "blocks": self.blocks, "bottleneck_dim": self.bottleneck_dim, "scale": self.scale, "dim": self.dim}
