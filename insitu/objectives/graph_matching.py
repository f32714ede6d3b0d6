"""LVM-Med second-order graph matching (Nguyen et al., NeurIPS 2023) on adapters over a frozen ViT.

Two augmented views of every image; the batch is cut into graphs of ``graph_size`` images. Per
view and graph:

- node embedding ``z = h(pool(backbone tokens))`` (h: a 2-layer MLP to ``proj_dim``); edges to
  the ``knn`` nearest neighbours of each node in z (cosine, made symmetric); a 2-layer GCN of width
  ``gcn_dim`` (plus a linear skip, ours) refines the nodes into ``ẑ``.
- vertex affinity ``c_v[i,a] = α·cos(ẑ_i^s, ẑ_a^t) + (1-α)·(local_ia + local_ai)``, where
  ``local`` averages two patch-token cosine similarities (ours: their plain mean): (a) over patch
  pairs at the same place of the original image, found from the two crops' boxes (the view
  transform returns them as ``view_meta``), and (b) over each patch's nearest neighbour in the
  other view's patch tokens, keeping the ``local_topk`` (γ) fraction of best pairs. ``local_ia``
  looks from view s of image i into view t of image a, ``local_ai`` the other way. ``c_v`` is then
  standardised per graph (zero mean, unit std).
- edge affinity ``c_e[ia,jb] = cos(ẑ_i - ẑ_j, ẑ_a - ẑ_b)`` for edges (i,j) of graph s and (a,b)
  of graph t (a soft cosine, ``edge_softness``), divided by the mean degree and scaled by ``edge_weight``.

The matching maximises vertex + edge affinity over permutations (`insitu.objectives.qap.solve_qap`;
``edge_term: false`` is the first-order ablation: the exact LAP of ``c_v`` by scipy). The loss is
the Hamming distance of the matching to the identity (image i of view s is image i of view t), made
loss-augmented in training by a Hamming ``margin`` on every off-identity entry (structured SVM).
Gradients cross the solver by IMLE (Niepert et al. 2021), with one of two targets (``target``):

- ``perturbed`` (default, issue 38): ``perturb_samples`` Gumbel draws ε_s of scale ``perturb_noise``
  cost stds; the loss is the expected Hamming distance of the perturbed matchings y_s (the
  perturbation-based matching LVM-Med cites); the backward pass solves again per draw at
  ``ĉ + ε_s − λ·∂L/∂y`` with the gradient's direction scaled to a step of λ = ``perturb_lambda``
  cost stds (`insitu.objectives.imle.PerturbedMatching`). The target is then "this noisy matching,
  one bounded step better", not the identity: a pair the costs swap by much more than λ (two
  near-duplicate images, or two the features cannot yet tell apart) stays swapped in the target and
  is not pushed apart, while a pair within reach of λ is. And as long as the noise still breaks the
  identity sometimes, the gradient stays non-zero once the clean prediction is the identity, fading
  as the identity's lead grows (like a softmax), instead of stopping or pushing at full strength.
- ``identity`` (before issue 38): one draw of scale ``noise_scale`` and λ = ``imle_lambda`` (80)
  on the raw gradient, so the target is always the identity (a structured perceptron with a
  margin): it pushes every mismatched pair apart with the same force, near-duplicates included,
  and once the identity wins by the margin it stops. At 16-node graphs the training batches'
  identity fraction reached 1.0 after ~77 epochs (memorisation), costing BUSI 3–4 dense mIoU.

``train/target_identity_fraction`` logs how often the targets keep each node at its own view (1.0
for ``identity``); ``health/embedding_spread`` the spread of the node embeddings z of both views
(the mean per-dimension std of the L2-normalised z; the collapse guard reads it). Both views go
through the student (a siamese network, as in LVM-Med): no teacher is used. docs/graph_matching.md
says why each choice.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from insitu.objectives import augment
from insitu.objectives.augment import ViewRecipe
from insitu.objectives.base import Objective, ObjectiveOptions
from insitu.objectives.dino import feature_std
from insitu.objectives.imle import (
    GradNormMeter,
    IMLEMatching,
    PerturbedMatching,
    Solver,
    SolverClock,
    gumbel_like,
    hamming_to_identity,
    margin_matrix,
    run_solver,
    standardise,
)
from insitu.objectives.qap import solve_lap, solve_qap
from insitu.objectives.views import BLUR_SIGMA
from insitu.registry import OBJECTIVES

EDGE_EPS = 1e-6  # floor on the mean degree when normalising edge affinities

# view_meta columns, per view: top, left, height, width (the crop box in original-image pixels), image_height, image_width, flipped


class PairViewOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: tuple[float, float] = (0.4, 1.0)
    flip: bool = True
    blur_prob: float = Field(0.2, ge=0, le=1)
    intensity: float = Field(0.2, ge=0)


class GraphMatchingOptions(ObjectiveOptions):
    graph_size: int = Field(16, ge=2)
    knn: int = Field(5, ge=1)
    pool: Literal["mean", "cls"] = "mean"
    proj_hidden_dim: int = Field(256, gt=0)
    proj_dim: int = Field(128, gt=0)
    gcn_dim: int = Field(128, gt=0)
    alpha: float = Field(0.8, ge=0, le=1)
    local_topk: float = Field(0.5, gt=0, le=1)
    edge_term: bool = True
    edge_weight: float = Field(1.0, ge=0)
    edge_softness: float = Field(0.1, ge=0)  # δ of the edge cosines, as a fraction of the mean edge length
    target: Literal["perturbed", "identity"] = "perturbed"  # identity: the pre-issue-38 structured perceptron
    imle_lambda: float = Field(80.0, gt=0)  # target: identity only
    noise_scale: float = Field(0.1, ge=0)  # target: identity only; Gumbel scale in stds of the standardised costs
    perturb_samples: int = Field(3, ge=1)  # target: perturbed: noise draws per graph (two solves each)
    perturb_noise: float = Field(1.0, gt=0)  # target: perturbed: Gumbel scale in cost stds
    perturb_lambda: float = Field(1.0, gt=0)  # target: perturbed: the IMLE step in cost stds
    margin: float = Field(1.0, ge=0)  # Hamming margin (in cost stds) added to the training solve
    solver_restarts: int = Field(2, ge=0)
    solver_kicks: int = Field(20, ge=0)
    views: PairViewOptions = PairViewOptions()


# ---------------------------------------------------------------- views


def crop_view(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """The C×H×W crop ``box`` = (top, left, h, w) resized to size×size, mirrored left-right if ``flip``."""
    return augment.flip(augment.resized_crop(image, box, size, antialias=False), flip)


class BoxedCropPair(ViewRecipe):
    """Two random crops of one image, and each crop's box in original-image coordinates (``view_meta``)."""

    def __init__(self, size: int, opts: PairViewOptions, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.size, self.opts = size, opts

    def __call__(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        views, meta, g = [], [], self.generator
        for _ in range(2):
            box = augment.crop_box(image.shape[-2], image.shape[-1], self.opts.scale, g)
            flip = self.opts.flip and augment.coin(0.5, g)
            views.append(self._photometric(crop_view(image, box, self.size, flip)))
            meta.append([*box, image.shape[-2], image.shape[-1], int(flip)])
        return views, torch.tensor(meta, dtype=torch.float32)

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        # intensity changes only: they leave the patch geometry (and so the correspondence) intact
        x, _ = augment.random_blur(x, self.opts.blur_prob, BLUR_SIGMA, self.generator)
        if self.opts.intensity > 0:
            x = augment.gain_offset(x, self.opts.intensity, self.generator)
        return x


# ---------------------------------------------------------------- geometry: patch correspondence


def patch_centres(meta: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised original-image (row, col) in [0, 1] of every patch centre: meta m×7 -> two m×N tensors."""
    gh, gw = grid
    rows = (torch.arange(gh, dtype=meta.dtype, device=meta.device) + 0.5) / gh
    cols = (torch.arange(gw, dtype=meta.dtype, device=meta.device) + 0.5) / gw
    r = rows[:, None].expand(gh, gw).reshape(-1)[None]  # 1×N, fractions of the crop
    c = cols[None, :].expand(gh, gw).reshape(-1)[None]
    top, left, h, w, img_h, img_w, flipped = (meta[:, k : k + 1] for k in range(7))
    c = torch.where(flipped > 0.5, 1.0 - c, c)  # a mirrored view shows the crop's right side on its left
    return (top + r * h) / img_h, (left + c * w) / img_w


def patch_correspondence(meta_s: torch.Tensor, meta_t: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For patch p of view s of image i: the patch of view t of image a at the same original place.

    Places are compared in normalised original-image coordinates, so that for i ≠ a the pair looks
    at the same position of two (roughly aligned) images. Returns index m_s×m_t×N (long) and a
    validity mask (False where that place lies outside the other crop).
    """
    gh, gw = grid
    row, col = patch_centres(meta_s, grid)  # m_s×N
    top, left, h, w, img_h, img_w, flipped = (meta_t[:, k][None, :, None] for k in range(7))
    # position inside the target crop, as a fraction of it: m_s×m_t×N
    fr = (row[:, None, :] * img_h - top) / h
    fc = (col[:, None, :] * img_w - left) / w
    fc = torch.where(flipped > 0.5, 1.0 - fc, fc)
    valid = (fr >= 0) & (fr < 1) & (fc >= 0) & (fc < 1)
    ri = (fr * gh).floor().clamp(0, gh - 1).long()
    ci = (fc * gw).floor().clamp(0, gw - 1).long()
    return ri * gw + ci, valid


# ---------------------------------------------------------------- affinities


def local_similarity(sim: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, topk: float) -> torch.Tensor:
    """m×m local term from patch cosines ``sim`` m×m×N×N (view s patch p, view t patch q).

    The mean of (a) cosines at corresponding places (``index``/``valid`` m×m×N; where no place
    corresponds only (b) counts) and (b) the best ``topk`` fraction of nearest-neighbour cosines.
    """
    n = sim.shape[-2]
    nearest = sim.max(dim=-1).values  # m×m×N: best partner of each patch of view s
    keep = max(1, round(topk * n))
    nn_term = nearest.topk(keep, dim=-1).values.mean(-1)
    corr = sim.gather(-1, index[..., None])[..., 0]  # m×m×N
    count = valid.sum(-1)
    corr_term = (corr * valid).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, 0.5 * (corr_term + nn_term), nn_term)


def vertex_affinity(
    zs: torch.Tensor,
    zt: torch.Tensor,
    ps: torch.Tensor,
    pt: torch.Tensor,
    meta_s: torch.Tensor,
    meta_t: torch.Tensor,
    grid: tuple[int, int],
    alpha: float,
    topk: float,
) -> torch.Tensor:
    """c_v m×m: α·cos(ẑ_i^s, ẑ_a^t) + (1-α)·(local_ia + local_ai), patch tokens ps/pt m×N×D."""
    glob = F.normalize(zs, dim=-1) @ F.normalize(zt, dim=-1).T
    ps, pt = F.normalize(ps, dim=-1), F.normalize(pt, dim=-1)
    sim = torch.einsum("ipd,aqd->iapq", ps, pt)  # m×m×N×N
    local_st = local_similarity(sim, *patch_correspondence(meta_s, meta_t, grid), topk)
    local_ts = local_similarity(sim.permute(1, 0, 3, 2), *patch_correspondence(meta_t, meta_s, grid), topk)
    return alpha * glob + (1 - alpha) * (local_st + local_ts.T)


def edge_affinity(zs: torch.Tensor, zt: torch.Tensor, adj_s: torch.Tensor, adj_t: torch.Tensor, softness: float = 0.0) -> torch.Tensor:
    """K m²×m², K[i·m+a, j·m+b] = cos(ẑ_i - ẑ_j, ẑ_a - ẑ_b) where (i,j) and (a,b) are edges, else 0.

    With ``softness`` > 0 each difference d is divided by sqrt(|d|² + δ²) instead of |d|, δ being
    ``softness`` times the mean edge length (detached): the cosine's gradient, 1/|d|, stays below
    1/δ on edges between near-identical nodes (exactly identical ones otherwise give 1/1e-12).
    """
    m = zs.shape[0]
    ds, dt = zs[:, None] - zs[None], zt[:, None] - zt[None]  # m×m×d; the zero self-differences stay zero
    delta_sq = 0.0
    if softness > 0:
        lengths = torch.cat([ds.detach().norm(dim=-1)[adj_s], dt.detach().norm(dim=-1)[adj_t]])
        delta_sq = (softness * lengths.mean()) ** 2 if lengths.numel() else 0.0
    # clamp before the root: its gradient at a zero self-difference would be inf (times 0: NaN)
    ds = ds / (ds.pow(2).sum(-1, keepdim=True) + delta_sq).clamp(min=1e-24).sqrt()
    dt = dt / (dt.pow(2).sum(-1, keepdim=True) + delta_sq).clamp(min=1e-24).sqrt()
    cos = torch.einsum("ijd,abd->iajb", ds, dt)
    mask = adj_s[:, None, :, None] & adj_t[None, :, None, :]
    return (cos * mask).reshape(m * m, m * m)


def normalise_edges(k: torch.Tensor, adj_s: torch.Tensor, adj_t: torch.Tensor) -> torch.Tensor:
    """K divided by the mean degree (directed edges per node, geometric mean of both graphs).

    The identity's edge score is then a sum of n per-node terms in [-1, 1], like the vertex term,
    instead of one term per matched edge pair (~100 for n = 16, k = 5). A graph without edges has
    K = 0; the floor on the degree keeps that finite.
    """
    n = adj_s.shape[0]
    degree = (adj_s.sum().float() * adj_t.sum().float()).sqrt() / n
    return k / degree.clamp(min=EDGE_EPS)


def knn_adjacency(z: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric bool m×m adjacency: each node to its k nearest neighbours by cosine (no self-loops)."""
    m = z.shape[0]
    k = min(k, m - 1)
    zn = F.normalize(z.detach(), dim=-1)
    sim = (zn @ zn.T).fill_diagonal_(-float("inf"))
    idx = sim.topk(k, dim=-1).indices
    adj = torch.zeros(m, m, dtype=torch.bool, device=z.device).scatter_(1, idx, True)
    return adj | adj.T


class GCN(nn.Module):
    """Two graph-convolution layers (Kipf & Welling) with the renormalised adjacency D^-½(A+I)D^-½,
    plus a linear skip from the input.

    Without the skip, two adjacent nodes with the same neighbours ("twins", frequent in 16-node kNN
    graphs) get identical rows of D^-½(A+I)D^-½ and so identical outputs, whatever their inputs: no
    vertex affinity can then tell them apart, and their edge has length zero.
    """

    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(in_dim, width)
        self.lin2 = nn.Linear(width, width)
        self.skip = nn.Linear(in_dim, width, bias=False)

    def forward(self, z: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        a = adj.float() + torch.eye(adj.shape[0], device=z.device)
        d = a.sum(1).rsqrt()
        a = d[:, None] * a * d[None, :]
        return a @ self.lin2(F.relu(a @ self.lin1(z))) + self.skip(z)


# ---------------------------------------------------------------- the loss


def match_costs(
    c: torch.Tensor,
    k: torch.Tensor,
    opts: GraphMatchingOptions,
    solver: Solver,
    clock: SolverClock,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hamming loss of the (training: noisy, margin-augmented) matching, and the clean matching.

    Vertex costs are standardised per graph. In training the solve maximises
    ``ĉ + ε + margin·(1 - I)`` (+ edges): the identity must beat every other matching by ``margin``
    per mismatched node before the loss is zero. ``target: identity``: one draw ε of Gumbel scale
    ``noise_scale`` and `IMLEMatching` (target always the identity at λ = 80). ``target: perturbed``:
    ``perturb_samples`` draws of scale ``perturb_noise``, the expected Hamming loss of their mean,
    and `PerturbedMatching`'s finite targets (step ``perturb_lambda``). The clean matching (no
    noise, no margin) gives the identity fraction.
    """
    c = standardise(c)
    n = c.shape[0]
    if not training:
        y = IMLEMatching.apply(c, k, torch.zeros_like(c), opts.imle_lambda, solver, clock)
        return hamming_to_identity(y), y.detach()
    if opts.target == "perturbed":
        noise = torch.stack([gumbel_like(c, opts.perturb_noise) for _ in range(opts.perturb_samples)])
        y = PerturbedMatching.apply(c + margin_matrix(n, opts.margin, c), k, noise, opts.perturb_lambda, solver, clock)
        return hamming_to_identity(y), run_solver(solver, c, k if k.numel() else None, clock)
    noise = gumbel_like(c, opts.noise_scale)
    y = IMLEMatching.apply(c + margin_matrix(n, opts.margin, c), k, noise, opts.imle_lambda, solver, clock)
    clean = y.detach()
    if opts.noise_scale > 0 or opts.margin > 0:
        clean = run_solver(solver, c, k if k.numel() else None, clock)
    return hamming_to_identity(y), clean


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """The mean over dimensions of the per-dimension std (over nodes) of the L2-normalised embeddings z (nodes×D).

    0 when every node embedding points the same way (head collapse); at most 1/sqrt(D) (unit vectors:
    the per-dimension variances sum to at most 1), about that for embeddings spread evenly over the sphere. Logged as ``health/embedding_spread`` (the collapse guard reads it).
    """
    return F.normalize(z.float(), dim=-1).std(dim=0, unbiased=False).mean()


def graph_chunks(batch_size: int, graph_size: int) -> list[torch.Tensor]:
    """Consecutive index groups of ``graph_size``; a remainder below 2 joins the previous group."""
    chunks = list(torch.arange(batch_size).split(graph_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


# ---------------------------------------------------------------- the objective


@OBJECTIVES.register("graph_matching")
class GraphMatchingObjective(Objective):
    name = "graph_matching"
    Options = GraphMatchingOptions
    opts: GraphMatchingOptions
    needs_teacher = False

    def __init__(self, embed_dim: int, patch_size: int, image_size: int, options: dict[str, Any], max_steps: int) -> None:
        super().__init__(embed_dim, patch_size, image_size, options, max_steps)
        o = self.opts
        self.node_head = nn.Sequential(nn.Linear(embed_dim, o.proj_hidden_dim), nn.GELU(), nn.Linear(o.proj_hidden_dim, o.proj_dim))
        self.gcn = GCN(o.proj_dim, o.gcn_dim)
        self.clock = SolverClock()
        self.grad_meter = GradNormMeter()

    def view_transform(self) -> BoxedCropPair:
        return BoxedCropPair(self.image_size, self.opts.views)

    def solver(self, c: np.ndarray, k: np.ndarray | None) -> np.ndarray:
        if k is None:
            return solve_lap(c)
        return solve_qap(c, k, restarts=self.opts.solver_restarts, kicks=self.opts.solver_kicks)

    def forward(self, batch: dict[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
        views: list[torch.Tensor] = batch["views"]
        meta: torch.Tensor = batch["view_meta"]  # B×2×7
        if self.training:
            self.grad_meter.watch([*student.parameters(), *self.parameters()])
        cls_s, ps, grid = student.forward_tokens(views[0])
        cls_t, pt, _ = student.forward_tokens(views[1])
        zs = self.node_head(ps.mean(1) if self.opts.pool == "mean" else cls_s)
        zt = self.node_head(pt.mean(1) if self.opts.pool == "mean" else cls_t)
        hamming, identity, edges = [], [], []
        for idx in graph_chunks(zs.shape[0], self.opts.graph_size):
            loss, clean, n_edges = self.match(zs[idx], zt[idx], ps[idx], pt[idx], meta[idx, 0], meta[idx, 1], grid)
            hamming.append(loss)
            identity.append(torch.diagonal(clean).mean())
            edges.append(n_edges)
        out = {
            "loss": torch.stack(hamming).mean(),
            "identity_fraction": torch.stack(identity).mean(),
            "edges_per_node": torch.tensor(float(np.mean(edges))),
            "solver_s": torch.tensor(self.clock.take()),  # this forward + the previous step's backward
            # gradients of the previous step's backward (before clipping)
            "imle_grad_norm": torch.tensor(self.clock.take_grad_norm()),
            "grad_norm": torch.tensor(self.grad_meter.take()),
            "collapse_std": feature_std(zs.detach()),
            "health/embedding_spread": embedding_spread(torch.cat([zs, zt]).detach()),
        }
        target_identity = self.clock.take_target_identity()  # the previous backward's targets (none before the first)
        if not np.isnan(target_identity):
            out["target_identity_fraction"] = torch.tensor(target_identity)
        return out

    def match(
        self,
        zs: torch.Tensor,
        zt: torch.Tensor,
        ps: torch.Tensor,
        pt: torch.Tensor,
        meta_s: torch.Tensor,
        meta_t: torch.Tensor,
        grid: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One graph pair: kNN graphs + GCN, affinities; the Hamming loss, the clean matching, edges per node."""
        o = self.opts
        adj_s, adj_t = knn_adjacency(zs, o.knn), knn_adjacency(zt, o.knn)
        hs, ht = self.gcn(zs, adj_s), self.gcn(zt, adj_t)
        c = vertex_affinity(hs, ht, ps, pt, meta_s, meta_t, grid, o.alpha, o.local_topk)
        k = c.new_zeros(0)
        if o.edge_term:
            k = o.edge_weight * normalise_edges(edge_affinity(hs, ht, adj_s, adj_t, o.edge_softness), adj_s, adj_t)
        loss, clean = match_costs(c, k, o, self.solver, self.clock, self.training)
        return loss, clean, float(adj_s.sum()) / adj_s.shape[0]

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"gm_node_head.{k}": v for k, v in self.node_head.state_dict().items()}
        state.update({f"gm_gcn.{k}": v for k, v in self.gcn.state_dict().items()})
        return state
