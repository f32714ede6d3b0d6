"""Frozen ViT construction and weight loading: one `create_backbone` entry point.

Specs (``BackboneConfig``):
- ``name`` alone: a timm ViT with random weights from ``init_seed`` (reproducible);
- ``name`` + ``pretrained: true``: timm fetches the named weights from its hub (online only);
- ``name`` + ``weights: file.safetensors``: a local timm state dict;
- ``name`` + ``weights: file.pt|.pth|.ckpt|.bin``: a PyTorch checkpoint read with ``weights_only=True``;
- ``weights: folder/`` with ``config.json``: a Hugging Face transformers DINOv2 folder (RAD-DINO's
  format), converted key by key into the equivalent timm ViT (``name`` is then ignored);
- ``weights: insitu:<name>``: a base shipped inside the package (``insitu/weights/<name>``), whose
  card fixes the architecture (``name``, ``patch_size``, ``kwargs`` are taken from it).
A checkpoint with another channel count is adapted (``channel_init``), and its position
embeddings are resampled to ``img_size``; the checkpoint's own size is kept as ``native_size``.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from insitu.backbones.loaders import fit_state_dict, hf_dinov2_config, hf_dinov2_state_dict, is_hf_dinov2_folder, read_state_dict
from insitu.backbones.vit import ViTBackbone
from insitu.config import BackboneConfig
from insitu.errors import ConfigError
from insitu.weights import PACKAGED, shipped_bases, shipped_card

log = logging.getLogger("insitu")


def create_backbone(cfg: BackboneConfig | dict[str, Any]) -> ViTBackbone:
    """Build a frozen ViT backbone from a spec (see the module docstring)."""
    cfg = BackboneConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    packaged = cfg.weights.removeprefix(PACKAGED) if cfg.weights and cfg.weights.startswith(PACKAGED) else None
    if packaged is not None:
        cfg = _with_packaged_architecture(cfg, packaged)
    weights = Path(cfg.weights) if cfg.weights else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if weights is not None and is_hf_dinov2_folder(weights):
            vit, source = _hf_dinov2_model(cfg, weights), f"hf-dinov2@{weights.name}"
        else:
            vit, source = _timm_model(cfg), cfg.name
    native = vit.patch_embed.img_size[0]
    if weights is not None:
        state = hf_dinov2_state_dict(weights) if is_hf_dinov2_folder(weights) else read_state_dict(weights)
        state, native = fit_state_dict(state, vit, cfg.channel_init, cfg.bands)
        _load_strict(vit, state, weights)
        source = source if source.startswith("hf-") else f"{cfg.name}@{weights.name}"
        source = f"{PACKAGED}{packaged}" if packaged else source
    elif cfg.pretrained:
        native = int(vit.pretrained_cfg.get("input_size", (0, native, native))[-1])
    return ViTBackbone(vit, source, native_size=native)


def _with_packaged_architecture(cfg: BackboneConfig, name: str) -> BackboneConfig:
    arch = shipped_card(name)["architecture"]
    if cfg.kwargs and cfg.kwargs != arch["kwargs"]:
        log.warning("backbone.kwargs %s ignored: %s%s fixes its own architecture %s", cfg.kwargs, PACKAGED, name, arch["kwargs"])
    return cfg.model_copy(
        update={"name": arch["name"], "patch_size": arch["patch_size"], "kwargs": arch["kwargs"], "weights": str(shipped_bases()[name])}
    )


def _timm_model(cfg: BackboneConfig) -> torch.nn.Module:
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if cfg.patch_size:
        kwargs["patch_size"] = cfg.patch_size
    try:
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
    except TypeError as exc:  # timm passes kwargs down to the model class, which rejects what it does not know
        raise ConfigError(_kwargs_problem(cfg, exc)) from None
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed"):
        raise ConfigError(f"backbone.name {cfg.name!r} is not a ViT (no blocks/patch_embed); pick a timm ViT.")
    return vit


def _kwargs_problem(cfg: BackboneConfig, exc: TypeError) -> str:
    """Name the ``backbone.kwargs`` key the model class refused, with the closest accepted name."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if not match:
        return f"backbone.kwargs {cfg.kwargs} do not fit {cfg.name!r}: {exc}. Check each value's type."
    key = match.group(1)
    accepted = [p for p in inspect.signature(VisionTransformer.__init__).parameters if p != "self"]
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean 'backbone.kwargs.{close[0]}'?" if close else f" (timm ViT arguments include {', '.join(accepted[:12])}, ...)"
    return f"unknown key 'backbone.kwargs.{key}': {cfg.name!r} takes no argument {key!r}{hint}"


def _hf_dinov2_model(cfg: BackboneConfig, folder: Path) -> VisionTransformer:
    arch = hf_dinov2_config(folder)
    arch.pop("in_chans")
    arch["img_size"] = cfg.img_size
    return VisionTransformer(num_classes=0, in_chans=cfg.in_chans, dynamic_img_size=True, **arch)


def _load_strict(vit: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(
            f"backbone.weights {path} does not fit the configured architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}. Check backbone.name/patch_size/kwargs."
        )
    vit.load_state_dict(state, strict=True)


__all__ = ["ViTBackbone", "create_backbone"]
