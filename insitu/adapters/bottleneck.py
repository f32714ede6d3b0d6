"""UniAdapter-style bottleneck adapters in parallel to each chosen block's MLP.

For an adapted block: ``x = x + attn(ln1(x))``, then
``x = x + mlp(ln2(x)) + s * up(relu(down(ln_a(x))))``. ``up`` starts at zero, so an untrained
adapter leaves the backbone's output bit-identical. Attached by hooks: the residual stream is read
where timm's block feeds it to ``norm2``, and the adapter's output is added to the block's output.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from insitu.adapters.base import AdapterSet
from insitu.registry import ADAPTERS, AdapterOptions


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


class BottleneckOptions(AdapterOptions):
    """``bottleneck``: a ``bottleneck_dim``-wide MLP in parallel to each chosen block's MLP, scaled by ``scale``."""

    kind: Literal["bottleneck"] = "bottleneck"
    bottleneck_dim: int = Field(64, gt=0)
    scale: float = 0.1


@ADAPTERS.register("bottleneck")
class BottleneckAdapters(AdapterSet):
    """One `Bottleneck` per chosen block, added in parallel to the block's MLP with scale ``s``."""

    kind = "bottleneck"
    Options = BottleneckOptions

    def __init__(self, dim: int, options: BottleneckOptions) -> None:
        super().__init__(dim, options)
        self.scale = options.scale
        self.layers = nn.ModuleDict({str(i): Bottleneck(dim, options.bottleneck_dim) for i in self.blocks})

    def hooks(self, index: int, block: nn.Module) -> list[RemovableHandle]:
        adapter, seen = self.layers[str(index)], {}

        def keep_residual(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen["x"] = args[0]  # the block's stream after attention: what norm2 (the MLP branch) reads

        def add_adapter(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            if "x" not in seen:
                raise RuntimeError("timm's Block no longer calls norm2 on its residual stream; the bottleneck adapter cannot attach.")
            return out + self.scale * adapter(seen.pop("x"))

        return [block.norm2.register_forward_pre_hook(keep_residual), block.register_forward_hook(add_adapter)]
