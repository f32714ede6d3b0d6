"""GLARE: global, local and regional consistency for continual pretraining through adapters.

After Ebouky et al. 2025 ("Enhancing Semantic Segmentation with Continual Self-Supervised
Pre-training"). Their equations are not public; this is our interpretation (docs/objectives.md):

- **global**: DINO self-distillation on the CLS token, both view orders (the `dino` objective,
  reused by subclassing: same head, head-input standardisation, centring or Sinkhorn–Knopp,
  sharpening, optional KoLeo).
- **local** (iBOT-style): the student sees each global view with a random subset of patches
  corrupted (blurred, noised or zeroed); at those positions its patch-token distribution is
  matched to the teacher's on the clean view (iBOT patch loss, its own centre).
- **regional**: from the teacher's last-layer CLS->patch attention on each global view, K
  high-attention seeds are grown to w×w windows; patch tokens are mean-pooled into region tokens;
  each teacher region token finds its counterpart in the *other* view by cross-attention over that
  view's teacher patch tokens, and the student's tokens pooled with those weights are trained to
  match the teacher region's distribution (DINO loss, its own centre). The cross-attention compares
  tokens standardised per view (`match_space`), not raw ones: a frozen base's patch tokens of one
  image share a dominant common component, so raw cosines barely differ and the match is uniform.

``L = L_global + λ_local L_local + λ_region L_region``; each term can be switched off. Only the
student adapters and the heads train; the pipeline EMA-updates the teacher adapters and this
objective EMA-updates its teacher heads. The dense head sees patch and region tokens through its
own running standardisation (fed by the teacher's clean patch tokens), like the global head.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from insitu.objectives.augment import gaussian_blur
from insitu.objectives.dino import DinoObjective, DinoOptions, feature_std, health_logs, make_head_norm
from insitu.objectives.health import embedding_spread, match_health
from insitu.registry import OBJECTIVES


class LocalOptions(BaseModel):
    """The patch-level term: which patches the student sees corrupted, and how."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    weight: float = Field(1.0, ge=0)
    corruption: Literal["blur", "noise", "mask"] = "blur"
    ratio: float = Field(0.3, gt=0, lt=1)
    blur_sigma: float = Field(2.0, gt=0)
    noise_std: float = Field(1.0, gt=0)


