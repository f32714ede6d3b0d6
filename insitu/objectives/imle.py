"""Gradients through a combinatorial matching solver by IMLE (Niepert et al., NeurIPS 2021), and the
pieces graph matching builds its loss from: the Hamming loss to the identity, Gumbel noise, per-graph
standardised costs, the Hamming margin, and meters for the solver's time and the gradient norms.

`IMLEMatching`: one noisy solve, target at ``c + ε − λ·∂L/∂y`` (with graph matching's λ = 80 always
the identity: a structured perceptron). `PerturbedMatching`: S noisy solves averaged, and per draw a
target one bounded step λ (in cost stds) away, which need not be the identity (issue 38)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

COST_EPS = 1e-6  # floor on the per-graph std of the vertex costs

Solver = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


class SolverClock:
    """Seconds spent in the combinatorial solver (forward and backward) and the norms of the IMLE
    gradients w.r.t. the vertex costs, read and reset per step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.grad_norms: list[float] = []
        self.target_identity: list[float] = []  # per graph: the fraction of nodes the IMLE target maps to themselves

    def take_target_identity(self) -> float:
        """The mean over the graphs since the last call of the target's identity fraction (NaN if none)."""
        out, self.target_identity = float(np.mean(self.target_identity)) if self.target_identity else float("nan"), []
        return out

    def take(self) -> float:
        out, self.seconds = self.seconds, 0.0
        return out

    def take_grad_norm(self) -> float:
        """The largest IMLE cost-gradient norm over the graphs since the last call (0 if none)."""
        out, self.grad_norms = max(self.grad_norms, default=0.0), []
        return out


class GradNormMeter:
    """The total gradient norm of watched parameters, as accumulated by the last backward pass.

    Hooks read each gradient before clipping; the pipeline clips afterwards (``train.grad_clip``).
    """

    def __init__(self) -> None:
        self.sq: dict[int, float] = {}
        self.watched: set[int] = set()

    def watch(self, params: Iterable[nn.Parameter]) -> None:
        for p in params:
            if p.requires_grad and id(p) not in self.watched:
                self.watched.add(id(p))
                p.register_post_accumulate_grad_hook(self._record)

    def _record(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.sq[id(p)] = float(p.grad.detach().pow(2).sum())

    def take(self) -> float:
        out, self.sq = sum(self.sq.values()) ** 0.5, {}
        return out


def run_solver(solver: Solver, c: torch.Tensor, k: torch.Tensor | None, clock: SolverClock) -> torch.Tensor:
    """The 0/1 matching matrix that ``solver`` returns for vertex costs c (and edge costs k)."""
    start = time.perf_counter()
    perm = solver(c.detach().double().cpu().numpy(), None if k is None else k.detach().double().cpu().numpy())
    clock.seconds += time.perf_counter() - start
    y = torch.zeros_like(c)
    y[torch.arange(len(perm)), torch.as_tensor(perm, device=c.device)] = 1.0
    return y


class IMLEMatching(torch.autograd.Function):
    """y = GM(c + ε, K); backward: y' = GM(c + ε - λ·∂L/∂y, K), ∂L/∂c = y - y', ∂L/∂K = yyᵀ - y'y'ᵀ."""

    @staticmethod
    def forward(
        ctx: Any, c: torch.Tensor, k: torch.Tensor, noise: torch.Tensor, lam: float, solver: Solver, clock: SolverClock
    ) -> torch.Tensor:
        edges = k if k.numel() else None
        y = run_solver(solver, c + noise, edges, clock)
        ctx.save_for_backward(c, k, noise, y)
        ctx.lam, ctx.solver, ctx.clock = lam, solver, clock
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, k, noise, y = ctx.saved_tensors
        edges = k if k.numel() else None
        target = run_solver(ctx.solver, c + noise - ctx.lam * grad_y, edges, ctx.clock)  # same ε as forward
        grad_c = y - target
        ctx.clock.grad_norms.append(float(grad_c.norm()))
        ctx.clock.target_identity.append(float(torch.diagonal(target).mean()))
        grad_k = None
        if edges is not None:
            vy, vt = y.reshape(-1), target.reshape(-1)
            grad_k = torch.outer(vy, vy) - torch.outer(vt, vt)
        return grad_c, grad_k, None, None, None, None


class PerturbedMatching(torch.autograd.Function):
    """ȳ = mean_s GM(c + ε_s, K) over S noise draws (a soft matching: the perturbed solver's marginals).

    Backward (IMLE with a finite target, Niepert et al. 2021, one target per draw): the incoming
    gradient g = ∂L/∂ȳ is split into its scale σ = max|g| and direction g/σ;
    y'_s = GM(c + ε_s − λ·g/σ, K) with the same ε_s, and ∂L/∂c = σ·mean_s(y_s − y'_s),
    ∂L/∂K = σ·mean_s(vec y_s vec y_sᵀ − vec y'_s vec y'_sᵀ). λ is thus a step in the units of c
    (cost stds, c being standardised) whatever weight the loss has downstream, so for a moderate λ
    the target is "the current noisy matching, moved λ towards a lower loss", not the loss's
    minimiser: a pair of nodes the costs (plus noise) swap by more than λ stays swapped in y'.
    """

    @staticmethod
    def forward(
        ctx: Any, c: torch.Tensor, k: torch.Tensor, noise: torch.Tensor, lam: float, solver: Solver, clock: SolverClock
    ) -> torch.Tensor:
        edges = k if k.numel() else None
        ys = torch.stack([run_solver(solver, c + eps, edges, clock) for eps in noise])
        ctx.save_for_backward(c, k, noise, ys)
        ctx.lam, ctx.solver, ctx.clock = lam, solver, clock
        return ys.mean(0)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, k, noise, ys = ctx.saved_tensors
        edges = k if k.numel() else None
        scale = grad_y.abs().max()
        if scale == 0:
            return torch.zeros_like(c), None if edges is None else torch.zeros_like(k), None, None, None, None
        step = ctx.lam * grad_y / scale
        targets = torch.stack([run_solver(ctx.solver, c + eps - step, edges, ctx.clock) for eps in noise])
        grad_c = scale * (ys - targets).mean(0)
        ctx.clock.grad_norms.append(float(grad_c.norm() / scale))
        ctx.clock.target_identity.append(float(torch.diagonal(targets, dim1=-2, dim2=-1).mean()))
        grad_k = None
        if edges is not None:
            vy, vt = ys.flatten(1), targets.flatten(1)
            grad_k = scale * (vy.T @ vy - vt.T @ vt) / len(ys)
        return grad_c, grad_k, None, None, None, None


def hamming_to_identity(y: torch.Tensor) -> torch.Tensor:
    """Σ over entries of |y - I| for a 0/1 matching y: twice the number of mismatched nodes."""
    eye = torch.eye(y.shape[0], device=y.device, dtype=y.dtype)
    return (y * (1 - eye) + (1 - y) * eye).sum()


def gumbel_like(c: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 0:
        return torch.zeros_like(c)
    u = torch.rand_like(c).clamp(1e-10, 1 - 1e-10)
    return -scale * torch.log(-torch.log(u))


def standardise(c: torch.Tensor) -> torch.Tensor:
    """Per-graph zero mean, unit std: the matching and the noise no longer depend on the cost scale."""
    return (c - c.mean()) / (c.std(unbiased=False) + COST_EPS)


def margin_matrix(n: int, margin: float, like: torch.Tensor) -> torch.Tensor:
    """``margin`` on every off-identity entry: loss-augmented inference for the Hamming loss."""
    return margin * (1 - torch.eye(n, dtype=like.dtype, device=like.device))
