"""ConVIRT (Zhang et al. 2020) and its CLIP-style symmetric variant: contrastive image-text pretraining.

Image side: the frozen ViT with trainable adapters, its CLS (or mean patch) feature, and a projection
g_v (Linear-ReLU-Linear). Text side: a Hugging Face encoder (`insitu.text`) with its embeddings and
lower layers frozen and its last ``trainable_layers`` layers tuned (default: the upper half; ConVIRT
tunes the last 6 of ClinicalBERT's 12), max-pooled over tokens as in ConVIRT (or mean/CLS), and a
projection g_u. With v, u the
L2-normalised projections of a batch of N pairs and s(i, k) = <v_i, u_k> / τ:

    ℓ(v→u)_i = -log exp s(i, i) / Σ_k exp s(i, k)      (image i against all texts)
    ℓ(u→v)_i = -log exp s(i, i) / Σ_k exp s(k, i)      (text i against all images)
    L = mean_i [ λ·ℓ(v→u)_i + (1−λ)·ℓ(u→v)_i ]        defaults τ = 0.1, λ = 0.75

Identical texts in a batch ("No acute cardiopulmonary abnormality.") are false negatives: with
``mask_duplicates`` a pair (i, k≠i) whose texts are equal (after case/space folding) is removed
from both denominators. ``clip``: λ = 0.5 and a learnable temperature (a log-scale parameter
initialised to 1/τ, clamped to ``max_logit_scale``): CLIP's symmetric loss with a learnt
temperature. Baselines: ``image_tower: frozen`` reads the bare backbone (no adapters, no gradient:
the adapters stay at their zero initialisation, so the package is the frozen tower) and, with
``trainable_layers: 0``, the text tower is frozen too: only g_v and g_u train (the
projection-only baseline). Downstream tasks use the backbone features
before g_v; the projections and the tuned text layers go into the adapter package as head tensors.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from insitu.objectives import augment
from insitu.objectives.augment import ViewRecipe
from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.registry import OBJECTIVES, Needs
from insitu.text import TextEncoder, load_text_encoder


class PairViewOptions(BaseModel):
    """ConVIRT's image augmentation: random crop, flip, small rotation, intensity jitter, blur."""

    model_config = ConfigDict(extra="forbid")
    scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    rotate_deg: float = Field(20.0, ge=0)
    intensity: float = Field(0.4, ge=0)
    blur_sigma: tuple[float, float] = (0.1, 3.0)
    blur_prob: float = Field(0.5, ge=0, le=1)


class ConVIRTOptions(ObjectiveOptions):
    text_encoder: str = Field(
        description="an installed encoder (all-minilm-l6-v2, from insitu[text]), a local folder written by save_pretrained, "
        "or a hub id in the local HF cache"
    )
    trainable_layers: int | None = Field(None, ge=0, description="the last n text layers train; default: the upper half (ConVIRT)")
    pooling: Literal["mean", "max", "cls"] = Field("max", description="ConVIRT max-pools the last layer's token outputs")
    max_length: int = Field(128, gt=0)
    image_features: Literal["cls", "mean"] = "cls"
    image_tower: Literal["adapted", "frozen"] = Field(
        "adapted", description="frozen: the bare backbone without adapters or gradient (a baseline: only the projections adapt the image side)"
    )
    proj_dim: int = Field(512, gt=0)
    hidden_dim: int | None = Field(None, gt=0, description="hidden width of g_v/g_u; default: the input width")
    temperature: float = Field(0.1, gt=0)
    lam: float = Field(0.75, ge=0, le=1, description="λ, the weight of the image→text term")
    mask_duplicates: bool = True
    views: PairViewOptions = PairViewOptions()


class CLIPOptions(ConVIRTOptions):
    temperature: float = Field(0.07, gt=0, description="initial temperature (learnt)")
    lam: float = Field(0.5, ge=0, le=1)
    max_logit_scale: float = Field(100.0, gt=1)


