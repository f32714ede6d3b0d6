"""The downstream model: an adapted backbone plus a task head, built from a run config.

What `insitu.pipelines.finetune` trains and `insitu.pipelines.head_folder` saves and rebuilds for
``predict``; both import it from here, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import apply_package, load_package
from insitu.backbones import ViTBackbone, create_backbone
from insitu.config import DownstreamConfig, RunConfig
from insitu.heads import create_head, head_options
from insitu.sharing.signing import trust_of


class DownstreamModel(nn.Module):
    """An adapted backbone plus a task head: images in, logits (B×K or B×K×H×W) out."""

    def __init__(self, adapted: AdaptedBackbone, head: nn.Module, task: str, layers: int = 4) -> None:
        super().__init__()
        self.adapted, self.head, self.task, self.layers = adapted, head, task, layers

    def features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Backbone features the head reads: pooled vectors, or token maps for segmentation."""
        if self.task == "segmentation":
            return self.adapted.forward_intermediates(x, min(self.layers, self.adapted.num_blocks))
        cls, patches, _ = self.adapted.forward_tokens(x)
        return torch.cat([cls, patches.mean(1)], dim=1)

    def head_logits(self, feats: torch.Tensor | list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.head(feats, size) if self.task == "segmentation" else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.features(x), tuple(x.shape[-2:]))


@dataclass
class FinetuneResult:
    name: str
    seed: int
    metrics: dict[str, float]
    trainable_params: int
    n_train: int
    n_test: int
    wall_s: float
    out_dir: Path | None = None
    history: list[float] = field(default_factory=list)


def downstream_of(cfg: RunConfig) -> DownstreamConfig:
    """The run's downstream section (defaults when absent)."""
    return cfg.downstream or DownstreamConfig()


def build_model(cfg: RunConfig, adapter: Path | None, k: int, backbone: ViTBackbone | None = None) -> DownstreamModel:
    """Backbone (+ adapter package, or fresh adapters in ``mode: adapters``) + a fresh head.

    ``backbone``: one already built from ``cfg.backbone`` (it stays frozen, so seeds and packages share it).
    """
    ds = downstream_of(cfg)
    backbone = backbone or create_backbone(cfg.backbone)
    if adapter is not None:
        adapted = apply_package(load_package(adapter, trust_of(cfg)), backbone)
    else:  # without a package, mode: adapters trains zero-initialised adapters from the `adapter` section
        adapted = AdaptedBackbone(backbone, create_adapters(backbone, cfg.adapter) if ds.mode == "adapters" else None)
    in_dim = backbone.embed_dim * (1 if ds.task == "segmentation" else 2)
    levels = min(ds.layers, backbone.num_blocks)
    inputs = head_options(ds.task, ds.head.name, {"levels": levels})  # what the run sets (insitu.config.HEAD_INPUTS)
    head = create_head(ds.task, ds.head.name, in_dim, k, **ds.head.options, **inputs)
    return DownstreamModel(adapted, head, ds.task, ds.layers)