class RegionOptions(BaseModel):
    """The region-level term: K attention-seeded windows of w×w patches per global view.

    ``match_features`` is the space the cross-view match compares tokens in (see ``match_space``):
    ``standardised`` (default), ``centred``, or ``raw`` (the old behaviour, nearly uniform on a frozen base).
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    weight: float = Field(1.0, ge=0)
    regions: int = Field(4, gt=0)
    window: int = Field(3, gt=0)
    match_temp: float = Field(0.1, gt=0)
    match_features: Literal["standardised", "centred", "raw"] = "standardised"


class GlareOptions(DinoOptions):
    global_term: bool = True
    local: LocalOptions = LocalOptions()
    regional: RegionOptions = RegionOptions()
    dense_out_dim: int = Field(256, gt=0)
    dense_hidden_dim: int = Field(256, gt=0)
    dense_bottleneck_dim: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _enough_views(self) -> GlareOptions:  # replaces DINO's check: each term has its own need
        views = self.views.global_crops + self.views.local_crops
        if not (self.global_term or self.local.enabled or self.regional.enabled):
            raise ValueError("glare needs at least one of global_term, local.enabled, regional.enabled")
        if self.global_term and views < 2:
            raise ValueError(f"the global term compares pairs of views: set views.global_crops + views.local_crops >= 2 (got {views})")
        if not (self.global_term or self.local.enabled) and self.views.global_crops < 2:
            raise ValueError("the regional term alone needs two global crops: set views.global_crops >= 2, or enable local or global_term")
        return self


@OBJECTIVES.register("glare")
class GlareObjective(DinoObjective):
    name = "glare"
    cacheable_views = False  # corrupts local views on the training device
    Options = GlareOptions
    opts: GlareOptions

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts  # at least one term that applies: GlareOptions checks it
        # one head for patch and region tokens (both are dense tokens), its own EMA copy
        dims = (embed_dim, o.dense_hidden_dim, o.dense_bottleneck_dim, o.dense_out_dim)
        self.dense_head = DINOProjectionHead(*dims)
        self.teacher_dense_head = DINOProjectionHead(*dims)
        self.teacher_dense_head.load_state_dict(self.dense_head.state_dict())
        deactivate_requires_grad(self.teacher_dense_head)
        self.dense_norm = make_head_norm(o.head_input_norm, embed_dim, o.head_norm_momentum)
        self.patch_loss = self.distill_loss(o.dense_out_dim)
        self.region_loss = self.distill_loss(o.dense_out_dim)
        self.match_health: dict[str, torch.Tensor] = {}  # the last regional match's entropy and top-1 weight

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("the GLARE objective needs a teacher")
        o = self.opts
        views: list[torch.Tensor] = batch["views"]
        globals_ = views[: o.views.global_crops]
        teacher_out = self._teacher_pass(globals_, teacher)
        student_in, masks = self._student_inputs(globals_)
        s_tokens = [student.forward_tokens(v) for v in student_in + views[len(globals_) :]]
        temp = self.teacher_temp()
        out: dict[str, torch.Tensor] = {"collapse_std": feature_std(s_tokens[0][0].detach()), "teacher_temp": torch.tensor(temp)}
        if self.training:
            self.dense_norm.update(torch.cat([t[1] for t in teacher_out]))
        terms = self._terms(teacher_out, s_tokens, masks, temp, out)
        weights = {"global": 1.0, "local": o.local.weight, "region": o.regional.weight}
        out.update({f"loss_{name}": value for name, value in terms.items()})
        loss = sum(weights[name] * value for name, value in terms.items())
        if o.koleo_weight > 0:
            out["koleo"] = self.koleo_loss([s[0] for s in s_tokens[: len(globals_)]])
            loss = loss + o.koleo_weight * out["koleo"]
        # not the guarded health/embedding_spread: a DINO head's spread falls ~3x early in healthy runs (docs/objectives.md)
        out["health/projector_spread"] = self.projector_spread(s_tokens[0])
        out["loss"] = loss
        return out

    @torch.no_grad()
    def projector_spread(self, s_tokens: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``embedding_spread`` of the student projector's L2-normalised bottleneck on the first view
        (the global head on CLS; the dense head on patch tokens when the global term is off)."""
        if self.opts.global_term:
            return embedding_spread(self.head.layers(self.head_norm(s_tokens[0].detach())))
        return embedding_spread(self.dense_head.layers(self.dense_norm(s_tokens[1].detach().flatten(0, 1))))

    def _terms(
        self, teacher_out: list[tuple[torch.Tensor, ...]], s_tokens: list[tuple], masks: list[torch.Tensor] | None, temp: float, out: dict
    ) -> dict[str, torch.Tensor]:
        """The enabled terms' losses; their teacher health goes into ``out`` as ``health/<metric>_<term>``."""
        o = self.opts
        n_global = len(teacher_out)
        terms: dict[str, torch.Tensor] = {}
        if o.global_term:
            terms["global"] = self.global_loss([t[0] for t in teacher_out], [s[0] for s in s_tokens], temp)
            out.update(health_logs(self.loss, "_global"))
        if o.local.enabled:
            terms["local"] = self.local_loss([t[1] for t in teacher_out], [s[1] for s in s_tokens[:n_global]], masks, temp)
            out.update(health_logs(self.patch_loss, "_local"))
        if o.regional.enabled and n_global >= 2:
            terms["region"] = self.regional_loss(teacher_out[:2], [s[1] for s in s_tokens[:2]], temp)
            out.update(health_logs(self.region_loss, "_region"))
            out.update({f"health/{k}": v for k, v in self.match_health.items()})
        if not terms:
            raise ValueError("glare: no term applies (the regional term needs two global crops; views.global_crops)")
        # the headline teacher health is the first enabled term's (global, else local, else regional)
        first = f"_{next(iter(terms))}"
        out.update({k.removesuffix(first): v for k, v in list(out.items()) if k.startswith("health/") and k.endswith(first)})
        return terms

    @torch.no_grad()
    def _teacher_pass(self, views: list[torch.Tensor], teacher: nn.Module) -> list[tuple[torch.Tensor, ...]]:
        """(cls, patches, grid[, attention]) per clean global view; attention only when regions need it."""
        if not self.opts.regional.enabled:
            return [teacher.forward_tokens(v) for v in views]
        return [teacher.forward_with_attention(v) for v in views]

    def _student_inputs(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The global views the student sees: patch-corrupted when the local term is on."""
        lo = self.opts.local
        if not lo.enabled:
            return views, None
        pairs = [corrupt_patches(v, self.patch_size, lo.ratio, lo.corruption, lo.blur_sigma, lo.noise_std) for v in views]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def local_loss(
        self, t_patches: list[torch.Tensor], s_patches: list[torch.Tensor], masks: list[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """iBOT patch loss at the corrupted positions of every global view (one centre update)."""
        mask = torch.cat(masks)  # [V*B, h, w]
        flat = mask.flatten(1)
        t = torch.cat(t_patches)[flat]
        s = torch.cat(s_patches)[flat]
        n = self.dense_norm
        return self.patch_loss.patch_forward(self.teacher_dense_head(n(t)), self.dense_head(n(s)), mask, teacher_temp)

    def regional_loss(
        self, teacher_out: list[tuple[torch.Tensor, ...]], s_patches: list[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """Teacher regions of each view against their student counterparts in the other view.

        The match runs in ``match_space`` (pooling is linear, so a region of standardised tokens is the
        standardised region); the loss sees the raw region tokens through the dense head.
        """
        ro = self.opts.regional
        grid = teacher_out[0][2]
        spaces = [match_space(t[1], ro.match_features) for t in teacher_out[:2]]
        t_regions, s_matched, all_weights = [], [], []
        for a, b in ((0, 1), (1, 0)):
            _, t_patch_a, _, attn_a = teacher_out[a]
            region_masks = sample_regions(attn_a.mean(1), grid, ro.regions, ro.window)[1]
            t_region = pool_regions(t_patch_a, region_masks)
            weights = match_regions(pool_regions(spaces[a], region_masks), spaces[b], ro.match_temp)
            t_regions.append(t_region.flatten(0, 1))
            s_matched.append((weights @ s_patches[b]).flatten(0, 1))
            all_weights.append(weights)
        self.match_health = match_health(torch.cat(all_weights))
        # the loss pairs teacher i with student j != i: teacher regions of view a vs their match in view b
        t_logits = [self.teacher_dense_head(self.dense_norm(t)) for t in t_regions]
        s_logits = [self.dense_head(self.dense_norm(s)) for s in reversed(s_matched)]
        return self.region_loss(t_logits, s_logits, teacher_temp=teacher_temp)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        super().update_teacher(momentum)
        update_momentum(self.dense_head, self.teacher_dense_head, momentum)

    def head_state(self) -> dict[str, torch.Tensor]:
        state = super().head_state()
        state.update({f"glare_dense.{k}": v for k, v in self.dense_head.state_dict().items()})
        state.update({f"glare_dense_input_norm.{k}": v for k, v in self.dense_norm.state_dict().items()})
        return state


def corrupt_patches(
    x: torch.Tensor, patch: int, ratio: float, kind: str, blur_sigma: float = 2.0, noise_std: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a random ``ratio`` of the patches of each image in B×C×H×W; returns (image, mask B×h×w)."""
    b, c, height, width = x.shape
    h, w = height // patch, width // patch
    n = max(1, round(ratio * h * w))
    order = torch.rand(b, h * w, device=x.device).argsort(dim=1)[:, :n]
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=x.device).scatter_(1, order, True).view(b, h, w)
    pixels = mask[:, None].repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    if kind == "blur":
        # blur every channel of every image at once: the batch is folded into the channel axis
        alt = gaussian_blur(x.reshape(b * c, height, width), blur_sigma).view_as(x)
    elif kind == "noise":
        alt = x + noise_std * torch.randn_like(x)
    else:  # "mask": zero is the normalised mean
        alt = torch.zeros_like(x)
    return torch.where(pixels, alt, x), mask


