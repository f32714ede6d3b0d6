"""Adapt a patch embedding trained on one channel count (usually RGB) to data with another.

Methods (``backbone.channel_init``):
- ``mean``: every new channel gets the mean of the source channels' filters;
- ``repeat``: source filters are cycled over the new channels (R, G, B, R, G, B, ...);
- ``rgb_map``: bands named red/green/blue (``backbone.bands``: e.g. B04/B03/B02, red, R) get the
  matching RGB filter, the other bands the mean filter.
Each output filter is then rescaled so that its L2 norm matches the source filter's: for inputs
with independent unit-variance channels this keeps the activation variance of the embedding.
"""

from __future__ import annotations

import torch

from insitu.errors import ConfigError

RGB_ALIASES = {
    0: {"r", "red", "b04", "b4"},
    1: {"g", "green", "b03", "b3"},
    2: {"b", "blue", "b02", "b2"},
}


def adapt_patch_embed(weight: torch.Tensor, in_chans: int, method: str = "mean", bands: list[str] | None = None) -> torch.Tensor:
    """Return a [D, in_chans, p, p] filter bank built from ``weight`` [D, C_src, p, p]."""
    src = weight.shape[1]
    if src == in_chans:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    if method == "mean":
        new = mean.expand(-1, in_chans, -1, -1).clone()
    elif method == "repeat":
        new = weight[:, [c % src for c in range(in_chans)]].clone()
    elif method == "rgb_map":
        new = _rgb_map(weight, mean, in_chans, bands)
    else:
        raise ConfigError(f"backbone.channel_init {method!r} is not one of mean, repeat, rgb_map.")
    src_norm = weight.flatten(1).norm(dim=1)
    new_norm = new.flatten(1).norm(dim=1).clamp_min(1e-12)
    return new * (src_norm / new_norm).view(-1, 1, 1, 1)


def _rgb_map(weight: torch.Tensor, mean: torch.Tensor, in_chans: int, bands: list[str] | None) -> torch.Tensor:
    if weight.shape[1] != 3:
        raise ConfigError(f"backbone.channel_init=rgb_map needs an RGB (3-channel) checkpoint, this one has {weight.shape[1]}.")
    if not bands or len(bands) != in_chans:
        raise ConfigError(f"backbone.channel_init=rgb_map needs backbone.bands with {in_chans} band names (got {bands}).")
    new = mean.expand(-1, in_chans, -1, -1).clone()
    found = []
    for i, name in enumerate(bands):
        for rgb, aliases in RGB_ALIASES.items():
            if name.lower() in aliases:
                new[:, i] = weight[:, rgb]
                found.append(name)
    if not found:
        raise ConfigError(f"backbone.bands {bands} names no red/green/blue band; use channel_init=mean instead.")
    return new
