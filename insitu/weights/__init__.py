"""The bases shipped inside the package (``backbone.weights: insitu:<name>``): safetensors + a JSON card each.

This is the lowest layer that knows them, so a config can be checked (:mod:`insitu.config`)
without importing the backbones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError

PACKAGED = "insitu:"


def shipped_bases() -> dict[str, Path]:
    """Name -> safetensors path of every base in this folder."""
    return {p.stem: p for p in sorted(Path(__file__).parent.glob("*.safetensors"))}


def shipped_card(name: str) -> dict[str, Any]:
    """The card (architecture, training record) of a shipped base; `ConfigError` naming those that exist."""
    bases = shipped_bases()
    if name not in bases:
        raise ConfigError(f"backbone.weights '{PACKAGED}{name}' is not a shipped base; available: {[PACKAGED + n for n in bases]}.")
    return json.loads(bases[name].with_suffix(".json").read_text())
