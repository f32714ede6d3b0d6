"""Statistics for probes that can resolve a change: repeated group-aware folds, seeded label
subsets, mean ± std, a paired bootstrap of adapted − frozen (over items and repeats, or over items
and training seeds), bootstrap p-values with Holm's adjustment, and a verdict.

Every metric here is a function of per-item *counts* summed over items (accuracy: correct and
seen; mIoU/Dice: per-class intersection, prediction and target pixels), so one bootstrap serves
classification and dense probes alike: resample units, sum their counts, apply the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import t as student_t

GAIN, LOSS, UNRESOLVED = "resolved gain", "resolved loss", "not resolved (CI spans 0)"
NO_CI = "not resolved (too few independent groups for a CI)"
HOLM_UNRESOLVED = "not resolved (Holm-adjusted)"
MIN_UNITS = 5  # a class resting on fewer groups has a handful of distinct resamples: no CI is given


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


def _unit_index(n_items: int, units: Sequence[Any] | None) -> np.ndarray:
    """Each item's unit as an integer 0..U-1 (every item its own unit when ``units`` is None)."""
    return np.unique(np.arange(n_items) if units is None else np.asarray(units), return_inverse=True)[1].reshape(-1)


def fewest_units_per_class(units: np.ndarray, classes: Sequence[Any] | None) -> int:
    """The number of distinct units behind the smallest class (all items one class when ``classes`` is None).

    A bootstrap over units only varies what it resamples: a class resting on 3 patients gives a
    handful of distinct resamples of that class however many images it holds."""
    units = np.asarray(units)
    if classes is None:
        return len(np.unique(units))
    classes = np.asarray(classes)
    return min(len(np.unique(units[classes == c])) for c in np.unique(classes))


def bootstrap_differences(
    adapted: np.ndarray,
    frozen: np.ndarray,
    metric: Callable[[np.ndarray], np.ndarray],
    units: Sequence[Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    classes: Sequence[Any] | None = None,
) -> tuple[float, np.ndarray | None]:
    """(pooled metric(adapted) − metric(frozen), the ``n_boot`` resampled differences or None).

    ``adapted``/``frozen``: N × C or S × N × C counts on the same N items (S slices: repeats or
    training seeds). Each resample draws unit weights (multinomial over units, shared by every
    slice and both models) and, when S > 1, slice weights (multinomial over S); every count is
    weighted by slice weight × unit weight, summed, and the metric difference taken. None when
    ``n_boot`` is 0 or the smallest class of ``classes`` rests on fewer than MIN_UNITS units.
    """
    a, f = np.asarray(adapted, dtype=float), np.asarray(frozen, dtype=float)
    a, f = (a[None], f[None]) if a.ndim == 2 else (a, f)
    n_rep, n_items, n_cols = a.shape
    inverse = _unit_index(n_items, units)
    n_units = int(inverse.max()) + 1
    a_u, f_u = np.zeros((n_rep, n_units, n_cols)), np.zeros((n_rep, n_units, n_cols))
    for r in range(n_rep):
        np.add.at(a_u[r], inverse, a[r])
        np.add.at(f_u[r], inverse, f[r])
    delta = float(metric(a_u.sum((0, 1))) - metric(f_u.sum((0, 1))))
    if n_boot <= 0 or fewest_units_per_class(inverse, classes) < MIN_UNITS:  # e.g. every test tile from one scene
        return delta, None
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, 64):  # weights in chunks keep memory at 64 × units × columns
        b = min(64, n_boot - start)
        w = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=b).astype(float)
        v = rng.multinomial(n_rep, np.full(n_rep, 1 / n_rep), size=b).astype(float) if n_rep > 1 else np.ones((b, 1))
        sums = [np.einsum("br,bu,ruc->bc", v, w, x) for x in (a_u, f_u)]
        diffs.append(metric(sums[0]) - metric(sums[1]))
    return delta, np.concatenate(diffs)


