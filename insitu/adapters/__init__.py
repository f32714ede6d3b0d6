"""Adapter modules, injection into a frozen backbone, and the shareable adapter package."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from insitu.adapters.base import AdapterSet, resolve_blocks
from insitu.adapters.bottleneck import BottleneckAdapters
from insitu.backbones.vit import ViTBackbone
from insitu.config import AdapterConfig
from insitu.registry import Registry

ADAPTERS: Registry[AdapterSet] = Registry("adapter kind")


@ADAPTERS.register("bottleneck")
def _bottleneck(backbone: ViTBackbone, cfg: AdapterConfig) -> AdapterSet:
    blocks = resolve_blocks(cfg.blocks, backbone.num_blocks)
    return BottleneckAdapters(backbone.embed_dim, blocks, cfg.bottleneck_dim, cfg.scale)


def create_adapters(backbone: ViTBackbone, cfg: AdapterConfig | dict[str, Any]) -> AdapterSet:
    """Build the adapter set named by ``cfg.kind`` for this backbone."""
    cfg = AdapterConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    return ADAPTERS.get(cfg.kind)(backbone, cfg)


def adapters_from_config(config: dict[str, Any]) -> AdapterSet:
    """Rebuild an adapter set from the ``config()`` stored in a package."""
    if config["kind"] == "bottleneck":
        return BottleneckAdapters(config["dim"], config["blocks"], config["bottleneck_dim"], config["scale"])
    ADAPTERS.get(config["kind"])  # raises the standard unknown-name error
    raise NotImplementedError(config["kind"])


class AdaptedBackbone(nn.Module):
    """A frozen backbone plus one adapter set: the model downstream heads and probes use."""

    def __init__(self, backbone: ViTBackbone, adapters: AdapterSet | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapters = adapters

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        return self.backbone.forward_tokens(x, self.adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]


__all__ = [
    "ADAPTERS",
    "AdaptedBackbone",
    "AdapterSet",
    "BottleneckAdapters",
    "adapters_from_config",
    "create_adapters",
    "resolve_blocks",
]
