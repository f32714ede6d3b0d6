"""Temporal video objectives on a frozen 2-D ViT: RSPNet-style relative speed and CVRL.

Design choice: the backbone stays a frozen image ViT with trainable adapters. A clip of T frames
(B×T×C×H×W) is encoded frame by frame as (B·T)×C×H×W through ``student.forward_tokens``; the
per-frame CLS tokens are pooled over time into one clip vector, by their mean (``pool: mean``,
no parameters) or by a small temporal attention pool (``pool: attention``: one learnt score per
frame, softmax over time, initialised to the mean). Only the adapters, the pool and the small
projection heads train. Motion is therefore seen only through what the pooled frame features
share; there is no 3-D convolution or temporal attention inside the backbone, so any image
foundation model (and its adapters) can be reused unchanged for frame-level tasks afterwards.

Views come from one T×C×H×W window per item (the video domain's ``mode: clips``): the view
transform cuts the sub-clips (speeds, gaps) and applies *temporally consistent* augmentation, one
crop/flip/intensity draw per clip applied to all of its frames.

- ``rsp`` (Chen et al., RSPNet, AAAI 2021): three clips of one video, a and b at one playback speed,
  c at another. Appearance term: InfoNCE in which a clip and the same video at another speed are
  positives and the other videos in the batch are negatives. Speed term: a margin loss on
  temperature-scaled similarities of a speed head, ``max(0, margin - s(a,b)/τ + s(a,c)/τ)``: two
  clips that share a speed must be closer than two that do not. Default speeds {1, 2}.
- ``cvrl`` (Qian et al., CVRL, CVPR 2021): two clips of one video whose start gap is drawn from a
  linearly decreasing distribution (near clips are likelier), InfoNCE over the batch (NT-Xent).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from insitu.objectives import augment
from insitu.objectives.augment import ViewRecipe
from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.registry import OBJECTIVES, Needs


class ClipViewOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    frames: int = Field(4, gt=0)
    scale: tuple[float, float] = (0.3, 1.0)
    flip: bool = True
    intensity: float = Field(0.2, ge=0)


class TemporalOptions(ObjectiveOptions):
    proj_dim: int = Field(128, gt=0)
    hidden_dim: int = Field(256, gt=0)
    temperature: float = Field(0.1, gt=0)
    pool: Literal["mean", "attention"] = "mean"
    views: ClipViewOptions = ClipViewOptions()


class RSPOptions(TemporalOptions):
    speeds: list[int] = Field(default_factory=lambda: [1, 2])
    margin: float = Field(0.5, ge=0)
    speed_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _two_speeds(self) -> RSPOptions:
        if len(set(self.speeds)) < 2 or min(self.speeds) < 1:
            raise ValueError(f"speeds needs at least two distinct positive integers, got {self.speeds}")
        return self


class CVRLOptions(TemporalOptions):
    max_gap: int | None = Field(None, ge=0)


class TemporalPool(nn.Module):
    """Per-frame features B×T×D to one clip vector B×D: mean, or a learnt softmax weighting over time."""

    def __init__(self, embed_dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.score = nn.Linear(embed_dim, 1) if kind == "attention" else None
        if self.score is not None:
            nn.init.zeros_(self.score.weight)  # starts as the mean
            nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.score is None:
            return x.mean(dim=1)
        weights = self.score(x).softmax(dim=1)
        return (weights * x).sum(dim=1)


def projection_head(embed_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def encode_clips(student: nn.Module, clips: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """B×T×C×H×W clips -> B×D: every frame through the (adapted, frozen) 2-D ViT, pooled over time."""
    b, t = clips.shape[:2]
    cls = student.forward_tokens(clips.flatten(0, 1))[0]
    return pool(cls.view(b, t, -1))


def augment_clip(clip: torch.Tensor, size: int, opts: ClipViewOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """One crop box, flip and intensity draw applied to every frame of a T×C×H×W clip."""
    x, _ = augment.random_resized_crop(clip, size, opts.scale, generator)
    if opts.flip:
        x, _ = augment.random_flip(x, generator)
    if opts.intensity > 0:
        x = augment.gain_offset(x, opts.intensity, generator)
    return x


def _require_window(clip: torch.Tensor, need: int, what: str) -> None:
    """An assertion for hand-built clips: a config cannot get here (insitu.config checks Needs.items and Needs.frames)."""
    if clip.ndim != 4:
        raise ValueError(f"{what} needs T×C×H×W clips; set data.options.mode: clips (got a tensor of shape {tuple(clip.shape)}).")
    if clip.shape[0] < need:
        raise ValueError(f"{what} needs windows of at least {need} frames, got {clip.shape[0]}; raise data.options.clip_frames.")


class RSPViews(ViewRecipe):
    """Clips a, b at one speed and c at another from one window; returns the views and their speeds."""

    def __init__(self, size: int, opts: RSPOptions, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.size, self.opts = size, opts

    def window_needed(self) -> int:
        return rsp_window(self.opts)

    def __call__(self, clip: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        _require_window(clip, self.window_needed(), "the rsp objective")
        g, frames = self.generator, self.opts.views.frames
        s_ab = augment.choice(self.opts.speeds, g)
        s_c = augment.choice([s for s in self.opts.speeds if s != s_ab], g)
        cuts = [augment.temporal_window(clip, frames, s, g) for s in (s_ab, s_ab, s_c)]
        return [augment_clip(c, self.size, self.opts.views, g) for c in cuts], torch.tensor([s_ab, s_ab, s_c])


def rsp_window(opts: RSPOptions) -> int:
    """The frames one window must hold for RSP's fastest clip."""
    return (opts.views.frames - 1) * max(opts.speeds) + 1


