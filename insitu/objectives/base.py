"""The objective seam: ``objective(batch, student, teacher) -> {"loss": tensor, **logs}``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from insitu.registry import OBJECTIVES, ItemKind, Needs


class ObjectiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(nn.Module):
    """One SSL method: its loss, the heads/projectors it trains, and its view recipe.

    The pipeline owns the student/teacher adapters (the teacher's are an EMA copy); the objective
    owns its heads and their EMA copies, updated by `update_teacher` after each optimizer step.
    """

    name: ClassVar[str]
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions
    opts: ObjectiveOptions  # ``Options`` validated; each subclass narrows it to its own model
    needs_teacher: ClassVar[bool] = True
    # True when a step only passes the data pipeline's views to the models (no pixel operations of
    # its own), so the frozen prefix's output for those views can be cached (``train.cached_views``)
    cacheable_views: ClassVar[bool] = False
    items: ClassVar[ItemKind] = "images"  # what a training item must be (insitu.registry.Needs)

    @classmethod
    def needs(cls, opts: ObjectiveOptions) -> Needs:
        """What this objective with validated options ``opts`` requires of the run (checked by `insitu.config`)."""
        return Needs(items=cls.items, teacher=cls.needs_teacher, cacheable_views=cls.cacheable_views)

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__()
        self.embed_dim, self.patch_size, self.image_size = embed_dim, patch_size, image_size
        self.opts = self.Options.model_validate(options)
        self.max_steps = max_steps
        self.step = 0

    def view_transform(self) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """Turns one normalised C×H×W image into the list of views this objective needs."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_teacher(self, momentum: float) -> None:
        """EMA-update the objective's own teacher heads (no-op for objectives without one)."""

    def head_state(self) -> dict[str, torch.Tensor]:
        """The student-side head tensors to store in the adapter package."""
        return {}


def wrapped_needs(base: str, base_options: dict[str, Any]) -> Needs:
    """The needs of an objective that wraps ``base`` (sigreg, self_distill): the base's, without cached views."""
    cls = OBJECTIVES.get(base)
    return dataclasses.replace(cls.needs(cls.Options.model_validate(base_options)), cacheable_views=False)
