"""UniAdapter-style bottleneck adapters in parallel to each chosen block's MLP.

For an adapted block: ``x = x + attn(ln1(x))``, then
``x = x + mlp(ln2(x)) + s * up(relu(down(ln_a(x))))``. ``up`` starts at zero, so an untrained
adapter leaves the backbone's output bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from insitu.adapters.base import AdapterSet


class Bottleneck(nn.Module):
    """``up(relu(down(ln(x))))`` with ``up`` zero-initialised."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(self.norm(x))))


class BottleneckAdapters(AdapterSet):
    """One `Bottleneck` per chosen block, added in parallel to the block's MLP with scale ``s``."""

    kind = "bottleneck"

    def __init__(self, dim: int, blocks: list[int], bottleneck_dim: int = 64, scale: float = 0.1) -> None:
        super().__init__(blocks)
        self.dim, self.bottleneck_dim, self.scale = dim, bottleneck_dim, scale
        self.layers = nn.ModuleDict({str(i): Bottleneck(dim, bottleneck_dim) for i in blocks})

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # mirrors timm's Block.forward: x + drop_path(ls(attn(norm1(x)))), then the MLP branch
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x + mlp + self.scale * self.layers[str(index)](x)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "blocks": self.blocks,
            "bottleneck_dim": self.bottleneck_dim,
            "scale": self.scale,
            "dim": self.dim,
        }