class CVRLViews(ViewRecipe):
    """Two clips of one window whose start gap follows a linearly decreasing distribution."""

    def __init__(self, size: int, opts: CVRLOptions, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.size, self.opts = size, opts

    def __call__(self, clip: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        t, g = self.opts.views.frames, self.generator
        _require_window(clip, t, "the cvrl objective")
        max_gap = clip.shape[0] - t if self.opts.max_gap is None else min(self.opts.max_gap, clip.shape[0] - t)
        gap = sample_gap(max_gap, g)
        first = augment.window_start(clip.shape[0], t + gap, g)
        pair = (first, first + gap)
        starts = [pair[i] for i in augment.permutation(2, g)]  # which clip comes first is random too
        views = [augment_clip(clip[s : s + t], self.size, self.opts.views, g) for s in starts]
        return views, torch.tensor([gap, gap])


def sample_gap(max_gap: int, generator: torch.Generator | None = None) -> int:
    """A gap in 0..max_gap with probability proportional to ``max_gap + 1 - gap``."""
    return augment.linear_gap(max_gap, generator)


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``query`` matches row i of ``key``; other rows are negatives."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / temperature
    target = torch.arange(len(query), device=query.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR/CVRL loss over 2B embeddings: each view's positive is its pair, all other 2B-2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def speed_margin_loss(h: torch.Tensor, speeds: torch.Tensor, margin: float, temperature: float) -> torch.Tensor:
    """Margin loss over V views per sample (B×V×d): view 0 must be nearer views of its speed than others.

    For every sample and every (same-speed view p, different-speed view n) pair:
    ``max(0, margin - cos(h0, hp)/τ + cos(h0, hn)/τ)``, averaged over all such pairs.
    """
    h = F.normalize(h, dim=-1)
    sim = (h[:, :1] * h[:, 1:]).sum(-1) / temperature  # B×(V-1): anchor against the other views
    same = speeds[:, 1:] == speeds[:, :1]
    terms = (margin - sim.unsqueeze(2) + sim.unsqueeze(1)).clamp_min(0)  # [b, p, n]
    pairs = same.unsqueeze(2) & ~same.unsqueeze(1)
    return (terms * pairs).sum() / pairs.sum().clamp_min(1)


class _TemporalObjective(Objective):
    """Shared parts: temporal pool, clip encoding, and no teacher (contrastive, not distillation)."""

    needs_teacher = False
    items = "clips"

    @classmethod
    def needs(cls, opts: TemporalOptions) -> Needs:
        return Needs(items="clips", frames=opts.views.frames)

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        self.pool = TemporalPool(embed_dim, self.opts.pool)

    def encode(self, student: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encode every view in one backbone pass; returns one B×D tensor per view."""
        feats = encode_clips(student, torch.cat(views), self.pool)
        return list(feats.split(len(views[0])))


@OBJECTIVES.register("rsp")
class RSPObjective(_TemporalObjective):
    name = "rsp"
    Options = RSPOptions
    opts: RSPOptions

    @classmethod
    def needs(cls, opts: RSPOptions) -> Needs:
        return Needs(items="clips", frames=rsp_window(opts))

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts
        self.appearance_head = projection_head(embed_dim, o.hidden_dim, o.proj_dim)
        self.speed_head = projection_head(embed_dim, o.hidden_dim, o.proj_dim)

    def view_transform(self) -> RSPViews:
        return RSPViews(self.image_size, self.opts)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        o = self.opts
        a, b, c = self.encode(student, batch["views"])
        appearance = info_nce(self.appearance_head(a), self.appearance_head(c), o.temperature)
        speed_feats = torch.stack([self.speed_head(x) for x in (a, b, c)], dim=1)
        speeds = batch["view_meta"].to(speed_feats.device)
        speed = speed_margin_loss(speed_feats, speeds, o.margin, o.temperature)
        return {"loss": appearance + o.speed_weight * speed, "appearance": appearance.detach(), "speed": speed.detach()}

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"rsp.pool.{k}": v for k, v in self.pool.state_dict().items()}
        state.update({f"rsp.appearance.{k}": v for k, v in self.appearance_head.state_dict().items()})
        state.update({f"rsp.speed.{k}": v for k, v in self.speed_head.state_dict().items()})
        return state


@OBJECTIVES.register("cvrl")
class CVRLObjective(_TemporalObjective):
    name = "cvrl"
    Options = CVRLOptions
    opts: CVRLOptions

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts
        self.head = projection_head(embed_dim, o.hidden_dim, o.proj_dim)

    def view_transform(self) -> CVRLViews:
        return CVRLViews(self.image_size, self.opts)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        z1, z2 = (self.head(x) for x in self.encode(student, batch["views"]))
        loss = nt_xent(z1, z2, self.opts.temperature)
        out = {"loss": loss}
        if "view_meta" in batch:
            out["mean_gap"] = batch["view_meta"][:, 0].float().mean()
        return out

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"cvrl.pool.{k}": v for k, v in self.pool.state_dict().items()}
        state.update({f"cvrl.head.{k}": v for k, v in self.head.state_dict().items()})
        return state
