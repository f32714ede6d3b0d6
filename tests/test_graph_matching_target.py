"""Graph matching's perturbed target (issue 38): not the identity where the costs insist on another
matching, a gradient that does not vanish once the prediction is the identity, and the health metric."""

from __future__ import annotations

import pytest
import torch

from insitu.objectives.graph_matching import GraphMatchingOptions, embedding_spread, match_costs
from insitu.objectives.imle import IMLEMatching, PerturbedMatching, SolverClock, gumbel_like, hamming_to_identity, standardise
from insitu.objectives.qap import solve_lap, solve_qap
from tests.test_graph_matching import objective, tiny_student


def lap(c, k):
    return solve_lap(c)


def swapped_costs(n: int = 8) -> torch.Tensor:
    """Standardised costs where each node prefers its own view by 2, except nodes 0 and 1, which the costs
    swap by a wide gap (as two near-duplicate images would be)."""
    c = 2.0 * torch.eye(n, dtype=torch.float64)
    c[0, 0] = c[1, 1] = -2.0
    c[0, 1] = c[1, 0] = 6.0
    return standardise(c)


def test_the_perturbed_target_keeps_a_swap_the_costs_insist_on():
    c = swapped_costs().requires_grad_(True)
    clock = SolverClock()
    # the old target (λ = 80): always the identity, so the gradient pushes the swapped pair apart
    y = IMLEMatching.apply(c, torch.zeros(0), torch.zeros_like(c), 80.0, lap, clock)
    hamming_to_identity(y).backward()
    assert clock.take_target_identity() == 1.0
    assert c.grad[0, 0] < 0 and c.grad[0, 1] > 0
    # the perturbed target, one bounded step away: the pair stays swapped in the target, so no push there
    c.grad = None
    torch.manual_seed(0)
    noise = torch.stack([gumbel_like(c, 1.0) for _ in range(8)])
    y = PerturbedMatching.apply(c, torch.zeros(0), noise, 1.0, lap, clock)
    assert y[0, 1] > 0.5  # the noisy predictions swap 0 and 1 (y is their mean)
    hamming_to_identity(y).backward()
    assert clock.take_target_identity() < 1.0
    assert abs(float(c.grad[0, 0])) < 0.2 and abs(float(c.grad[0, 1])) < 0.2
    # where the costs are only slightly off (the other nodes' noisy mismatches), it still pushes towards the identity
    assert float(c.grad.diagonal()[2:].sum()) <= 0


def test_the_gradient_does_not_vanish_once_the_prediction_is_the_identity():
    n = 12
    c = standardise(3.0 * torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.from_numpy(solve_lap(c.numpy())), torch.arange(n))  # the clean prediction is the identity
    empty = torch.zeros(0, dtype=torch.float64)
    grads = {}
    for target in ("identity", "perturbed"):
        opts = GraphMatchingOptions(target=target, margin=0.0)
        leaf = c.clone().requires_grad_(True)
        torch.manual_seed(1)
        loss, clean = match_costs(leaf, empty, opts, lap, SolverClock(), training=True)
        assert torch.equal(clean, torch.eye(n, dtype=clean.dtype))
        loss.backward()
        grads[target] = leaf.grad
    assert grads["identity"].abs().sum() == 0  # the old perceptron stops learning here
    g = grads["perturbed"]
    # on the whole it raises the identity's entries (one node may lose its fixed point to a better permutation)
    assert g.abs().sum() > 0 and g.diagonal().sum() < 0 and float((g * torch.eye(n)).sum()) < float((g * (1 - torch.eye(n))).sum())


def test_the_perturbed_target_with_edges_gives_edge_gradients():
    torch.manual_seed(0)
    n = 6
    c = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    k = (0.1 * torch.randn(n * n, n * n, dtype=torch.float64)).requires_grad_(True)
    noise = torch.stack([gumbel_like(c, 1.0) for _ in range(4)])
    y = PerturbedMatching.apply(c, k, noise, 1.0, lambda c, k: solve_qap(c, k), SolverClock())
    assert torch.allclose(y.sum(0), torch.ones(n, dtype=y.dtype)) and torch.allclose(y.sum(1), torch.ones(n, dtype=y.dtype))
    hamming_to_identity(y).backward()
    assert c.grad.abs().sum() > 0 and k.grad.shape == (n * n, n * n) and torch.isfinite(k.grad).all()


def test_the_gradient_scale_follows_the_loss_weight_but_the_target_does_not():
    c = swapped_costs().requires_grad_(True)
    noise = torch.stack([gumbel_like(c, 1.0) for _ in range(4)])
    grads = []
    for weight in (1.0, 0.25):
        c.grad = None
        (weight * hamming_to_identity(PerturbedMatching.apply(c, torch.zeros(0), noise, 1.0, lap, SolverClock()))).backward()
        grads.append(c.grad.clone())
    assert torch.allclose(grads[1], 0.25 * grads[0])


def test_objective_logs_the_target_and_the_embedding_spread():
    torch.manual_seed(0)
    student = tiny_student()
    obj = objective().train()
    assert obj.opts.target == "perturbed"
    images = torch.randn(8, 1, 32, 32)
    meta = torch.tensor([[4, 4, 24, 24, 32, 32, 0]] * 2, dtype=torch.float32).expand(8, 2, 7)
    batch = {"views": [images, images + 0.3 * torch.randn_like(images)], "view_meta": meta}
    out = obj(batch, student)
    out["loss"].backward()
    assert obj.gcn.lin1.weight.grad.abs().sum() > 0
    assert 0 < float(out["health/embedding_spread"]) < 1
    out = obj(batch, student)  # the previous backward's targets
    assert 0 <= float(out["target_identity_fraction"]) <= 1
    assert "target_identity_fraction" not in objective().train()(batch, student)  # no backward yet: not logged


def test_embedding_spread_is_zero_on_collapse_and_positive_when_spread():
    z = torch.randn(1, 16).expand(32, 16) * torch.rand(32, 1) + 0.0  # one direction, any lengths
    assert float(embedding_spread(z)) == pytest.approx(0, abs=1e-6)
    spread = float(embedding_spread(torch.randn(256, 16, generator=torch.Generator().manual_seed(0))))
    assert spread == pytest.approx(1 / 16**0.5, rel=0.15)  # unit vectors spread evenly: per-dimension std 1/sqrt(D)
