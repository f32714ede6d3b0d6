"""insitu: adapt vision foundation models to your own imaging domain, on your own machines.

The Python API (see the README): `load_config`, `pretrain`, `probe`, `load_adapter`,
`load_adapters`, `load_package`, `embed_folder`, `split_class_folders`, `create_backbone`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "load_config",
    "pretrain",
    "probe",
    "load_adapter",
    "load_adapters",
    "load_package",
    "embed_folder",
    "split_class_folders",
    "create_backbone",
}


def __getattr__(name: str) -> Any:
    # lazy: `insitu --help` should not import torch
    if name in _API:
        from insitu import api
        from insitu.backbones import create_backbone

        return create_backbone if name == "create_backbone" else getattr(api, name)
    raise AttributeError(f"module 'insitu' has no attribute {name!r}")


__all__ = sorted(_API)
