"""SimCLR (Chen et al. 2020): two views of an image should be each other's nearest embedding.

The NT-Xent loss (lightly's ``NTXentLoss``) on a small projector over the student's CLS: for each
view, its partner is the positive and the other 2B − 2 views of the batch are the negatives. No
teacher, no prototype head to learn first: the signal reaches the adapters from the first step,
which is why the embedded quickstart uses it for its short run. The views are crops, flips, blur
and an intensity change (``views.intensity``) of the normalised image: the adapters are pushed
towards what is shared by two acquisitions of the same tissue and away from what differs.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pydantic import Field, model_validator
from torch import nn

from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.objectives.dino import feature_std
from insitu.objectives.views import MultiCrop, MultiCropOptions
from insitu.registry import OBJECTIVES


class SimCLROptions(ObjectiveOptions):
    hidden_dim: int = Field(512, gt=0)
    out_dim: int = Field(128, gt=1)
    temperature: float = Field(0.2, gt=0)
    views: MultiCropOptions = MultiCropOptions(global_crops=2, local_crops=0)

    @model_validator(mode="after")
    def _two_views(self) -> SimCLROptions:
        v = self.views
        if v.global_crops != 2 or v.local_crops != 0:
            raise ValueError(
                "simclr compares exactly two views: set views.global_crops=2 and views.local_crops=0 "
                f"(got views.global_crops={v.global_crops}, views.local_crops={v.local_crops})"
            )
        return self


@OBJECTIVES.register("simclr")
class SimCLRObjective(Objective):
    name = "simclr"
    Options = SimCLROptions
    opts: SimCLROptions
    needs_teacher = False
    cacheable_views = True

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts  # two views exactly: SimCLROptions checks it
        self.head = SimCLRProjectionHead(embed_dim, o.hidden_dim, o.out_dim)
        self.loss = NTXentLoss(temperature=o.temperature)

    def view_transform(self) -> MultiCrop:
        return MultiCrop(self.image_size, self.patch_size, self.opts.views)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        a, b = (student.forward_tokens(v)[0] for v in batch["views"])
        loss = self.loss(self.head(a), self.head(b))
        return {"loss": loss, "collapse_std": feature_std(a.detach())}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {f"simclr.{k}": v for k, v in self.head.state_dict().items()}
