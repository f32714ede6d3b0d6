"""A frozen timm Vision Transformer behind insitu's one backbone interface."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from timm.layers import Attention
from torch import nn

if TYPE_CHECKING:
    from insitu.adapters.base import AdapterSet


class ViTBackbone(nn.Module):
    """Wraps a timm ``VisionTransformer``; every parameter is frozen.

    ``forward_tokens(x, adapters)`` calls each timm block in turn so that an `AdapterSet` can hook
    into chosen blocks (timm's own block and attention code always runs), while the frozen weights
    stay shared between student and teacher.
    Blocks below the first adapted block run under ``torch.no_grad()``: they need no gradient and
    keep no activations for backward.
    """

    def __init__(self, vit: nn.Module, source: str, native_size: int | None = None) -> None:
        super().__init__()
        self.vit = vit
        self.source = source
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        self.in_chans: int = vit.patch_embed.proj.in_channels
        self.img_size: int = vit.patch_embed.img_size[0]
        # the size the weights were trained at: resize data to it when you can
        self.native_size: int = native_size or self.img_size
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

    def set_trainable(self, trainable: bool) -> ViTBackbone:
        """Unfreeze every weight (full fine-tuning baselines, base pre-training) or freeze it again."""
        self.vit.requires_grad_(trainable)
        return self

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped model's own state dict (timm keys): what a ``backbone.weights`` file holds."""
        return self.vit.state_dict()

    def forward_tokens(self, x: torch.Tensor, adapters: AdapterSet | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Return ``(cls [B, D], patch_tokens [B, N, D], grid_hw)`` after the final norm.

        Without a class token (``class_token=False``), ``cls`` is the mean patch token (timm's ``avg`` pool).
        """
        tokens, grid, _ = self._run(x, adapters, ())
        tokens = self.vit.norm(tokens)
        patches = tokens[:, self.num_prefix_tokens :]
        cls = tokens[:, 0] if self.has_class_token else patches.mean(1)
        return cls, patches, grid

    @property
    def has_class_token(self) -> bool:
        return getattr(self.vit, "cls_token", None) is not None

    def forward_with_attention(
        self, x: torch.Tensor, adapters: AdapterSet | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """Like `forward_tokens`, plus the last block's CLS→patch attention ``[B, heads, N]``.

        The probabilities come from the queries and keys timm's own ``Attention.forward`` computes in
        the last block (read by hooks, so adapters that change q/k, like LoRA, are included). Without
        a class token, it is the attention each patch receives, averaged over the patch queries.
        """
        attn = self.vit.blocks[-1].attn
        with capture_queries_keys(attn) as qk:
            cls, patches, grid = self.forward_tokens(x, adapters)
        p = self.num_prefix_tokens
        q = qk["q"][:, :, :1] if self.has_class_token else qk["q"][:, :, p:]
        probs = ((q * attn.scale) @ qk["k"].transpose(-2, -1)).softmax(dim=-1)
        return cls, patches, grid, probs[..., p:].mean(2)

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int] | int = 4, adapters: AdapterSet | None = None, norm: bool = True
    ) -> list[torch.Tensor]:
        """Patch tokens as B×D×h×w maps after the chosen blocks (an int n means the last n blocks)."""
        idx = (
            list(range(self.num_blocks - indices, self.num_blocks)) if isinstance(indices, int) else [i % self.num_blocks for i in indices]
        )
        _, grid, feats = self._run(x, adapters, tuple(idx))
        out = []
        for f in feats:
            f = self.vit.norm(f) if norm else f
            p = f[:, self.num_prefix_tokens :]
            out.append(p.transpose(1, 2).reshape(p.shape[0], p.shape[2], *grid))
        return out

    def prefix_tokens(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """The frozen prefix's output: tokens after blocks ``0 .. first-1`` (no gradient).

        Passing them back to `forward_tokens` with adapters whose first block is ``first`` gives the
        same result as passing ``x`` (cached views, see ``train.cached_views``).
        """
        self._check_size(x)
        with torch.no_grad():
            tokens = self._embed(x)
            for block in self.vit.blocks[:first]:
                tokens = block(tokens)
        return tokens

    def _check_size(self, x: torch.Tensor) -> None:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}; resize or crop the data (data.image_size)."
            )

    def _run(
        self, x: torch.Tensor, adapters: AdapterSet | None, keep: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor]]:
        first = adapters.first_block if adapters is not None else self.num_blocks
        if self.vit.patch_embed.proj.weight.requires_grad:  # unfrozen (full fine-tuning): no frozen prefix
            first = 0
        if x.ndim == 3:  # [B, N, D]: the frozen prefix's output (`prefix_tokens`), computed earlier
            return self._run_cached(x, adapters, keep, first)
        self._check_size(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        with torch.set_grad_enabled(torch.is_grad_enabled() and first == 0):
            tokens = self._embed(x) if adapters is None else adapters.embed(self.vit, x)
        tokens, kept = self._blocks(tokens, adapters, keep, first, 0)
        return tokens, grid, kept

    def _run_cached(
        self, tokens: torch.Tensor, adapters: AdapterSet | None, keep: tuple[int, ...], first: int
    ) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor]]:
        if adapters is None or first == 0 or any(i < first for i in keep):
            raise ValueError("cached prefix tokens need adapters that start after block 0 and no earlier intermediates")
        side = math.isqrt(tokens.shape[1] - self.num_prefix_tokens)
        if side * side != tokens.shape[1] - self.num_prefix_tokens or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"{tuple(tokens.shape)} are not prefix tokens of square views for this backbone")
        tokens, kept = self._blocks(tokens, adapters, keep, first, first)
        return tokens, (side, side), kept

    def _blocks(
        self, tokens: torch.Tensor, adapters: AdapterSet | None, keep: tuple[int, ...], first: int, start: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks ``start ..`` on ``tokens`` (the frozen prefix without gradient); the output and the kept intermediates."""
        kept = []
        for i, block in enumerate(self.vit.blocks[start:], start):
            if i < first:
                with torch.no_grad():  # frozen prefix: no gradient, no saved activations
                    tokens = block(tokens)
            elif adapters is not None and adapters.has(i):
                tokens = adapters.forward_block(i, block, tokens)
            else:
                tokens = block(tokens)
            if i in keep:
                kept.append(tokens)
        return tokens, kept

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.vit, x)


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding, prefix tokens and position embedding: the tokens block 0 receives.

    The one private timm call in insitu: timm (1.0.x) has no public function for "embed, but do not
    run the blocks", and ``_pos_embed`` is what its own ``forward_features`` and
    ``forward_intermediates`` call. ``tests/test_timm_interface.py`` checks that this still matches
    ``forward_features`` for every supported variant, so a timm change fails loudly, not silently.
    """
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    tokens = vit.patch_drop(tokens)
    return vit.norm_pre(tokens)


@contextmanager
def capture_queries_keys(attn: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the ``[B, heads, N, head_dim]`` queries and keys of timm's ``Attention`` while in the block."""
    if not isinstance(attn, Attention):
        raise TypeError(f"attention maps need timm's Attention module; this backbone's last block has {type(attn).__name__}.")
    seen: dict[str, torch.Tensor] = {}
    handles = [
        attn.q_norm.register_forward_hook(lambda _m, _a, out: seen.__setitem__("q", out)),
        attn.k_norm.register_forward_hook(lambda _m, _a, out: seen.__setitem__("k", out)),
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: stable across processes and devices for identical weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