def sample_regions(attention: torch.Tensor, grid: tuple[int, int], k: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K windows seeded at the highest-attention patches, each seed's window suppressed before the next.

    attention: B×N (CLS->patch, averaged over heads). Returns boxes B×K×4 (top, left, bottom,
    right; exclusive ends, inside the grid) and region masks B×K×N (1 inside the window).
    """
    h, w = grid
    win_h, win_w = min(window, h), min(window, w)
    scores = attention.detach().clone().view(-1, h, w)
    rows = torch.arange(h, device=attention.device)
    cols = torch.arange(w, device=attention.device)
    boxes, masks = [], []
    for _ in range(k):
        seed = scores.flatten(1).argmax(1)
        top = (seed // w - win_h // 2).clamp(0, h - win_h)
        left = (seed % w - win_w // 2).clamp(0, w - win_w)
        inside_r = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + win_h)
        inside_c = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + win_w)
        window_mask = inside_r[:, :, None] & inside_c[:, None, :]  # B×h×w
        scores = scores.masked_fill(window_mask, -1.0)  # attention is >= 0: suppressed seeds lose
        boxes.append(torch.stack([top, left, top + win_h, left + win_w], dim=1))
        masks.append(window_mask.flatten(1))
    return torch.stack(boxes, 1), torch.stack(masks, 1).float()


def pool_regions(patches: torch.Tensor, region_masks: torch.Tensor) -> torch.Tensor:
    """Mean of B×N×D patch tokens inside each of B×K×N region masks -> B×K×D."""
    return (region_masks @ patches) / region_masks.sum(-1, keepdim=True).clamp(min=1.0)


def match_space(patches: torch.Tensor, kind: str = "standardised", eps: float = 1e-6) -> torch.Tensor:
    """B×N×D patch tokens mapped, per image (view), into the space where regions are matched.

    ``centred`` subtracts the image's mean token; ``standardised`` also divides each dimension by
    its std over the image's tokens; ``raw`` returns the tokens. Why: a frozen ViT's patch tokens of
    one image share a large common component (mean pairwise cosine 0.92 on the shipped base, issue
    38), so raw cosines differ by a few hundredths and a softmax at ``match_temp`` 0.1 is almost
    uniform: every region "matches" the mean token of the other view. Removing the shared mean is
    the usual cure for such anisotropic embeddings (Mu & Viswanath 2018, "All-but-the-Top"), and
    dense cross-view matching (DenseCL, Wang et al. 2021; VICRegL, Bardes et al. 2022) compares
    locations by what differs between them; the per-dimension scale then keeps the few
    high-variance (massive-activation) dimensions of a ViT from deciding the match alone. Per image,
    not per batch, so a view's match never depends on the rest of its batch (*ours*).
    """
    if kind not in ("standardised", "centred", "raw"):
        raise ValueError(
            f"match_space: kind must be standardised, centred or raw (objective.options.regional.match_features), got {kind!r}"
        )
    if kind == "raw":
        return patches
    z = patches.float() - patches.float().mean(1, keepdim=True)
    if kind == "standardised":
        z = z / z.std(1, unbiased=False, keepdim=True).clamp_min(eps)
    return z.to(patches.dtype)  # the weights multiply the student's tokens, in their dtype


def match_regions(regions: torch.Tensor, patches: torch.Tensor, temp: float) -> torch.Tensor:
    """Cross-attention of B×K×D region tokens over B×N×D patch tokens of the other view -> B×K×N weights."""
    scores = F.normalize(regions, dim=-1) @ F.normalize(patches, dim=-1).transpose(1, 2)
    return (scores / temp).softmax(dim=-1)
