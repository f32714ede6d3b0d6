"""A frozen timm Vision Transformer behind insitu's one backbone interface."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from insitu.adapters.base import AdapterSet


class ViTBackbone(nn.Module):
    """Wraps a timm ``VisionTransformer``; every parameter is frozen.

    ``forward_tokens(x, adapters)`` runs the blocks itself so that an `AdapterSet` can change how
    chosen blocks compute, while the frozen weights stay shared between student and teacher.
    Blocks below the first adapted block run under ``torch.no_grad()``: they need no gradient and
    keep no activations for backward.
    """

    def __init__(self, vit: nn.Module, source: str) -> None:
        super().__init__()
        self.vit = vit
        self.source = source
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.in_chans: int = vit.patch_embed.proj.in_channels
        self.img_size: int = vit.patch_embed.img_size[0]
        self.num_blocks: int = len(vit.blocks)
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 over the frozen state (names, dtypes, shapes, bytes); computed once."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.vit.state_dict())
        return self._fingerprint

    def train(self, mode: bool = True) -> ViTBackbone:
        # the frozen backbone always runs in eval mode (no dropout / drop-path on frozen weights)
        super().train(False)
        return self

    def forward_tokens(self, x: torch.Tensor, adapters: AdapterSet | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Return ``(cls [B, D], patch_tokens [B, N, D], grid_hw)`` after the final norm."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        first = adapters.first_block if adapters is not None else self.num_blocks
        with torch.set_grad_enabled(torch.is_grad_enabled() and first == 0):
            tokens = self._embed(x)
        for i, block in enumerate(self.vit.blocks):
            if i < first:
                with torch.no_grad():
                    tokens = block(tokens)
            elif adapters is not None and adapters.has(i):
                tokens = adapters.forward_block(i, block, tokens)
            else:
                tokens = block(tokens)
        tokens = self.vit.norm(tokens)
        return tokens[:, 0], tokens[:, self.num_prefix_tokens :], grid

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit.patch_embed(x)
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        return vit.norm_pre(tokens)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: stable across processes and devices for identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
