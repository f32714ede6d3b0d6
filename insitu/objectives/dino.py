"""DINO-style global self-distillation on the CLS token with an EMA teacher (Caron et al. 2021).

Student: frozen backbone + trainable adapters + a DINO projection head, on all crops. Teacher:
the same frozen backbone + an EMA copy of the adapters + an EMA copy of the head, on the global
crops only. Cross-entropy between the teacher's target distribution and the student distribution
over every (teacher view, other student view) pair. This is GLARE's global term.

Changes for a *frozen* base (docs/objectives.md, "DINO on a frozen base"):

- the heads see a running per-dimension standardisation of the backbone feature
  (``head_input_norm: running``): a frozen base's CLS vectors can be nearly collinear (mean pairwise
  cosine 0.8 on X-rays), and unnormalised they give every image the same teacher distribution;
- a fixed teacher temperature by default (``warmup_teacher_temp_steps: 0``);
- teacher targets by centring (DINO) or Sinkhorn–Knopp (``centering: sinkhorn``, as in DINOv2;
  lightly's ``sinkhorn``);
- an optional KoLeo regulariser on the student CLS (``koleo_weight``, lightly's ``KoLeoLoss``).

Every call reports the teacher's health (entropy, entropy / ln K, student–teacher KL) as
``health/...`` entries of its output.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.loss import KoLeoLoss
from lightly.loss.msn_loss import sinkhorn
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.center import center_mean, center_momentum
from lightly.models.utils import deactivate_requires_grad, update_momentum
from pydantic import Field, model_validator
from torch import nn

from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.objectives.health import distribution_health, kl_divergence
from insitu.objectives.views import MultiCrop, MultiCropOptions
from insitu.registry import OBJECTIVES


class DinoOptions(ObjectiveOptions):
    out_dim: int = Field(1024, gt=1)
    hidden_dim: int = Field(512, gt=0)
    bottleneck_dim: int = Field(128, gt=0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_steps: int = Field(0, ge=0)  # 0: the teacher temperature is fixed
    centering: Literal["center", "sinkhorn"] = "center"
    center_momentum: float = Field(0.9, ge=0, lt=1)
    sinkhorn_iterations: int = Field(3, gt=0)
    head_input_norm: Literal["running", "none"] = "running"
    head_norm_momentum: float = Field(0.9, ge=0, lt=1)
    koleo_weight: float = Field(0.0, ge=0)
    views: MultiCropOptions = MultiCropOptions()

    @model_validator(mode="after")
    def _enough_views(self) -> DinoOptions:
        views = self.views.global_crops + self.views.local_crops
        if views < 2:
            raise ValueError(f"the DINO loss compares pairs of views: set views.global_crops + views.local_crops >= 2 (got {views})")
        return self


class RunningStandardize(nn.Module):
    """Per-dimension (x - mean) / std with running statistics; no learned parameters.

    One instance is shared by a student head and its teacher copy, so both see the same map. The
    statistics move only through `update` (called on teacher inputs); the first update sets them.
    """

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        mean, var = x.mean(0), x.var(0, unbiased=False)
        m = (self.count > 0).float() * self.momentum  # the first update sets the statistics (no host sync)
        self.mean.mul_(m).add_((1 - m) * mean)
        self.var.mul_(m).add_((1 - m) * var)
        self.count += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) * torch.rsqrt(self.var + self.eps).to(x.dtype)


class NoStandardize(nn.Identity):
    """``head_input_norm: none``: the heads see the raw backbone feature (the old behaviour)."""

    def update(self, x: torch.Tensor) -> None:
        return None


def make_head_norm(kind: str, dim: int, momentum: float) -> nn.Module:
    return RunningStandardize(dim, momentum) if kind == "running" else NoStandardize()


class DistillLoss(nn.Module):
    """Cross-entropy between teacher targets and student distributions, DINO (pairs) or iBOT (patches).

    Targets: softmax((t - centre) / T) with an EMA centre (``center``), or Sinkhorn–Knopp
    normalisation of softmax(t / T) over the rows of one call (``sinkhorn``). After each call
    ``self.health`` holds the teacher entropy, its ratio to ln K and the student–teacher KL.
    """

    def __init__(
        self, out_dim: int, student_temp: float, center_momentum: float, centering: str = "center", sinkhorn_iterations: int = 3
    ) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.health: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Target distributions for teacher logits of shape ...×K (rows are independent samples)."""
        t = teacher_out.float()
        if self.centering == "sinkhorn":
            probs = F.softmax(t.reshape(-1, t.shape[-1]) / teacher_temp, dim=-1)
            return sinkhorn(probs, self.sinkhorn_iterations, gather_distributed=True).reshape(t.shape)
        return F.softmax((t - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher logits' mean (over every rank, lightly's `center_mean`)."""
        batch_center = center_mean(teacher_out.detach().float().reshape(-1, teacher_out.shape[-1]), dim=(0,))
        self.center.copy_(center_momentum(self.center, batch_center, self.center_momentum))

    def forward(self, teacher_out: list[torch.Tensor], student_out: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """Mean cross-entropy over every (teacher view i, student view j != i) pair (DINO)."""
        t = torch.stack(teacher_out)
        p_t = self.targets(t, teacher_temp)
        log_s = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        pairs = [(i, j) for i in range(len(p_t)) for j in range(len(log_s)) if i != j]
        if not pairs:
            raise ValueError("the DINO loss needs at least two views")
        loss = torch.stack([-(p_t[i] * log_s[j]).sum(-1).mean() for i, j in pairs]).mean()
        kl = torch.stack([kl_divergence(p_t[i], log_s[j]) for i, j in pairs]).mean().detach()
        self.health = {**distribution_health(p_t, p_t.clamp_min(1e-12).log()), "student_teacher_kl": kl}
        self.update_center(t)
        return loss

    def patch_forward(self, teacher_out: torch.Tensor, student_out: torch.Tensor, mask: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """iBOT patch loss: N masked tokens (rows), per image the mean over its masked tokens, then over images."""
        p_t = self.targets(teacher_out, teacher_temp)
        log_s = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        per_token = -(p_t * log_s).sum(-1)
        weight = (1.0 / mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)).expand_as(mask)[mask]
        self.health = distribution_health(p_t, log_s)
        self.update_center(teacher_out)
        return (per_token * weight).sum() / mask.shape[0]


@OBJECTIVES.register("dino")
class DinoObjective(Objective):
    name = "dino"
    Options = DinoOptions
    opts: DinoOptions
    cacheable_views = True

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts
        self.head = DINOProjectionHead(embed_dim, o.hidden_dim, o.bottleneck_dim, o.out_dim)
        # a fresh head + load_state_dict: deepcopy fails on weight-normalised layers
        self.teacher_head = DINOProjectionHead(embed_dim, o.hidden_dim, o.bottleneck_dim, o.out_dim)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.head_norm = make_head_norm(o.head_input_norm, embed_dim, o.head_norm_momentum)
        self.loss = self.distill_loss(o.out_dim)
        self.koleo = KoLeoLoss()

    def distill_loss(self, out_dim: int) -> DistillLoss:
        o = self.opts
        return DistillLoss(out_dim, o.student_temp, o.center_momentum, o.centering, o.sinkhorn_iterations)

    def view_transform(self) -> MultiCrop:
        return MultiCrop(self.image_size, self.patch_size, self.opts.views)

    def teacher_temp(self) -> float:
        o = self.opts
        if self.step >= o.warmup_teacher_temp_steps:
            return o.teacher_temp
        t = self.step / max(1, o.warmup_teacher_temp_steps)
        return o.warmup_teacher_temp + t * (o.teacher_temp - o.warmup_teacher_temp)

    def global_loss(self, t_cls: list[torch.Tensor], s_cls: list[torch.Tensor], temp: float) -> torch.Tensor:
        """DINO CLS term; the teacher's CLS updates the shared head-input statistics first."""
        if self.training:
            self.head_norm.update(torch.cat(t_cls))
        t_out = [self.teacher_head(self.head_norm(c)) for c in t_cls]
        s_out = [self.head(self.head_norm(c)) for c in s_cls]
        return self.loss(t_out, s_out, teacher_temp=temp)

    def koleo_loss(self, s_cls: list[torch.Tensor]) -> torch.Tensor:
        """KoLeo (Sablayrolles et al. 2019, as in DINOv2) on the student CLS of each global view."""
        return torch.stack([self.koleo(c.float()) for c in s_cls]).mean()

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("the DINO objective needs a teacher")
        views: list[torch.Tensor] = batch["views"]
        n_global = self.opts.views.global_crops
        with torch.no_grad():
            t_cls = [teacher.forward_tokens(v)[0] for v in views[:n_global]]
        s_cls = [student.forward_tokens(v)[0] for v in views]
        temp = self.teacher_temp()
        loss = self.global_loss(t_cls, s_cls, temp)
        out = {"collapse_std": feature_std(s_cls[0].detach()), "teacher_temp": torch.tensor(temp), **health_logs(self.loss)}
        if self.opts.koleo_weight > 0:
            out["koleo"] = self.koleo_loss(s_cls[:n_global])
            loss = loss + self.opts.koleo_weight * out["koleo"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_momentum(self.head, self.teacher_head, momentum)

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"dino.{k}": v for k, v in self.head.state_dict().items()}
        state.update({f"dino_input_norm.{k}": v for k, v in self.head_norm.state_dict().items()})
        return state


def health_logs(loss: DistillLoss, suffix: str = "") -> dict[str, torch.Tensor]:
    """A loss's last teacher health as ``health/<name><suffix>`` output entries."""
    return {f"health/{k}{suffix}": v for k, v in loss.health.items()}


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of L2-normalised features times sqrt(D): about 1 when spread, 0 on collapse."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])
