"""The graph-matching solvers: exact on small random QAPs (brute force), planted matchings recovered."""

import itertools

import numpy as np
import pytest

from insitu.objectives.qap import qap_score, solve_lap, solve_qap, two_opt


def brute_force(c: np.ndarray, k: np.ndarray) -> float:
    """The optimum over all n! permutations: every one scored, vertex and edge terms summed directly."""
    n = c.shape[0]
    perms = np.array(list(itertools.permutations(range(n))))  # P×n
    pairs = np.arange(n) * n + perms  # the (source, target) entries each permutation switches on
    scores = c[np.arange(n), perms].sum(1) + k[pairs[:, :, None], pairs[:, None, :]].sum((1, 2))
    return float(scores.max())


@pytest.mark.parametrize("seed", range(4))
def test_qap_solver_is_exact_on_small_random_instances(seed: int):
    rng = np.random.default_rng(seed)
    for n in (3, 4, 5, 6, 7):
        c = rng.normal(size=(n, n))
        # dense Gaussian pairwise costs up to 3x the vertex scale: hard, far from a LAP
        k = rng.normal(size=(n * n, n * n)) * rng.choice([0.3, 1.0, 3.0])
        perm = solve_qap(c, k)
        assert sorted(perm.tolist()) == list(range(n))
        assert qap_score(perm, c, k) == pytest.approx(brute_force(c, k), abs=1e-9)


def test_lap_matches_brute_force_and_qap_reduces_to_it():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(6, 6))
    zero = np.zeros((36, 36))
    assert qap_score(solve_lap(c), c, zero) == pytest.approx(brute_force(c, zero))
    assert (solve_qap(c, zero) == solve_lap(c)).all()


def planted_graph_matching(n: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two kNN-like graphs of the same points, the second relabelled by a hidden permutation.

    Vertex costs are weak and noisy (the LAP alone gets the matching wrong); edge costs reward
    matched edges whose weights agree. Returns (c, K, the hidden permutation).
    """
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, 2))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    adj = dist <= np.sort(dist, axis=1)[:, 4:5]  # 4 nearest neighbours (+ self, removed next)
    np.fill_diagonal(adj, False)
    adj |= adj.T
    w = np.where(adj, dist, 0.0)
    hidden = rng.permutation(n)  # source i is target hidden[i]
    w_t = np.zeros_like(w)
    w_t[np.ix_(hidden, hidden)] = w + noise * rng.normal(size=w.shape) * adj
    adj_t = w_t != 0
    c = 0.3 * rng.normal(size=(n, n))
    c[np.arange(n), hidden] += 0.2
    k = np.exp(-np.abs(w[:, None, :, None] - w_t[None, :, None, :])) * adj[:, None, :, None] * adj_t[None, :, None, :]
    return c, k.reshape(n * n, n * n), hidden


@pytest.mark.parametrize("seed", range(3))
def test_qap_solver_recovers_planted_matching_on_larger_graphs(seed: int):
    c, k, hidden = planted_graph_matching(20, seed, noise=0.02)
    perm = solve_qap(c, k)
    assert qap_score(perm, c, k) >= qap_score(hidden, c, k) - 1e-9
    assert (perm == hidden).mean() >= 0.9
    assert (solve_lap(c) == hidden).mean() < 0.9  # the vertex term alone does not solve it


def test_two_opt_swap_gains_equal_recomputed_scores():
    rng = np.random.default_rng(3)
    n = 6
    c, k = rng.normal(size=(n, n)), rng.normal(size=(n * n, n * n))
    start = rng.permutation(n)
    polished = two_opt(start, c, k + k.T, k)
    assert qap_score(polished, c, k) >= qap_score(start, c, k)
    for i, j in itertools.combinations(range(n), 2):  # a 2-opt local optimum: no swap improves
        swapped = polished.copy()
        swapped[[i, j]] = swapped[[j, i]]
        assert qap_score(swapped, c, k) <= qap_score(polished, c, k) + 1e-9