def text_groups(texts: list[str]) -> torch.Tensor:
    """One integer per text; equal texts (case and whitespace folded) share it."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(" ".join(t.lower().split()), len(seen)) for t in texts])


def convirt_loss(
    v: torch.Tensor, u: torch.Tensor, logit_scale: float | torch.Tensor, lam: float, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, mean ℓ(v→u), mean ℓ(u→v)) for paired rows of ``v`` (images) and ``u`` (texts)."""
    logits = F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T * logit_scale  # [image i, text k]
    if groups is not None:
        groups = groups.to(logits.device)
        same = groups[:, None] == groups[None, :]
        false_neg = same & ~torch.eye(len(groups), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(false_neg, float("-inf"))
    target = torch.arange(len(v), device=v.device)
    i2t = F.cross_entropy(logits, target, reduction="none")
    t2i = F.cross_entropy(logits.T, target, reduction="none")
    return (lam * i2t + (1 - lam) * t2i).mean(), i2t.mean(), t2i.mean()


def projection(in_dim: int, hidden_dim: int | None, out_dim: int) -> nn.Sequential:
    """g_v / g_u: Linear-ReLU-Linear, as in ConVIRT."""
    hidden = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class ConVIRTImageView(ViewRecipe):
    """One augmented view of the image of a pair (the text side is sampled by the domain)."""

    def __init__(self, size: int, opts: PairViewOptions, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.size, self.opts = size, opts

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        o, g = self.opts, self.generator
        x, _ = augment.random_resized_crop(image, self.size, o.scale, g)
        if o.flip:
            x, _ = augment.random_flip(x, g)
        if o.rotate_deg > 0:
            x = augment.random_rotate(x, o.rotate_deg, g)
        if o.intensity > 0:
            x = augment.gain_offset(x, o.intensity, g)
        x, _ = augment.random_blur(x, o.blur_prob, o.blur_sigma, g)
        return [x]


@OBJECTIVES.register("convirt")
class ConVIRTObjective(Objective):
    """Bidirectional image-text contrastive loss with a fixed temperature and λ-weighted directions."""

    name = "convirt"
    Options = ConVIRTOptions
    opts: ConVIRTOptions
    needs_teacher = False
    items = "pairs"

    @classmethod
    def needs(cls, opts: ConVIRTOptions) -> Needs:
        return Needs(items="pairs", text_tower=opts.text_encoder)

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts
        self.text: TextEncoder = load_text_encoder(o.text_encoder, o.trainable_layers, o.pooling, o.max_length)
        self.image_proj = projection(embed_dim, o.hidden_dim, o.proj_dim)
        self.text_proj = projection(self.text.hidden_size, o.hidden_dim, o.proj_dim)

    def view_transform(self) -> ConVIRTImageView:
        return ConVIRTImageView(self.image_size, self.opts.views)

    def logit_scale(self) -> float | torch.Tensor:
        return 1.0 / self.opts.temperature

    def image_features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (pre-projection): what downstream tasks use."""
        if self.opts.image_tower == "frozen":
            with torch.no_grad():
                cls, patches, _ = getattr(model, "backbone", model).forward_tokens(images)
            return cls if self.opts.image_features == "cls" else patches.mean(1)
        cls, patches, _ = model.forward_tokens(images)
        return cls if self.opts.image_features == "cls" else patches.mean(1)

    def embed_images(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_features(model, images))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text_proj(self.text(texts))

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if "text" not in batch:  # a config cannot get here (insitu.config checks Needs.items); a hand-built batch can
            raise ValueError(f"the {self.name} objective needs image-text pairs: set data.domain: pairs (the batch has no text).")
        texts = batch["text"]
        v = self.embed_images(student, batch["views"][0])
        u = self.embed_texts(texts)
        groups = text_groups(texts) if self.opts.mask_duplicates else None
        loss, i2t, t2i = convirt_loss(v, u, self.logit_scale(), self.opts.lam, groups)
        out = {"loss": loss, "image_to_text": i2t.detach(), "text_to_image": t2i.detach()}
        if groups is not None:
            out["duplicate_texts"] = torch.tensor(1.0 - len(set(groups.tolist())) / max(1, len(texts)))
        return out

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"{self.name}.image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        state.update({f"{self.name}.text_proj.{k}": v for k, v in self.text_proj.state_dict().items()})
        state.update({f"{self.name}.text.tuned.{k}": v for k, v in self.text.trainable_state().items()})
        return state

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `head_state` saved (from an adapter package) into this objective."""
        prefix = f"{self.name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing = [k for k in self.state_dict() if k not in own]
        if not own or missing:
            raise ValueError(f"the package's head tensors do not match a {self.name} objective (missing {missing[:5]})")
        self.load_state_dict(own, strict=True)


@OBJECTIVES.register("clip")
class CLIPObjective(ConVIRTObjective):
    """The symmetric variant: λ = 0.5 by default and a learnt temperature."""

    name = "clip"
    Options = CLIPOptions
    opts: CLIPOptions

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.opts.temperature)))

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.opts.max_logit_scale)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(batch, student, teacher)
        out["temperature"] = 1.0 / self.logit_scale().detach()
        return out

    def head_state(self) -> dict[str, torch.Tensor]:
        return {**super().head_state(), "clip.log_scale": self.log_scale.detach().reshape(1)}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if "clip.log_scale" in state:
            state["clip.log_scale"] = state["clip.log_scale"].reshape(())
        super().load_head_state(state)
