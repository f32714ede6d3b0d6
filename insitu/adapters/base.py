"""The adapter seam: a set of trainable modules that changes how chosen blocks compute."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from insitu.backbones.vit import embed_tokens
from insitu.errors import ConfigError
from insitu.registry import AdapterOptions


def resolve_blocks(blocks: str | int | list[int], num_blocks: int) -> list[int]:
    """``"all"`` -> every block, ``k`` -> the last k blocks, a list -> those indices (negatives allowed)."""
    if blocks == "all":
        return list(range(num_blocks))
    if isinstance(blocks, int):
        if blocks > num_blocks:
            raise ConfigError(f"adapter.options.blocks={blocks} asks for more blocks than the backbone has ({num_blocks}).")
        return list(range(num_blocks - blocks, num_blocks))
    out = sorted({b % num_blocks if -num_blocks <= b < num_blocks else -1 for b in blocks})
    if not out or out[0] < 0:
        raise ConfigError(f"adapter.options.blocks={blocks} has an index outside 0..{num_blocks - 1}.")
    return out


class AdapterSet(nn.Module):
    """Adapters for some blocks of a ViT. ``forward_block`` replaces ``block(x)`` for those blocks.

    An adapter never re-implements timm's ``Block``/``Attention`` forward: it attaches forward hooks
    to the block's own submodules (`hooks`) for the duration of one ``block(x)`` call, so timm's code
    runs unchanged (gated attention, fused SDPA, q/k norms included). The frozen module tree is never
    modified, so student and teacher adapter sets can share one backbone.
    """

    kind: ClassVar[str] = "base"
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions

    def __init__(self, dim: int, options: AdapterOptions) -> None:
        """``options.blocks``: the resolved block indices (`resolve_blocks`)."""
        super().__init__()
        if not isinstance(options.blocks, list):
            raise TypeError(f"adapter blocks must be resolved to indices first, not {options.blocks!r}")
        self.dim, self.options, self.blocks = dim, options, list(options.blocks)

    @property
    def first_block(self) -> int:
        return min(self.blocks)

    def has(self, index: int) -> bool:
        return index in self.blocks

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """timm's own ``block(x)`` with this set's hooks attached to block ``index``."""
        handles = self.hooks(index, block)
        try:
            return block(x)
        finally:
            for handle in handles:
                handle.remove()

    def embed(self, vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The tokens block 0 receives; adapter kinds that change the patch embedding (``spectral``) override this."""
        return embed_tokens(vit, x)

    def hooks(self, index: int, block: nn.Module) -> list[RemovableHandle]:
        """Attach this set's change to block ``index`` (its submodules); the handles remove it again."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What rebuilds this set, stored in the adapter package: ``{kind, dim, options}``."""
        return {"kind": self.kind, "dim": self.dim, "options": self.options.model_dump(mode="json", exclude={"kind"})}
