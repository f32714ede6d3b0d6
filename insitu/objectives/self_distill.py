"""Self-distillation for further pretraining (Lee et al. 2023, "Self-Distillation for Further
Pre-training of Transformers"), as a second stage after continual pretraining.

Stage 1 (any objective, e.g. ``glare``) produces an adapter package: the further-pretrained model.
Stage 2 trains a *fresh* student (the original frozen backbone + new zero-initialised adapters)
with the same objective plus an L2 pull of its CLS embedding toward the further-pretrained model's
CLS on clean (un-augmented) views: ``L = L_base + weight * mean ||cls_s - cls_fp||²``. The
further-pretrained adapters are loaded from the package, frozen, and run on the shared backbone.

The view transform is the base objective's plus one clean, resized copy of the image, which is
taken off before the base objective sees the views.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from insitu.adapters import adapters_from_package
from insitu.adapters.package import check_compatible, load_package
from insitu.objectives.base import Objective, ObjectiveOptions, wrapped_needs
from insitu.objectives.views import resize_square
from insitu.registry import OBJECTIVES, Needs
from insitu.sharing.signing import current_trust


class SelfDistillOptions(ObjectiveOptions):
    base: str = "glare"
    base_options: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, ge=0)
    adapter: Path


class CleanViewTransform:
    """The base objective's views, then one clean copy of the image resized to ``size``."""

    def __init__(self, base: Any, size: int) -> None:
        self.base, self.size = base, size

    def __call__(self, image: torch.Tensor) -> Any:
        out = self.base(image)
        clean = resize_square(image, self.size)
        if isinstance(out, tuple):
            return [*out[0], clean], out[1]
        return [*out, clean]


@OBJECTIVES.register("self_distill")
class SelfDistillObjective(Objective):
    name = "self_distill"
    Options = SelfDistillOptions
    opts: SelfDistillOptions

    @classmethod
    def needs(cls, opts: SelfDistillOptions) -> Needs:
        return wrapped_needs(opts.base, opts.base_options)

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        from insitu.objectives import create_objective  # the registry imports this module lazily

        o = self.opts
        self.base = create_objective(o.base, embed_dim, patch_size, image_size, o.base_options, max_steps)
        self.needs_teacher = self.base.needs_teacher
        self.package = load_package(o.adapter, current_trust())  # the run's trust policy (run_trust), as every loader
        self.further = adapters_from_package(self.package.meta.adapter)
        self.further.load_state_dict(self.package.adapter_state(), strict=True)
        self.further.requires_grad_(False)
        self._checked = False

    def view_transform(self) -> CleanViewTransform:
        return CleanViewTransform(self.base.view_transform(), self.image_size)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if not self._checked:  # the package must have been made on this very backbone
            check_compatible(self.package.meta, student)
            self._checked = True
        self.base.step = self.step
        *views, clean = batch["views"]
        out = dict(self.base({**batch, "views": views}, student, teacher))
        pull = self.distill_loss(clean, student)
        out["loss_base"] = out["loss"]
        out["distill"] = pull
        out["loss"] = out["loss"] + self.opts.weight * pull
        return out

    def distill_loss(self, clean: torch.Tensor, student: nn.Module) -> torch.Tensor:
        """Mean squared L2 distance between the student's CLS and the further-pretrained CLS."""
        with torch.no_grad():
            target = student.with_adapters(self.further).forward_tokens(clean)[0]
        cls = student.forward_tokens(clean)[0]
        return (cls - target).pow(2).sum(-1).mean()

    def update_teacher(self, momentum: float) -> None:
        self.base.update_teacher(momentum)

    def head_state(self) -> dict[str, torch.Tensor]:
        return self.base.head_state()
