"""Weight loaders: timm safetensors, PyTorch checkpoints (weights_only), Hugging Face DINOv2 folders.

Every loader returns a timm-style state dict; `fit_state_dict` then adapts the patch embedding's
channels and the position-embedding grid to the configured model.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from insitu.backbones.channels import adapt_patch_embed
from insitu.errors import ConfigError

log = logging.getLogger("insitu")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def is_hf_dinov2_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A timm-keyed state dict from a ``.safetensors`` file or a PyTorch checkpoint."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        log.warning(
            "%s is a pickle-based checkpoint; reading it with torch.load(weights_only=True). Convert it once to "
            ".safetensors (safetensors.torch.save_file) to share it safely.",
            path,
        )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the unpickler refuses anything but tensors and containers
            raise ConfigError(f"backbone.weights {path} cannot be read with weights_only=True: {exc}") from None
        return _unwrap(obj, path)
    raise ConfigError(
        f"backbone.weights {path}: expected a .safetensors file, a PyTorch checkpoint ({', '.join(PICKLE_SUFFIXES)}) or a Hugging Face folder."
    )


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"backbone.weights {path} does not hold a state dict of tensors.")
    prefixes = ("module.", "model.", "backbone.", "encoder.")
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def hf_dinov2_config(folder: Path) -> dict[str, Any]:
    """timm constructor kwargs equivalent to a transformers ``Dinov2Config``."""
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "dinov2":
        raise ConfigError(f"{folder}/config.json has model_type {cfg.get('model_type')!r}; only 'dinov2' folders are supported.")
    if cfg.get("use_swiglu_ffn"):
        raise ConfigError(f"{folder}: SwiGLU DINOv2 variants (giant) are not supported yet.")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{folder}: hidden_act {cfg['hidden_act']!r} is not supported (only gelu).")
    return {
        "embed_dim": cfg["hidden_size"],
        "depth": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "mlp_ratio": cfg.get("mlp_ratio", 4),
        "patch_size": cfg["patch_size"],
        "img_size": cfg["image_size"],
        "in_chans": cfg.get("num_channels", 3),
        "init_values": cfg.get("layerscale_value", 1.0),
        "qkv_bias": cfg.get("qkv_bias", True),
    }


def hf_dinov2_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Map a transformers DINOv2 ``model.safetensors`` onto timm ``VisionTransformer`` keys."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no .safetensors weights (save_pretrained writes model.safetensors).")
    src: dict[str, torch.Tensor] = {}
    for f in files:
        src.update(load_file(str(f)))
    src = {k.removeprefix("dinov2."): v for k, v in src.items()}
    out: dict[str, torch.Tensor] = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": src["layernorm.weight"],
        "norm.bias": src["layernorm.bias"],
    }
    blocks = sorted({int(m.group(1)) for k in src if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in blocks:
        s, d = f"encoder.layer.{i}.", f"blocks.{i}."
        att = s + "attention.attention."
        out[d + "attn.qkv.weight"] = torch.cat([src[att + n + ".weight"] for n in ("query", "key", "value")])
        out[d + "attn.qkv.bias"] = torch.cat([src[att + n + ".bias"] for n in ("query", "key", "value")])
        pairs = {
            "norm1": "norm1",
            "norm2": "norm2",
            "attention.output.dense": "attn.proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for a, b in pairs.items():
            out[d + b + ".weight"] = src[s + a + ".weight"]
            out[d + b + ".bias"] = src[s + a + ".bias"]
        out[d + "ls1.gamma"] = src[s + "layer_scale1.lambda1"]
        out[d + "ls2.gamma"] = src[s + "layer_scale2.lambda1"]
    return out


def fit_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module, channel_init: str, bands: list[str] | None
) -> tuple[dict[str, torch.Tensor], int]:
    """Adapt channels and position grid of ``state`` to ``model``; returns (state, native size in px)."""
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "mask_token"))}
    own = model.state_dict()
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != own["patch_embed.proj.weight"].shape[1]:
        log.info(
            "adapting the patch embedding from %d to %d channels (%s)", w.shape[1], own["patch_embed.proj.weight"].shape[1], channel_init
        )
        state["patch_embed.proj.weight"] = adapt_patch_embed(w, own["patch_embed.proj.weight"].shape[1], channel_init, bands)
    patch = model.patch_embed.patch_size[0]
    native = model.patch_embed.img_size[0]
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        src_grid = int(round((pos.shape[1] - prefix) ** 0.5))
        native = src_grid * patch
        state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    return state, native
