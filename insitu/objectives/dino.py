"""DINO-style global self-distillation on the CLS token with an EMA teacher (Caron et al. 2021).

Student: frozen backbone + trainable adapters + a DINO projection head, on all crops. Teacher:
the same frozen backbone + an EMA copy of the adapters + an EMA copy of the head, on the global
crops only. Cross-entropy between the centred, sharpened teacher distribution and the student
distribution over every (teacher view, other student view) pair (lightly's `DINOLoss`). This is
GLARE's global term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.objectives.views import MultiCrop, MultiCropOptions


class DinoOptions(ObjectiveOptions):
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    views: MultiCropOptions = MultiCropOptions()


class DinoObjective(Objective):
    name = "dino"
    Options = DinoOptions

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o: DinoOptions = self.opts
        self.head = DINOProjectionHead(embed_dim, o.hidden_dim, o.bottleneck_dim, o.out_dim)
        # a fresh head + load_state_dict: deepcopy fails on weight-normalised layers
        self.teacher_head = DINOProjectionHead(embed_dim, o.hidden_dim, o.bottleneck_dim, o.out_dim)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.loss = DINOLoss(
            output_dim=o.out_dim,
            teacher_temp=o.teacher_temp,
            student_temp=o.student_temp,
            center_momentum=o.center_momentum,
        )

    def view_transform(self) -> MultiCrop:
        return MultiCrop(self.image_size, self.patch_size, self.opts.views)

    def teacher_temp(self) -> float:
        o: DinoOptions = self.opts
        if self.step >= o.warmup_teacher_temp_steps:
            return o.teacher_temp
        t = self.step / max(1, o.warmup_teacher_temp_steps)
        return o.warmup_teacher_temp + t * (o.teacher_temp - o.warmup_teacher_temp)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("the DINO objective needs a teacher")
        views: list[torch.Tensor] = batch["views"]
        n_global = self.opts.views.global_crops
        with torch.no_grad():
            t_cls = [teacher.forward_tokens(v)[0] for v in views[:n_global]]
            t_out = [self.teacher_head(c) for c in t_cls]
        s_cls = [student.forward_tokens(v)[0] for v in views]
        s_out = [self.head(c) for c in s_cls]
        loss = self.loss(t_out, s_out, teacher_temp=self.teacher_temp())
        return {"loss": loss, "collapse_std": feature_std(s_cls[0].detach()), "teacher_temp": torch.tensor(self.teacher_temp())}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_momentum(self.head, self.teacher_head, momentum)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {f"dino.{k}": v for k, v in self.head.state_dict().items()}


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of L2-normalised features times sqrt(D): about 1 when spread, 0 on collapse."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])