def percentile_interval(diffs: np.ndarray | None, level: float = 0.95) -> tuple[float, float]:
    """The (1 − level)/2 and (1 + level)/2 percentiles of the resampled differences ((nan, nan) without them)."""
    if diffs is None:
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_p_value(diffs: np.ndarray | None) -> float:
    """Two-sided bootstrap p for "no difference": min(1, 2 · min((1 + #{d* ≤ 0}), (1 + #{d* ≥ 0})) / (B + 1)).

    B counts the finite resampled differences; nan without them."""
    if diffs is None:
        return float("nan")
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    below, above = (1 + np.sum(d <= 0)) / (len(d) + 1), (1 + np.sum(d >= 0)) / (len(d) + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_bootstrap(
    adapted: np.ndarray,
    frozen: np.ndarray,
    metric: Callable[[np.ndarray], np.ndarray],
    units: Sequence[Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    classes: Sequence[Any] | None = None,
) -> tuple[float, float, float]:
    """(metric(adapted) − metric(frozen), CI low, CI high): a percentile bootstrap over units (and repeats).

    ``adapted``/``frozen`` are per-item count arrays for the *same* items: N × C, or R × N × C with
    one slice per repeat of one training run. Each resample draws units (groups; default every item
    its own unit) with replacement and, when R > 1, repeats with replacement too (so the spread
    between fold assignments and label subsets enters the CI); both models' counts are summed with
    the same weights and the metric difference taken, ``n_boot`` times. The CI is the (1 − level)/2
    and (1 + level)/2 percentiles of those differences; the point estimate pools every repeat and
    item. No CI (nan, nan) when the smallest class of ``classes`` (the items' labels; None: one
    class) rests on fewer than MIN_UNITS distinct units. It covers items/groups and folds/label
    subsets, not the training run: see `two_way_bootstrap` for several training seeds.
    """
    delta, diffs = bootstrap_differences(adapted, frozen, metric, units, n_boot, seed, classes)
    return (delta, *percentile_interval(diffs, level))


def two_way_bootstrap(
    adapted: np.ndarray,
    frozen: np.ndarray,
    metric: Callable[[np.ndarray], np.ndarray],
    units: Sequence[Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    classes: Sequence[Any] | None = None,
) -> tuple[float, float, float]:
    """(Δ, CI low, CI high) over test units *and* training seeds: S adapted runs on the same N test items.

    ``adapted``: S × N × C counts, one slice per training seed (sum a run's repeats first);
    ``frozen``: N × C (one frozen model, the same for every seed) or S × N × C. Each resample draws
    unit weights (multinomial over units, shared across seeds) and seed weights (multinomial over
    S), weights every count by seed weight × unit weight, sums, and takes metric(adapted) −
    metric(frozen). The point estimate pools every seed and item. No CI under MIN_UNITS per class,
    as `paired_bootstrap`. `bootstrap_differences` gives the resamples for `bootstrap_p_value`.
    """
    a, f = np.asarray(adapted, dtype=float), np.asarray(frozen, dtype=float)
    if a.ndim != 3:
        raise ValueError(f"adapted must be S × N × C counts (one slice per training seed), got shape {a.shape}")
    f = np.broadcast_to(f, a.shape) if f.ndim == 2 else f
    return paired_bootstrap(a, f, metric, units, n_boot, seed, level, classes)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment: sorted p₍ᵢ₎ × (m − i), made monotone, capped at 1 (original order kept)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = scaled
    return out


def seed_interval(deltas: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval for the mean of per-seed paired differences.

    The between-seed spread is what a user re-running with another seed sees; with n seeds the
    interval has n − 1 degrees of freedom (so 3 seeds give wide intervals: t = 4.30). One value
    has no spread: its interval is (nan, nan). It covers training seeds only, on one fixed image
    pool: the test items are not resampled (`two_way_bootstrap` covers both).
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
