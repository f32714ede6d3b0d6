"""Houlsby-style sequential adapters: a bottleneck after each sublayer, before its residual add.

For an adapted block: ``h = attn(ln1(x)); x = x + h + s·A1(h)``, then
``h = mlp(ln2(x)); x = x + h + s·A2(h)``. ``up`` starts at zero, so untrained adapters are the
identity on the sublayer output (the original Houlsby form ``h + A(h)``, with a scale). Attached
as forward hooks on the block's layer-scale modules ``ls1``/``ls2`` (identities without layer scale),
whose outputs are exactly the sublayer outputs before the residual add.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from insitu.adapters.base import AdapterSet
from insitu.adapters.bottleneck import Bottleneck, BottleneckOptions
from insitu.registry import ADAPTERS


class SequentialOptions(BottleneckOptions):
    """``sequential``: a ``bottleneck_dim``-wide MLP after each sublayer of each chosen block, scaled by ``scale``."""

    kind: Literal["sequential"] = "sequential"  # type: ignore[assignment]


@ADAPTERS.register("sequential")
class SequentialAdapters(AdapterSet):
    kind = "sequential"
    Options = SequentialOptions

    def __init__(self, dim: int, options: SequentialOptions) -> None:
        super().__init__(dim, options)
        self.scale = options.scale
        self.attn_adapters = nn.ModuleDict({str(i): Bottleneck(dim, options.bottleneck_dim) for i in self.blocks})
        self.mlp_adapters = nn.ModuleDict({str(i): Bottleneck(dim, options.bottleneck_dim) for i in self.blocks})

    def hooks(self, index: int, block: nn.Module) -> list[RemovableHandle]:
        key = str(index)
        return [
            block.ls1.register_forward_hook(self._after(self.attn_adapters[key])),
            block.ls2.register_forward_hook(self._after(self.mlp_adapters[key])),
        ]

    def _after(self, adapter: Bottleneck) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        return lambda _module, _args, h: h + self.scale * adapter(h)
