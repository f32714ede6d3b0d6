"""The preprocessing contract: how an image in physical units becomes a model input, stored with the model.

A `Preprocessing` holds everything the input of a model depends on: the normaliser, the square
input size and its resize policy, the band names in channel order, and the backbone's channel
adaptation (``in_chans``, ``channel_init``). Pretraining stores it in the adapter package
(``insitu.json``: ``input`` holds the contract, ``normalizer`` its normaliser); every place that
prepares a model's input resolves it here with :func:`resolve_preprocessing` (one model) or
:func:`resolve_comparison` (several models on the same data) and applies it with
`Preprocessing.apply` / `Preprocessing.dataset`, which run :func:`insitu.pipelines.data.model_input`'s steps.

The normaliser rule, the same for every caller:

- a model uses the normaliser its adapter package stores;
- a model without one (the frozen backbone, or a package stored without a normaliser, such as a
  federated one whose sites each fitted their own) uses the comparison's *reference*: the first
  normaliser stored by any of the compared models, in the order given, so that the frozen row of a
  probe or report sees the data exactly as the first package it is compared with does;
- when no compared model stores one, the reference is fitted once on the training items of the data
  at hand (:func:`insitu.pipelines.data.fit_normalizer`) and shared by every model.

A single model is a comparison of one: its package's normaliser, else one fitted on the training items.
The stored size, bands and channel count are checked against the data and the backbone: a channel
count or band order that differs is a `ConfigError` naming the package and the fix; an evaluation at
another size than the package was trained at is allowed (the backbone takes any size) and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import AdapterPackage
from insitu.backbones.vit import ViTBackbone
from insitu.config import BackboneConfig
from insitu.domains import ManifestItem
from insitu.domains.normalize import Normalizer
from insitu.errors import ConfigError
from insitu.package_format import MAX_BAND_NAME, RESIZE_POLICIES, PackageMeta
from insitu.pipelines.data import SampleDataset, ScannedData, fit_normalizer, model_input

log = logging.getLogger("insitu")

DEFAULT_RESIZE = RESIZE_POLICIES[0]  # "square-antialias": insitu.objectives.views.resize_square
Backbone = BackboneConfig | ViTBackbone | AdaptedBackbone


@dataclass(frozen=True)
class Preprocessing:
    """Normaliser, size, resize policy, bands in channel order and channel adaptation of a model's input."""

    normalizer: Normalizer | None
    image_size: int
    in_chans: int
    # names of the input channels in order: the data's own (a domain's meta["bands"]), else backbone.bands; None if unnamed
    bands: tuple[str, ...] | None = None
    channel_init: str | None = None  # how the patch embedding was adapted to in_chans (backbone.channel_init)
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", _band_tuple(self.bands))
        problems = []
        if type(self.image_size) is not int or self.image_size < 1:
            problems.append(f"image_size {self.image_size!r} is not a positive whole number of pixels")
        if type(self.in_chans) is not int or self.in_chans < 1:
            problems.append(f"in_chans {self.in_chans!r} is not a positive channel count")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize {self.resize!r} is not one of {list(RESIZE_POLICIES)}")
        if self.bands is not None and len(self.bands) != self.in_chans:
            problems.append(f"bands {list(self.bands)} name {len(self.bands)} channels, in_chans is {self.in_chans}")
        if self.normalizer is not None and len(self.normalizer.mean) != self.in_chans:
            problems.append(f"the normaliser has {len(self.normalizer.mean)} channels, in_chans is {self.in_chans}")
        if problems:
            raise ConfigError("preprocessing contract: " + "; ".join(problems) + ". Re-create it from the data and backbone it is for.")

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """One C×H×W image in physical units -> the C×S×S model input (normalised, then resized)."""
        return model_input(image, self.normalizer, self.image_size)

    def dataset(self, data: ScannedData, items: list[ManifestItem], transform: Callable | None = None) -> SampleDataset:
        """A `SampleDataset` applying this contract (its ``load`` + ``__getitem__`` are `apply`'s two steps)."""
        return SampleDataset(data, items, self.normalizer, transform, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: numbers, band names and policy names only (no paths, nothing about the data's people)."""
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "in_chans": self.in_chans,
            "bands": list(self.bands) if self.bands is not None else None,
            "channel_init": self.channel_init,
            "normalizer": self.normalizer.to_dict() if self.normalizer is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "preprocessing") -> Preprocessing:
        """Read `to_dict`'s output (unknown keys are ignored, so newer writers stay readable)."""
        missing = [k for k in ("image_size", "in_chans") if k not in data]
        if missing:
            raise ConfigError(f"{source} lacks {missing}; it was not written by Preprocessing.to_dict. Re-create it from its run.")
        norm = data.get("normalizer")
        return cls(
            normalizer=Normalizer.from_dict(norm) if norm else None,
            image_size=data["image_size"],
            in_chans=data["in_chans"],
            bands=data.get("bands"),
            channel_init=data.get("channel_init"),
            resize=data.get("resize", DEFAULT_RESIZE),
        )

    def input_section(self, domain: str | None = None) -> dict[str, Any]:
        """The adapter package's ``input`` section: the contract without its normaliser (stored beside it).

        ``channels`` repeats ``in_chans`` for readers of packages written before the contract existed.
        """
        out = {k: v for k, v in self.to_dict().items() if k != "normalizer"}
        return ({"domain": domain} if domain is not None else {}) | {"channels": self.in_chans} | out

    def check(
        self,
        *,
        channels: int | None = None,
        bands: Sequence[str] | None = None,
        in_chans: int | None = None,
        source: str | None = None,
    ) -> None:
        """Raise `ConfigError` when the data (``channels``, ``bands``) or the backbone (``in_chans``) disagree.

        ``source`` names the package the contract was stored in; None means it was derived from the
        backbone config, and the fixes then point at ``backbone.*``.
        """
        if in_chans is not None and in_chans != self.in_chans and source is not None:
            raise ConfigError(
                f"{source} takes {self.in_chans} input channels{self._band_text()} but backbone.in_chans is {in_chans}. "
                f"Set backbone.in_chans: {self.in_chans} (and the backbone.bands it was trained with) to use it."
            )
        if channels is not None and channels != self.in_chans:
            raise ConfigError(self._channel_message(channels, source))
        if bands is not None and self.bands is not None and tuple(bands) != self.bands:
            raise ConfigError(self._band_message(tuple(bands), source))

    def _band_text(self) -> str:
        return f" ({', '.join(self.bands)})" if self.bands else ""

    def _channel_message(self, channels: int, source: str | None) -> str:
        if source is None:
            return (
                f"the data gives {channels} channels per image but the backbone takes {self.in_chans} (backbone.in_chans). "
                f"Set backbone.in_chans: {channels} (backbone.channel_init adapts the patch embedding), "
                f"or select {self.in_chans} channels with the domain's options (data.options.channels / data.options.bands)."
            )
        select = f"data.options.bands: {list(self.bands)}" if self.bands else "the domain's data.options.channels / data.options.bands"
        return (
            f"{source} expects {self.in_chans} input channels{self._band_text()} but the data gives {channels}. "
            f"Select the package's channels in its order ({select}), or use a package trained on {channels}-channel data."
        )

    def _band_message(self, bands: tuple[str, ...], source: str | None) -> str:
        where = source or "backbone.bands"
        if sorted(bands) == sorted(self.bands or ()):
            fix = f"Set data.options.bands: {list(self.bands or ())} so the channels arrive in the order it expects."
            return f"{where} expects the bands in the order {list(self.bands or ())}, the data gives {list(bands)}. {fix}"
        missing = [b for b in self.bands or () if b not in bands]
        return (
            f"{where} expects the bands {list(self.bands or ())}, the data gives {list(bands)} (missing: {missing}). "
            "Use data with those bands (select them with data.options.bands), or a package trained on these bands."
        )


# what a model brings to a comparison: its package (or the contract read from one), a bare normaliser, or nothing
Stored = AdapterPackage | PackageMeta | Preprocessing | Normalizer | None


@dataclass
class DataSignature:
    """What the data feeds a model, read from its first loadable item: channel count and band names."""

    channels: int | None = None
    bands: tuple[str, ...] | None = None


def data_signature(data: ScannedData, items: list[ManifestItem], tries: int = 5) -> DataSignature:
    """Channels (``image.shape[-3]``) and band names (``meta["bands"]``) of the first of ``items`` that loads."""
    for item in items[:tries]:
        try:
            sample = data.domain.load(item, data.manifest)
        except Exception:  # noqa: BLE001 - a bad item is quarantined where it is used; try the next one
            continue
        names = sample.get("meta", {}).get("bands")
        return DataSignature(int(sample["image"].shape[-3]), safe_bands(names))
    return DataSignature()


def safe_bands(names: Any) -> tuple[str, ...] | None:
    """Band names fit to store (short strings, no path separators), else None."""
    if not isinstance(names, (list, tuple)) or not names:
        return None
    if all(isinstance(n, str) and 0 < len(n) <= MAX_BAND_NAME and "/" not in n and "\\" not in n for n in names):
        return tuple(names)
    log.warning("band names %s are not stored in the preprocessing contract (not short plain names)", list(names)[:4])
    return None


def _band_tuple(bands: Any) -> tuple[str, ...] | None:
    if bands is None:
        return None
    kept = safe_bands(bands)
    if kept is None or len(kept) != len(bands):
        raise ConfigError(f"preprocessing contract: bands must be short band names without path separators (got {list(bands)[:4]}).")
    return kept


# ---------------------------------------------------------------- reading the contract


def package_preprocessing(package: AdapterPackage | PackageMeta) -> Preprocessing:
    """The contract an adapter package stores; packages from before it (``input`` = image size/channels) read too.

    Missing fields come from the base the package records (``img_size``, ``in_chans``) and its stored
    config (``backbone.channel_init``); a missing normaliser stays None (the caller applies the rule).
    """
    meta = package.meta if isinstance(package, AdapterPackage) else package
    inp = meta.input
    return Preprocessing(
        normalizer=Normalizer.from_dict(meta.normalizer) if meta.normalizer else None,
        image_size=int(inp.get("image_size") or meta.base.img_size),
        in_chans=meta.base.in_chans,
        bands=safe_bands(inp.get("bands")),
        channel_init=inp.get("channel_init") if isinstance(inp.get("channel_init"), str) else _config_channel_init(meta.config),
        resize=inp.get("resize", DEFAULT_RESIZE),
    )


def _config_channel_init(config: dict[str, Any]) -> str | None:
    backbone = config.get("backbone")
    value = backbone.get("channel_init") if isinstance(backbone, dict) else None
    return value if isinstance(value, str) else None


def backbone_preprocessing(
    backbone: Backbone, image_size: int | None = None, normalizer: Normalizer | None = None, bands: Sequence[str] | None = None
) -> Preprocessing:
    """The contract of a backbone with no package: its channels and channel init; ``bands`` (else backbone.bands) name the channels."""
    names = bands if bands is not None else getattr(backbone, "bands", None)
    return Preprocessing(
        normalizer=normalizer,
        image_size=int(image_size or backbone.img_size),
        in_chans=backbone.in_chans,
        bands=safe_bands(names) if names is not None and len(names) == backbone.in_chans else None,
        channel_init=getattr(backbone, "channel_init", None),
    )


def _source(entry: Stored) -> str:
    if isinstance(entry, AdapterPackage):
        return f"adapter package {entry.path}"
    return "the adapter package"


def _stored_contract(entry: Stored) -> tuple[Preprocessing | None, Normalizer | None]:
    """(the stored contract, its normaliser) of one compared model."""
    if isinstance(entry, (AdapterPackage, PackageMeta)):
        entry = package_preprocessing(entry)
    if isinstance(entry, Preprocessing):
        return entry, entry.normalizer
    return None, entry  # a bare normaliser, or nothing


# ---------------------------------------------------------------- resolving


def resolve_comparison(
    stored: Sequence[Stored], data: ScannedData, items: list[ManifestItem], image_size: int | None, backbone: Backbone
) -> list[Preprocessing]:
    """One contract per compared model, in order, by the module's normaliser rule.

    ``stored``: per model, its adapter package (or contract, or bare normaliser), or None (the frozen
    backbone). ``items`` are the training items of ``data`` (a fallback normaliser is fitted on them,
    at most once). ``image_size`` None takes each package's stored size (else the backbone's).
    """
    contracts = [_stored_contract(entry) for entry in stored]
    seen = data_signature(data, items)
    for entry, (contract, _) in zip(stored, contracts, strict=True):  # a package's own message first: it names the package
        if contract is not None:
            contract.check(channels=seen.channels, bands=seen.bands, in_chans=backbone.in_chans, source=_source(entry))
    base = backbone_preprocessing(backbone, image_size, bands=seen.bands)
    base.check(channels=seen.channels)
    reference = next((norm for _, norm in contracts if norm is not None), None)
    if reference is None and contracts:
        reference = fit_normalizer(data, items)
    out = []
    for entry, (contract, norm) in zip(stored, contracts, strict=True):
        chosen = contract or base
        size = image_size or chosen.image_size
        if contract is not None and size != contract.image_size:
            log.info("%s was trained at %d px; its input is prepared at %d px here", _source(entry), contract.image_size, size)
        out.append(Preprocessing(norm or reference, size, chosen.in_chans, chosen.bands, chosen.channel_init, chosen.resize))
    return out


def resolve_preprocessing(
    package: Stored, data: ScannedData, items: list[ManifestItem], image_size: int | None, backbone: Backbone
) -> Preprocessing:
    """The contract for one model on ``data``: its package's (checked against the data and backbone), normaliser by the rule.

    ``package`` None: the backbone's contract with a normaliser fitted on ``items`` (the training items).
    """
    return resolve_comparison([package], data, items, image_size, backbone)[0]
