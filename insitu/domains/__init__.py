"""Data domains: each turns files into Samples and knows its formats and bad inputs.

Domains are registered by name and imported lazily, so that `insitu` starts without importing
pydicom, rasterio or PyAV until a config asks for that domain.
"""

from __future__ import annotations

import importlib
from typing import Any

from insitu.domains.base import (
    IGNORE_INDEX,
    DemoData,
    Domain,
    DomainOptions,
    Manifest,
    ManifestItem,
    QuarantineItem,
    Sample,
    split_by_group,
    stable_id,
)
from insitu.errors import ConfigError
from insitu.registry import unknown_name_message

# name -> "module:Class"; adding a domain is one module and one line here
DOMAINS: dict[str, str] = {
    "images": "insitu.domains.images:ImageFolderDomain",
    "dicom": "insitu.domains.dicom:DicomDomain",
    "geotiff": "insitu.domains.geotiff:GeoTiffDomain",
    "video": "insitu.domains.video:VideoDomain",
    "pairs": "insitu.domains.pairs:PairsDomain",
}


def get_domain_class(name: str) -> type[Domain]:
    """The Domain class registered under ``name`` (imports its module on first use)."""
    if name not in DOMAINS:
        raise ConfigError(unknown_name_message("domain", name, list(DOMAINS)))
    module_name, cls_name = DOMAINS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"Domain {name!r} is not available: {exc}. Install insitu with its dependencies.") from exc
    return getattr(module, cls_name)


def create_domain(name: str, options: dict[str, Any] | None = None) -> Domain:
    """Build a domain reader by name with its validated options."""
    return get_domain_class(name)(options)


__all__ = [
    "DOMAINS",
    "IGNORE_INDEX",
    "DemoData",
    "Domain",
    "DomainOptions",
    "Manifest",
    "ManifestItem",
    "QuarantineItem",
    "Sample",
    "create_domain",
    "get_domain_class",
    "split_by_group",
    "stable_id",
]
