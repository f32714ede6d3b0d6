"""LoRA on the attention projections of a frozen timm ViT (Hu et al. 2021).

``qkv(x) + (alpha / r) · B(A(x))`` (and optionally the output projection), with ``B`` zero-initialised
so an untrained LoRA leaves the backbone bit-identical. Our own module rather than peft: the
frozen weights stay shared between student and teacher, each holding only its own A/B matrices,
and `merge_lora` folds them into a standalone backbone state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x + block.drop_path1(block.ls1(self._attention(index, block.attn, block.norm1(x))))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def qkv_delta(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA change to block ``index``'s qkv projection (used to read attention maps)."""
        return self.qkv[str(index)](x) if self.qkv is not None else torch.zeros(())

    def _attention(self, index: int, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # mirrors timm's Attention.forward with LoRA added to the projections
        b, n, _ = x.shape
        key = str(index)
        qkv = attn.qkv(x)
        if self.qkv is not None:
            qkv = qkv + self.qkv[key](x)
        qkv = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
        proj = attn.proj(out)
        if self.proj is not None:
            proj = proj + self.proj[key](out)
        return attn.proj_drop(proj)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "blocks": self.blocks,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "dim": self.dim,
        }


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
