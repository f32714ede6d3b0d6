"""SSL objectives, one file each, registered by name with ``@OBJECTIVES.register(name)`` (insitu.registry)."""

from __future__ import annotations

from typing import Any

from insitu.objectives.base import Objective
from insitu.registry import OBJECTIVES


def get_objective_class(name: str) -> type[Objective]:
    """The Objective class registered under ``name`` (imports its module on first use)."""
    return OBJECTIVES.get(name)


def create_objective(name: str, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> Objective:
    """Build the objective registered under ``name``."""
    return get_objective_class(name)(embed_dim, patch_size, image_size, options, max_steps)


__all__ = ["OBJECTIVES", "Objective", "create_objective", "get_objective_class"]
