"""SIGReg (LeJEPA, Balestriero & LeCun 2025) as a regulariser on top of any objective.

SIGReg projects embeddings onto random unit directions and measures, per direction, how far the
empirical characteristic function is from that of N(0, 1) (the Epps–Pulley statistic, integrated
with a Gaussian window by the trapezoidal rule, times the sample count). lightly's `SIGReg`
computes exactly that statistic, so it is used as is.

``sigreg`` wraps a base objective: the student is handed to the base objective through a thin
recorder that keeps the CLS embedding of every view it encodes; the regulariser is the mean
statistic over those views. Nothing is encoded twice. ``L = L_base + weight * SIGReg(cls)``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import SIGReg
from pydantic import Field
from torch import nn

from insitu.objectives.base import Objective, ObjectiveOptions, wrapped_needs
from insitu.registry import OBJECTIVES, Needs


class SIGRegOptions(ObjectiveOptions):
    base: str = "dino"
    base_options: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(0.05, ge=0)
    num_vectors: int = Field(256, gt=0)
    knots: int = Field(17, gt=1)
    t_max: float = Field(3.0, gt=0)


class RecordingStudent(nn.Module):
    """Passes ``forward_tokens`` through to the student and keeps each call's CLS embedding."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.cls: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        # the rest of the backbone interface (metadata, with_adapters, attention) passes through unrecorded
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "student":
                raise
            return getattr(self.student, name)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        out = self.student.forward_tokens(x)
        self.cls.append(out[0])
        return out


@OBJECTIVES.register("sigreg")
class SIGRegObjective(Objective):
    name = "sigreg"
    Options = SIGRegOptions
    opts: SIGRegOptions

    @classmethod
    def needs(cls, opts: SIGRegOptions) -> Needs:
        return wrapped_needs(opts.base, opts.base_options)

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        from insitu.objectives import create_objective  # the registry imports this module lazily

        o = self.opts
        self.base = create_objective(o.base, embed_dim, patch_size, image_size, o.base_options, max_steps)
        self.needs_teacher = self.base.needs_teacher
        self.sigreg = SIGReg(knots=o.knots, t_max=o.t_max, num_vectors=o.num_vectors)

    def view_transform(self) -> Any:
        return self.base.view_transform()

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        self.base.step = self.step
        recorder = RecordingStudent(student)
        out = dict(self.base(batch, recorder, teacher))
        reg = sigreg_views(self.sigreg, recorder.cls)
        out["loss_base"] = out["loss"]
        out["sigreg"] = reg
        out["loss"] = out["loss"] + self.opts.weight * reg
        return out

    def update_teacher(self, momentum: float) -> None:
        self.base.update_teacher(momentum)

    def head_state(self) -> dict[str, torch.Tensor]:
        return self.base.head_state()


def sigreg_views(sigreg: SIGReg, embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Mean SIGReg statistic over views (each B×D, scored separately: views of one image are not independent)."""
    if not embeddings:
        raise ValueError("sigreg: the base objective encoded no view with the student")
    return torch.stack([sigreg(e.float()) for e in embeddings]).mean()
