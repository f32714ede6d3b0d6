"""Statistics for probes that can resolve a change: repeated group-aware folds, seeded label
subsets, mean ± std, and a paired bootstrap of adapted − frozen with a verdict.

Every metric here is a function of per-item *counts* summed over items (accuracy: correct and
seen; mIoU/Dice: per-class intersection, prediction and target pixels), so one bootstrap serves
classification and dense probes alike: resample units, sum their counts, apply the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import t as student_t

GAIN, LOSS, UNRESOLVED = "resolved gain", "resolved loss", "not resolved (CI spans 0)"
NO_CI = "not resolved (too few independent groups for a CI)"
MIN_UNITS = 5  # a bootstrap over fewer groups has a handful of distinct resamples: no CI is given


def group_folds(labels: Sequence[int], groups: Sequence[str], folds: int, seed: int = 0) -> np.ndarray:
    """A fold id (0..folds-1) per item: stratified by label, and no group split across folds.

    Groups are shuffled by ``seed``, then placed largest first, each into the fold that holds the
    fewest items of the group's classes so far (relative to the class sizes), ties to the fold with
    fewest items. A group whose items carry several labels counts towards each of them.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    if folds < 2 or folds > len(uniq):
        raise ValueError(f"need 2 <= folds <= number of groups ({len(uniq)}), got folds={folds}")
    classes, y = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(uniq), len(classes)))
    np.add.at(counts, (inverse, y), 1)
    class_total = counts.sum(0)
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    fold_counts = np.zeros((folds, len(classes)))
    group_fold = np.zeros(len(uniq), dtype=int)
    for g in order:
        share = (fold_counts / class_total) @ counts[g]
        best = min(range(folds), key=lambda f: (round(share[f], 12), fold_counts[f].sum(), f))
        group_fold[g] = best
        fold_counts[best] += counts[g]
    return group_fold[inverse]


def label_subset(train_idx: np.ndarray, labels: np.ndarray, fraction: float, seed: Sequence[int] | int) -> np.ndarray:
    """A seeded stratified subset of ``train_idx``: round(fraction · n_c) items of each class c, at least 1."""
    train_idx = np.asarray(train_idx)
    if fraction >= 1.0:
        return train_idx
    rng = np.random.default_rng(seed)
    parts = []
    for c in np.unique(labels[train_idx]):
        members = train_idx[labels[train_idx] == c]
        parts.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(parts))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def accuracy_from_counts(counts: np.ndarray) -> np.ndarray:
    """Counts ``[..., (correct, seen)]`` -> accuracy."""
    return counts[..., 0] / np.maximum(counts[..., 1], 1)


def paired_bootstrap(
    adapted: np.ndarray,
    frozen: np.ndarray,
    metric: Callable[[np.ndarray], np.ndarray],
    units: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(metric(adapted) − metric(frozen), CI low, CI high): a percentile bootstrap over units (and repeats).

    ``adapted``/``frozen`` are per-item count arrays for the *same* items: N × C, or R × N × C with
    one slice per repeat. Each resample draws units (groups; default every item its own unit) with
    replacement and, when R > 1, repeats with replacement too (so the spread between fold
    assignments and label subsets enters the CI); both models' counts are summed with the same
    weights and the metric difference taken, ``n_boot`` times. The CI is the (1 − level)/2 and
    (1 + level)/2 percentiles of those differences; the point estimate pools every repeat and item.
    """
    a, f = np.asarray(adapted, dtype=float), np.asarray(frozen, dtype=float)
    a, f = (a[None], f[None]) if a.ndim == 2 else (a, f)
    n_rep, n_items, n_cols = a.shape
    _, inverse = np.unique(np.arange(n_items) if units is None else np.asarray(units), return_inverse=True)
    n_units = int(inverse.max()) + 1
    a_u, f_u = np.zeros((n_rep, n_units, n_cols)), np.zeros((n_rep, n_units, n_cols))
    for r in range(n_rep):
        np.add.at(a_u[r], inverse, a[r])
        np.add.at(f_u[r], inverse, f[r])
    delta = float(metric(a_u.sum((0, 1))) - metric(f_u.sum((0, 1))))
    if n_boot <= 0 or n_units < MIN_UNITS:  # e.g. every test tile from one scene: one group, no CI
        return delta, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, 64):  # weights in chunks keep memory at 64 × units × columns
        b = min(64, n_boot - start)
        w = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=b).astype(float)
        v = rng.multinomial(n_rep, np.full(n_rep, 1 / n_rep), size=b).astype(float) if n_rep > 1 else np.ones((b, 1))
        sums = [np.einsum("br,bu,ruc->bc", v, w, x) for x in (a_u, f_u)]
        diffs.append(metric(sums[0]) - metric(sums[1]))
    lo, hi = np.nanpercentile(np.concatenate(diffs), [50 * (1 - level), 50 * (1 + level)])
    return delta, float(lo), float(hi)


def seed_interval(deltas: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval for the mean of per-seed paired differences.

    The between-seed spread is what a user re-running with another seed sees; with n seeds the
    interval has n − 1 degrees of freedom (so 3 seeds give wide intervals: t = 4.30). One value
    has no spread: its interval is (nan, nan).
    """
    d = np.asarray(deltas, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = float(student_t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def verdict(low: float, high: float) -> str:
    """'resolved gain' when the whole CI is above 0, 'resolved loss' when below, else not resolved."""
    if low > 0:
        return GAIN
    if high < 0:
        return LOSS
    return UNRESOLVED


def format_delta(delta: float, low: float | None, high: float | None) -> str:
    """'+0.025 [+0.010, +0.040]', or '+0.025 (no CI)' where there is no interval."""
    if low is None or high is None or np.isnan(low) or np.isnan(high):
        return f"{delta:+.3f} (no CI)"
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"
