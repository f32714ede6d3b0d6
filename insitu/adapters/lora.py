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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from insitu.adapters.base import AdapterSet


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


class LoRAAdapters(AdapterSet):
    kind = "lora"

    def __init__(self, dim: int, blocks: list[int], rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = ("qkv",)) -> None:
        super().__init__(blocks)
        self.dim, self.rank, self.alpha, self.targets = dim, rank, alpha, tuple(targets)
        self.qkv = nn.ModuleDict({str(i): LoRAPair(dim, 3 * dim, rank, alpha) for i in blocks}) if "qkv" in targets else None
        self.proj = nn.ModuleDict({str(i): LoRAPair(dim, dim, rank, alpha) for i in blocks}) if "proj" in targets else None

    def hooks(self, index: int, block: nn.Module) -> list[RemovableHandle]:
        targets = [
            (_linear(block.attn, name), pairs[str(index)]) for name, pairs in (("qkv", self.qkv), ("proj", self.proj)) if pairs is not None
        ]
        return [linear.register_forward_hook(_plus(pair)) for linear, pair in targets]

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "blocks": self.blocks,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "dim": self.dim,
        }


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
