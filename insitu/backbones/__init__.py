"""Frozen ViT construction and weight loading: one `create_backbone` entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from insitu.backbones.vit import ViTBackbone, state_fingerprint
from insitu.config import BackboneConfig
from insitu.errors import ConfigError


def create_backbone(cfg: BackboneConfig | dict[str, Any]) -> ViTBackbone:
    """Build a frozen ViT from a timm name, with optional local safetensors weights.

    ``weights`` is a local ``.safetensors`` file holding a timm state dict for the same
    architecture; ``pretrained: true`` asks timm to fetch the named model's weights (online only).
    Without either, the weights are randomly initialised from ``init_seed``, independently of the
    global RNG, so the same config always rebuilds the same base (and its adapter packages apply).
    """
    cfg = BackboneConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if cfg.patch_size:
        kwargs["patch_size"] = cfg.patch_size
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            vit = timm.create_model(
                cfg.name,
                pretrained=cfg.pretrained,
                num_classes=0,
                in_chans=cfg.in_chans,
                img_size=cfg.img_size,
                dynamic_img_size=True,
                **kwargs,
            )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:5]
            raise ConfigError(f"backbone.name {cfg.name!r} is not a timm model. Close names: {close}") from None
        raise
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise ConfigError(f"backbone.name {cfg.name!r} is not a ViT (no blocks/patch_embed); pick a timm ViT.")
    source = cfg.name
    if cfg.weights:
        _load_local_weights(vit, Path(cfg.weights))
        source = f"{cfg.name}@{Path(cfg.weights).name}"
    return ViTBackbone(vit, source)


def _load_local_weights(vit: torch.nn.Module, path: Path) -> None:
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"backbone.weights {path} is not a .safetensors file. Convert it once with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')."
        )
    state = load_file(str(path))
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"backbone.weights {path} does not fit the configured architecture: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}. Check backbone.name/kwargs."
        )


__all__ = ["ViTBackbone", "create_backbone", "state_fingerprint"]
