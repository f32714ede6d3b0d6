"""Adapt a patch embedding trained on one channel count (usually RGB) to data with another.

Methods (``backbone.channel_init``):
- ``mean``: every new channel gets the mean of the source channels' filters (the base sees the sum of the bands);
- ``repeat``: source filters are cycled over the new channels (R, G, B, R, G, B, ...), whatever the bands are;
- ``rgb_map``: bands named red/green/blue (``backbone.bands``: e.g. B04/B03/B02, red, R) get the
  matching RGB filter, the other bands the mean filter;
- ``rgb_nearest``: as ``rgb_map``, but every other band gets the filter of the RGB band nearest to it
  in central wavelength (`WAVELENGTHS_NM`: Sentinel-2 MSI names and red/green/blue), so B01 (443 nm)
  starts as blue and every band past red (B05..B12) as red.
Each output filter is then rescaled so that its L2 norm matches the source filter's: for inputs
with independent unit-variance channels this keeps the activation variance of the embedding.

A choice that keeps every band distinct and learns from unlabelled data is the ``spectral`` adapter kind
(insitu.adapters.spectral): a trainable per-band change of the patch embedding, trained with the adapters.
"""

from __future__ import annotations

import torch

from insitu.errors import ConfigError

METHODS = ("mean", "repeat", "rgb_map", "rgb_nearest")
RGB_ALIASES = {
    0: {"r", "red", "b04", "b4"},
    1: {"g", "green", "b03", "b3"},
    2: {"b", "blue", "b02", "b2"},
}
# central wavelengths (nm) of Sentinel-2A MSI bands (ESA Sentinel-2 User Handbook / S2 spectral response functions v3.0)
WAVELENGTHS_NM = {
    "b01": 442.7, "b02": 492.4, "b03": 559.8, "b04": 664.6, "b05": 704.1, "b06": 740.5, "b07": 782.8,
    "b08": 832.8, "b8a": 864.7, "b09": 945.1, "b10": 1373.5, "b11": 1613.7, "b12": 2202.4,
    "red": 664.6, "green": 559.8, "blue": 492.4, "r": 664.6, "g": 559.8, "b": 492.4,
}  # fmt: skip


def adapt_patch_embed(weight: torch.Tensor, in_chans: int, method: str = "mean", bands: list[str] | None = None) -> torch.Tensor:
    """Return a [D, in_chans, p, p] filter bank built from ``weight`` [D, C_src, p, p]."""
    if method not in METHODS:
        raise ConfigError(f"backbone.channel_init {method!r} is not one of {', '.join(METHODS)}.")
    src = weight.shape[1]
    if src == in_chans:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    if method == "mean":
        new = mean.expand(-1, in_chans, -1, -1).clone()
    elif method == "repeat":
        new = weight[:, [c % src for c in range(in_chans)]].clone()
    else:
        new = weight[:, rgb_sources(src, in_chans, bands, nearest=method == "rgb_nearest")].clone()
        if method == "rgb_map":
            others = [i for i, name in enumerate(bands or []) if rgb_index(name) is None]
            new[:, others] = mean
    src_norm = weight.flatten(1).norm(dim=1)
    new_norm = new.flatten(1).norm(dim=1).clamp_min(1e-12)
    return new * (src_norm / new_norm).view(-1, 1, 1, 1)


def rgb_index(name: str) -> int | None:
    """0/1/2 for a band named red/green/blue (or B04/B03/B02), else None."""
    return next((rgb for rgb, aliases in RGB_ALIASES.items() if name.lower() in aliases), None)


def rgb_sources(src: int, in_chans: int, bands: list[str] | None, nearest: bool) -> list[int]:
    """For each configured band, the RGB filter it starts from (its own; else, with ``nearest``, the closest in wavelength; else 0)."""
    method = "rgb_nearest" if nearest else "rgb_map"
    if src != 3:
        raise ConfigError(
            f"backbone.channel_init={method} needs an RGB (3-channel) checkpoint, this one has {src}; "
            "the shipped bases insitu:fractal_vit_tiny and insitu:colour_vit_tiny are RGB."
        )
    if not bands or len(bands) != in_chans:
        raise ConfigError(f"backbone.channel_init={method} needs backbone.bands with {in_chans} band names (got {bands}).")
    found = [rgb_index(name) for name in bands]
    if all(i is None for i in found):
        raise ConfigError(f"backbone.bands {bands} names no red/green/blue band; use channel_init=mean instead.")
    if not nearest:
        return [0 if i is None else i for i in found]
    unknown = [name for name in bands if name.lower() not in WAVELENGTHS_NM]
    if unknown:
        raise ConfigError(
            f"backbone.bands {unknown[0]!r} has no known central wavelength for channel_init=rgb_nearest "
            f"(known: Sentinel-2 B01..B12, B8A, red/green/blue); use rgb_map or rename the band."
        )
    rgb_nm = {rgb: WAVELENGTHS_NM[("red", "green", "blue")[rgb]] for rgb in range(3)}
    return [i if i is not None else min(rgb_nm, key=lambda c: abs(rgb_nm[c] - WAVELENGTHS_NM[name.lower()])) for name, i in zip(bands, found, strict=True)]
