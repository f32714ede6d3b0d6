"""Graph-matching solvers: second-order (QAP) by graduated assignment + iterated LAP + 2-opt, first-order by LAP.

A matching of n source nodes to n target nodes is a permutation ``p`` (source i -> target p[i]),
or its n×n 0/1 matrix ``x``. Both solvers *maximise*

    f(x) = Σ_i c[i, p[i]] + Σ_{i,j} K[i·n + p[i], j·n + p[j]]

with ``c`` the n×n vertex affinity and ``K`` the n²×n² edge (pairwise) affinity, indexed by
(source, target) pairs as ``i·n + a`` (K = 0 gives the linear assignment problem).

The QAP is NP-hard; the solver is a deterministic heuristic that tests show to be exact on small
random instances (checked by brute force) and to recover planted matchings on larger ones:

1. starts: the LAP on ``c`` alone, the discretised graduated-assignment (softassign) solution of
   Gold & Rangarajan (1996), and a few seeded random permutations;
2. each start is polished by iterated LAP (solve the LAP of the gradient ``c + (K + Kᵀ)x`` until
   the objective stops improving: a Frank-Wolfe step on the permutation polytope) and then by
   steepest-ascent 2-opt (swap the targets of two sources while any swap improves ``f``);
3. iterated local search: the best is kicked (a random 3- to 5-cycle of targets) and re-polished a few
   times, keeping improvements; the best permutation wins.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def solve_lap(c: np.ndarray) -> np.ndarray:
    """The permutation maximising Σ_i c[i, p[i]] (scipy's exact Hungarian-type solver)."""
    rows, cols = linear_sum_assignment(c, maximize=True)
    perm = np.empty(c.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def qap_score(perm: np.ndarray, c: np.ndarray, k: np.ndarray) -> float:
    """f(p): the vertex plus edge affinity of one permutation."""
    n = len(perm)
    sel = np.arange(n) * n + perm
    return float(c[np.arange(n), perm].sum() + k[np.ix_(sel, sel)].sum())


def perm_to_matrix(perm: np.ndarray) -> np.ndarray:
    x = np.zeros((len(perm), len(perm)))
    x[np.arange(len(perm)), perm] = 1.0
    return x


def sinkhorn(log_alpha: np.ndarray, iters: int = 30) -> np.ndarray:
    """Doubly-stochastic projection of exp(log_alpha) by alternate row/column normalisation in log space."""
    a = log_alpha.copy()
    for _ in range(iters):
        a -= np.logaddexp.reduce(a, axis=1, keepdims=True)
        a -= np.logaddexp.reduce(a, axis=0, keepdims=True)
    return np.exp(a)


def graduated_assignment(c: np.ndarray, m: np.ndarray, betas: np.ndarray, inner: int = 4) -> np.ndarray:
    """Softassign: a soft matching annealed towards a permutation; returns its discretisation.

    ``m`` is K + Kᵀ. The gradient is rescaled to unit spread so one β schedule fits any cost scale.
    """
    n = c.shape[0]
    x = np.full((n, n), 1.0 / n)
    for beta in betas:
        for _ in range(inner):
            q = c + (m @ x.ravel()).reshape(n, n)
            q = (q - q.mean()) / (q.std() + 1e-12)
            x = sinkhorn(beta * q)
    return solve_lap(x)


def iterated_lap(perm: np.ndarray, c: np.ndarray, m: np.ndarray, k: np.ndarray, max_iters: int = 20) -> np.ndarray:
    """Frank-Wolfe on permutations: move to the LAP of the linearised objective while it improves."""
    n = len(perm)
    best, best_f = perm, qap_score(perm, c, k)
    for _ in range(max_iters):
        grad = c + (m @ perm_to_matrix(best).ravel()).reshape(n, n)
        nxt = solve_lap(grad)
        f = qap_score(nxt, c, k)
        if f <= best_f + 1e-12:
            break
        best, best_f = nxt, f
    return best


def two_opt(perm: np.ndarray, c: np.ndarray, m: np.ndarray, k: np.ndarray, max_iters: int = 200) -> np.ndarray:
    """Steepest-ascent pairwise swaps, every candidate swap scored exactly and in one vectorised pass."""
    n = len(perm)
    if n < 2:
        return perm
    ii, jj = np.triu_indices(n, 1)
    signs = np.array([1.0, 1.0, -1.0, -1.0])
    sign_outer = signs[:, None] * signs[None, :]
    perm = perm.copy()
    for _ in range(max_iters):
        sel = np.arange(n) * n + perm
        g = c.ravel() + m[:, sel].sum(1)  # ∂f/∂x at every (source, target) entry
        # the four entries a swap of i and j turns on (+) and off (-)
        u = np.stack([ii * n + perm[jj], jj * n + perm[ii], ii * n + perm[ii], jj * n + perm[jj]], axis=1)
        quad = (k[u[:, :, None], u[:, None, :]] * sign_outer).sum((1, 2))
        delta = (g[u] * signs).sum(1) + quad
        best = int(delta.argmax())
        if delta[best] <= 1e-10:
            break
        perm[ii[best]], perm[jj[best]] = perm[jj[best]], perm[ii[best]]
    return perm


def polish(perm: np.ndarray, c: np.ndarray, m: np.ndarray, k: np.ndarray) -> np.ndarray:
    return two_opt(iterated_lap(perm, c, m, k), c, m, k)


def kick(perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random cycle of the targets of 3 to 5 sources: a move 2-opt cannot undo in one step."""
    out = perm.copy()
    size = int(rng.integers(3, min(5, len(perm)) + 1))
    idx = rng.choice(len(perm), size=size, replace=False)
    out[idx] = perm[np.roll(idx, 1)]
    return out


def solve_qap(c: np.ndarray, k: np.ndarray, restarts: int = 2, kicks: int = 20, seed: int = 0) -> np.ndarray:
    """A strong (not certified) maximiser of the second-order matching objective; deterministic per seed.

    After the polished starts, ``kicks`` rounds of iterated local search perturb the best
    permutation (a random 3- to 5-cycle) and keep the re-polished result when it scores higher.
    """
    c = np.asarray(c, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    n = c.shape[0]
    if not np.any(k):
        return solve_lap(c)
    m = k + k.T
    rng = np.random.default_rng(seed)
    starts = [solve_lap(c), graduated_assignment(c, m, np.geomspace(0.5, 30.0, 8))]
    starts += [rng.permutation(n) for _ in range(restarts)]
    best, best_f = starts[0], -np.inf
    for perm in [polish(s, c, m, k) for s in starts]:
        f = qap_score(perm, c, k)
        if f > best_f + 1e-12:
            best, best_f = perm, f
    for _ in range(kicks if n > 3 else 0):
        perm = polish(kick(best, rng), c, m, k)
        f = qap_score(perm, c, k)
        if f > best_f + 1e-12:
            best, best_f = perm, f
    return best
