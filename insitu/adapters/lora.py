"""LoRA on the attention projections of a frozen timm ViT (Hu et al. 2021).

``qkv(x) + (alpha / r) · B(A(x))`` (and optionally the output projection), with ``B`` zero-initialised
so an untrained LoRA leaves the backbone bit-identical. Our own module rather than peft: the
frozen weights stay shared between student and teacher, each holding only its own A/B matrices,
and `merge_lora` folds them into a standalone backbone state dict.

Each delta wraps the block's own ``attn.qkv`` / ``attn.proj`` ``nn.Linear`` as a forward hook while
that block runs (``y = linear(x) + delta(x)``), so timm's ``Attention.forward`` runs unchanged,
whatever it grows (a ``gate``, q/k norms, fused SDPA). The tensors keep their names
(``qkv.<block>.A`` / ``.B``, ``proj.<block>.A`` / ``.B``), so packages written before stay loadable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from insitu.adapters.base import AdapterSet
from insitu.registry import ADAPTERS, AdapterOptions


class LoRAPair(nn.Module):
    """``B(A(x)) · scaling`` with ``A`` Kaiming-uniform and ``B`` zero."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_dim))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scaling


class LoRAOptions(AdapterOptions):
    """``lora``: rank-``rank`` deltas scaled by ``alpha / rank`` on the attention projections named in ``targets``."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = 16.0
    targets: list[Literal["qkv", "proj"]] = Field(default_factory=lambda: ["qkv"])


@ADAPTERS.register("lora")
class LoRAAdapters(AdapterSet):
    kind = "lora"
    Options = LoRAOptions

    def __init__(self, dim: int, options: LoRAOptions) -> None:
        super().__init__(dim, options)
        r, a, targets = options.rank, options.alpha, options.targets
        self.qkv = nn.ModuleDict({str(i): LoRAPair(dim, 3 * dim, r, a) for i in self.blocks}) if "qkv" in targets else None
        self.proj = nn.ModuleDict({str(i): LoRAPair(dim, dim, r, a) for i in self.blocks}) if "proj" in targets else None

    def hooks(self, index: int, block: nn.Module) -> list[RemovableHandle]:
        targets = [
            (_linear(block.attn, name), pairs[str(index)]) for name, pairs in (("qkv", self.qkv), ("proj", self.proj)) if pairs is not None
        ]
        return [linear.register_forward_hook(_plus(pair)) for linear, pair in targets]


def _linear(attn: nn.Module, name: str) -> nn.Linear:
    linear = getattr(attn, name, None)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"LoRA target '{name}' needs an nn.Linear at attn.{name}; {type(attn).__name__} has {type(linear).__name__}.")
    return linear


def _plus(pair: LoRAPair) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    """A forward hook turning ``linear(x)`` into ``linear(x) + pair(x)``."""
    return lambda _linear, args, out: out + pair(args[0])


def merge_lora(vit: nn.Module, adapters: LoRAAdapters) -> dict[str, torch.Tensor]:
    """A standalone timm state dict with every LoRA delta folded into its projection weight."""
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    for i in adapters.blocks:
        key = str(i)
        if adapters.qkv is not None:
            state[f"blocks.{i}.attn.qkv.weight"] += adapters.qkv[key].delta_weight().detach()
        if adapters.proj is not None:
            state[f"blocks.{i}.attn.proj.weight"] += adapters.proj[key].delta_weight().detach()
    return state
