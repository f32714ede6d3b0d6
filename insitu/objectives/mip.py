"""Multi-instance prediction on generated fractals (Anderson & Farrell 2021, "Improving Fractal Pre-training").

A fixed, seeded bank of IFS systems are the classes; every image of the ``fractals`` domain holds
1-3 instances drawn from it, and the ViT predicts which systems are present (multi-label BCE on the
CLS token concatenated with the mean patch token). Two optional extra tasks keep colour in the
features: ``hue_bins > 0`` also predicts each instance's hue class and the background's texture
class (the domain then draws coloured instances on textured backgrounds), and ``colour_layout > 0``
regresses the input's own colour on a g×g grid (its average pool: no label needed). Every image is
flipped at random and, with probability ``grey_prob``, turned grey (whose hue loss is then skipped).

This trains the embedded base from scratch (insitu.pipelines.base_pretrain, ``train.full_finetune``);
its heads stay behind, only the ViT ships.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from insitu.domains.fractals import NUM_TEXTURES, SystemBank
from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.registry import OBJECTIVES, Needs


class MIPOptions(ObjectiveOptions):
    num_systems: int = Field(100, ge=2, description="size of the IFS system bank (the classes)")
    bank_seed: int | None = Field(
        None, description="seed of the IFS system bank (default: the run's seed); keep a continued base's bank while varying seed"
    )
    grey_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of images turned grey (helps 1-band users)")
    hue_bins: int = Field(
        0, ge=0, le=64, description="> 0 also predicts each instance's hue class (of this many) and the background's texture class"
    )
    colour_layout: int = Field(
        0, ge=0, le=16, description="> 0 also regresses the image's colour on this g x g grid (its average pool), keeping colour in the features"
    )
    colour_layout_weight: float = Field(1.0, gt=0.0, description="weight of the colour-layout MSE against the system BCE")


@OBJECTIVES.register("mip")
class MIPObjective(Objective):
    """Linear multi-label heads over the pooled ViT tokens: systems, (hue classes, texture), (colour layout)."""

    name = "mip"
    Options = MIPOptions
    opts: MIPOptions
    needs_teacher = False
    items = "fractals"

    @classmethod
    def needs(cls, opts: MIPOptions) -> Needs:  # type: ignore[override]
        return Needs(items="fractals", teacher=False)

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o, pooled = self.opts, 2 * embed_dim
        # the heads are built in this order (systems, hue, texture, layout): a seeded run draws the same weights
        self.head = nn.Linear(pooled, o.num_systems)
        if o.hue_bins:
            self.hue_head = nn.Linear(pooled, o.hue_bins)
            self.texture_head = nn.Linear(pooled, NUM_TEXTURES)
        if o.colour_layout:
            self.layout_head = nn.Linear(pooled, 3 * o.colour_layout**2)

    def system_bank(self, seed: int) -> SystemBank:
        """The IFS systems that are the classes: seeded by ``bank_seed``, else by the run's ``seed``."""
        return SystemBank(self.opts.num_systems, seed=seed if self.opts.bank_seed is None else self.opts.bank_seed)

    def describe(self, continued_from: str | None) -> str:
        """What the base was trained on, for its card."""
        o = self.opts
        what = "which IFS systems, which hue classes and which background texture" if o.hue_bins else "which IFS systems"
        start = f"continued from {continued_from}" if continued_from else "from scratch"
        text = f"multi-instance prediction ({what} are in the image, multi-label BCE) {start}, all parameters"
        if o.colour_layout:
            text += f" + the image's colour on a {o.colour_layout}x{o.colour_layout} grid (MSE)"
        return text

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """``batch``: ``image`` [B, 3, H, W] (normalised), ``systems`` [B, num_systems] multi-hot, and with
        ``hue_bins`` also ``hues`` [B, hue_bins] multi-hot and ``texture`` [B] class ids."""
        o = self.opts
        x, labels = batch["image"], batch["systems"]
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        grey = torch.rand(x.shape[0], device=x.device) < o.grey_prob
        x = torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
        cls, patches, _ = student.forward_tokens(x)
        pooled = torch.cat([cls, patches.mean(1)], 1)
        logits = self.head(pooled)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        out: dict[str, torch.Tensor] = {}
        if o.hue_bins:  # hue classes (not for grey images: their hue is gone) and texture class
            hues, texture = batch["hues"], batch["texture"]
            hue_loss = F.binary_cross_entropy_with_logits(self.hue_head(pooled), hues, reduction="none").mean(1)
            hue_loss = (hue_loss * (~grey).float()).sum() / (~grey).float().sum().clamp_min(1.0)
            texture_logits = self.texture_head(pooled)
            loss = loss + hue_loss + F.cross_entropy(texture_logits, texture)
            out["hue_loss"] = hue_loss
            out["texture_acc"] = (texture_logits.argmax(1) == texture).float().mean()
        if o.colour_layout:  # the (flipped, maybe grey) input's own colours: no label, keeps colour in the features
            target = F.adaptive_avg_pool2d(x, o.colour_layout).flatten(1)
            out["layout_mse"] = F.mse_loss(self.layout_head(pooled), target)
            loss = loss + o.colour_layout_weight * out["layout_mse"]
        out["loss"] = loss
        out["set_acc"] = set_accuracy(logits.detach(), labels)
        return out


@torch.no_grad()
def set_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of images whose top-k systems (k = instances present) are exactly the ones present."""
    k = labels.sum(1).long()
    ranked = logits.argsort(1, descending=True)
    return torch.stack([labels[i, ranked[i, : k[i]]].sum() == k[i] for i in range(len(k))]).float().mean()
