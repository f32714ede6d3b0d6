"""SSL objectives, one file each, registered by name. A new method is one file + one line here."""

from __future__ import annotations

import importlib

from insitu.errors import ConfigError
from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.registry import unknown_name_message

OBJECTIVES: dict[str, str] = {
    "dino": "insitu.objectives.dino:DinoObjective",
    "simclr": "insitu.objectives.simclr:SimCLRObjective",
    "rsp": "insitu.objectives.temporal:RSPObjective",
    "cvrl": "insitu.objectives.temporal:CVRLObjective",
    "convirt": "insitu.objectives.convirt:ConVIRTObjective",
    "clip": "insitu.objectives.convirt:CLIPObjective",
    "glare": "insitu.objectives.glare:GlareObjective",
    "sigreg": "insitu.objectives.sigreg:SIGRegObjective",
    "self_distill": "insitu.objectives.self_distill:SelfDistillObjective",
    "graph_matching": "insitu.objectives.graph_matching:GraphMatchingObjective",
}


def get_objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ConfigError(unknown_name_message("objective", name, list(OBJECTIVES)))
    module_name, cls_name = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def create_objective(name: str, embed_dim: int, patch_size: int, image_size: int, options: dict, max_steps: int) -> Objective:
    """Build the objective registered under ``name``."""
    return get_objective_class(name)(embed_dim, patch_size, image_size, options, max_steps)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOptions", "create_objective", "get_objective_class"]
