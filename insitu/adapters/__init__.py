"""Adapter modules, injection into a frozen backbone, and the shareable adapter package."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from insitu.adapters.base import AdapterSet, resolve_blocks
from insitu.adapters.lora import LoRAAdapters, merge_lora
from insitu.backbones.vit import ViTBackbone
from insitu.errors import AdapterFormatError
from insitu.package_format import adapter_section
from insitu.registry import ADAPTERS, AdapterOptions, adapter_options


def create_adapters(backbone: ViTBackbone, cfg: AdapterOptions | dict[str, Any]) -> AdapterSet:
    """Build the adapter set registered under ``cfg.kind`` for this backbone."""
    options = adapter_options(cfg)
    update: dict[str, Any] = {"blocks": resolve_blocks(options.blocks, backbone.num_blocks)}
    if "in_chans" in type(options).model_fields:  # a kind that changes the patch embedding (spectral) takes its shape from the backbone
        update |= {"in_chans": backbone.in_chans, "patch_size": backbone.patch_size}
    return ADAPTERS.get(options.kind)(backbone.embed_dim, options.model_copy(update=update))


def adapters_from_package(section: dict[str, Any]) -> AdapterSet:
    """Rebuild an adapter set from a package's ``adapter`` section (``{kind, dim, options}``, or the older flat layout)."""
    section = adapter_section(section)
    kind = section.get("kind")
    try:
        options = ADAPTERS.options(kind).model_validate(section.get("options"))
    except ValidationError as exc:
        raise AdapterFormatError(
            f"the package's adapter options do not fit a {kind} adapter: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
        ) from None
    if not isinstance(options.blocks, list):
        raise AdapterFormatError(f"the package's adapter.options.blocks must list block indices, not {options.blocks!r}")
    return ADAPTERS.get(kind)(section["dim"], options)


class MultiAdapterBackbone(nn.Module):
    """One frozen backbone with several named adapter sets (one per site or sensor), switched by name."""

    def __init__(self, backbone: ViTBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.sets = nn.ModuleDict()
        self.active: str | None = None

    def add(self, name: str, adapters: AdapterSet) -> None:
        self.sets[name] = adapters
        self.active = self.active or name

    def use(self, name: str | None) -> MultiAdapterBackbone:
        """Select an adapter set by name (``None``: the bare backbone)."""
        if name is not None and name not in self.sets:
            raise KeyError(f"no adapter set named {name!r}; loaded: {list(self.sets)}")
        self.active = name
        return self

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        return self.backbone.forward_tokens(x, self.sets[self.active] if self.active else None)


class AdaptedBackbone(nn.Module):
    """A frozen backbone plus one adapter set: the model downstream heads, probes and objectives use.

    It offers the whole backbone interface (tokens, attention, intermediates, metadata), so nothing
    outside `insitu.backbones`/`insitu.adapters` needs the bare backbone behind it.
    """

    def __init__(self, backbone: ViTBackbone, adapters: AdapterSet | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapters = adapters

    def with_adapters(self, adapters: AdapterSet | None) -> AdaptedBackbone:
        """The same frozen backbone with another adapter set (``None``: the bare backbone)."""
        return AdaptedBackbone(self.backbone, adapters)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def in_chans(self) -> int:
        return self.backbone.in_chans

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    @property
    def native_size(self) -> int:
        return self.backbone.native_size

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens

    @property
    def source(self) -> str:
        return self.backbone.source

    @property
    def fingerprint(self) -> str:
        """The frozen base's fingerprint (adapters do not change it)."""
        return self.backbone.fingerprint

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(cls [B, D], patch_tokens [B, N, D], grid_hw)`` after the final norm."""
        return self.backbone.forward_tokens(x, self.adapters)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """`forward_tokens` plus the last block's CLS→patch attention ``[B, heads, N]``."""
        return self.backbone.forward_with_attention(x, self.adapters)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int] | int = 4, norm: bool = True) -> list[torch.Tensor]:
        """Patch tokens as ``B×D×h×w`` maps after the chosen blocks (an int n: the last n blocks)."""
        return self.backbone.forward_intermediates(x, indices, self.adapters, norm)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """A standalone timm state dict with LoRA deltas folded in (other adapter kinds cannot be merged)."""
        if not isinstance(self.adapters, LoRAAdapters):
            raise TypeError(f"only LoRA adapters can be merged into the weights; this model has {type(self.adapters).__name__}.")
        return merge_lora(self.backbone.vit, self.adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]


__all__ = [
    "ADAPTERS",
    "AdaptedBackbone",
    "AdapterSet",
    "LoRAAdapters",
    "MultiAdapterBackbone",
    "adapters_from_package",
    "create_adapters",
    "merge_lora",
    "resolve_blocks",
]
