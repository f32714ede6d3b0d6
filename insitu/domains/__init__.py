"""Data domains: each turns files into Samples and knows its formats and bad inputs.

Domains are registered by name (``@DOMAINS.register(name)``, insitu.registry) and imported lazily, so that `insitu` starts without importing
pydicom, rasterio or PyAV until a config asks for that domain.
"""

from __future__ import annotations

from typing import Any

from insitu.domains.base import (
    IGNORE_INDEX,
    Domain,
    Manifest,
    ManifestItem,
    Sample,
    split_by_group,
    stable_id,
)
from insitu.registry import DOMAINS


def get_domain_class(name: str) -> type[Domain]:
    """The Domain class registered under ``name`` (imports its module on first use)."""
    return DOMAINS.get(name)


def create_domain(name: str, options: dict[str, Any] | None = None) -> Domain:
    """Build a domain reader by name with its validated options."""
    return get_domain_class(name)(options)


__all__ = [
    "DOMAINS",
    "IGNORE_INDEX",
    "Domain",
    "Manifest",
    "ManifestItem",
    "Sample",
    "create_domain",
    "get_domain_class",
    "split_by_group",
    "stable_id",
]
