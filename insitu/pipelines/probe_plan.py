"""The probe's protocol, shared by every probe: the labelled pool, repeated group folds with label
subsets, and the summary of per-evaluation scores into results with paired bootstrap CIs, p-values,
and the verdicts (the pre-registered primary endpoint by its CI, every other row Holm-adjusted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.adapters import AdaptedBackbone
from insitu.config import DataConfig, ProbeConfig, RunConfig
from insitu.domains import ManifestItem, split_by_group
from insitu.domains.normalize import Normalizer
from insitu.errors import DataError
from insitu.exports.verdict import BASELINE as VERDICT_BASELINE
from insitu.heads.stats import (
    GAIN,
    HOLM_UNRESOLVED,
    LOSS,
    NO_CI,
    bootstrap_differences,
    bootstrap_p_value,
    group_folds,
    holm,
    label_subset,
    mean_std,
    percentile_interval,
    verdict,
)
from insitu.pipelines.data import ScannedData
from insitu.pipelines.holdout import grouped_items, probe_holdout  # grouped_items: imported from here by probe_dense


@dataclass
class ProbeResult:
    """One model × probe × label share × metric: mean ± std over evaluations, and the paired difference."""

    model: str
    probe: str  # linear | knn | dense
    labels: float  # share of the training labels used
    metric: str  # accuracy | mIoU | dice
    mean: float
    std: float
    evaluations: int  # folds × repeats
    n_train: int  # mean training items per evaluation
    n_test: int  # distinct test items scored
    delta: float | None = None  # adapted − frozen, pooled over every evaluation
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: str = ""
    primary: bool = False  # the pre-registered endpoint (probe.primary), on rows with a Δ
    p_value: float | None = None  # two-sided bootstrap p of Δ vs frozen
    p_adjusted: float | None = None  # Holm over the model's secondary rows; the primary's own p
    knn_features: str = ""  # standardised | raw on knn rows
    transductive: bool = False  # probe.transductive, copied
    vs_baseline_delta: float | None = None  # adapted − (frozen + PCA whitening), same bootstrap
    vs_baseline_ci_low: float | None = None
    vs_baseline_ci_high: float | None = None
    counts: list | None = None  # R × N × C per-repeat counts of the N test items scored (probe.json's items order)
    items: list[str] | None = None  # the reference (frozen) model's rows only: those N test items' ids
    units: list[int] | None = None  # ... and the bootstrap unit (group index) of each
    fit: dict | None = None  # dense rows: how the heads were trained (steps, converged, class weights: probe_dense.summarise_fits)


BASELINE = VERDICT_BASELINE  # the label-free baseline row (probe.label_free_baseline); one name, defined in insitu.exports.verdict


@dataclass
class Split:
    """One evaluation: the training indices (after the label subset) and the test indices of a pool."""

    repeat: int
    fold: int
    fraction: float
    train: np.ndarray
    test: np.ndarray


@dataclass
class Model:
    name: str
    model: AdaptedBackbone
    normalizer: Normalizer | None  # None: fit on the probe data (the frozen backbone without packages)
    trainable: int


# ---------------------------------------------------------------- data and splits


def probe_splits(cfg: RunConfig) -> tuple[ScannedData, list, ScannedData, list]:
    """(train data, train items, test data, test items) from ``probe.train``/``probe.test`` or a group split."""
    train_cfg: DataConfig = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    if cfg.probe.test is not None:
        test = ScannedData.scan(cfg.probe.test)
        train_items, test_items = train.manifest.items, test.manifest.items
    else:
        parts = split_by_group(train.manifest.items, {"train": 1 - cfg.probe.test_fraction, "test": cfg.probe.test_fraction}, seed=cfg.seed)
        test, train_items, test_items = train, parts["train"], parts["test"]
    for name, items in (("train", train_items), ("test", test_items)):
        _check_labels(items, f"probe {name} set under {train_cfg.root}")
    return train, train_items, test, test_items


def _check_labels(items: list[ManifestItem], what: str) -> None:
    labels = {i.label for i in items}
    if None in labels or len(labels) < 2:
        raise DataError(
            f"{what} needs labels of at least 2 classes (class subfolders, or *_labels arrays in an .npz); set probe.train/probe.test."
        )


@dataclass
class Pool:
    """The labelled items a probe draws on: per side (data, items), plus a fixed split when one is given."""

    sides: list[tuple[ScannedData, list[ManifestItem]]]
    fixed: tuple[np.ndarray, np.ndarray] | None

    @property
    def items(self) -> list[ManifestItem]:
        return [i for _, items in self.sides for i in items]


def classification_pool(cfg: RunConfig) -> Pool:
    """``probe.train`` (or ``data``) to cut into folds, or ``probe.train`` + ``probe.test`` as a fixed split."""
    train_cfg = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    _check_labels(train.manifest.items, f"probe train set under {train_cfg.root}")
    if cfg.probe.test is None:
        grouped = grouped_items(train.manifest.items, cfg.probe)
        held = probe_holdout(cfg, train, grouped)  # inductive by default: a pool pretraining saw is split once
        if held is None:
            return Pool([(train, grouped)], None)
        n_tr, n_te = len(held.train), len(held.test)
        return Pool([(train, held.train + held.test)], (np.arange(n_tr), np.arange(n_tr, n_tr + n_te)))
    test = ScannedData.scan(cfg.probe.test)
    _check_labels(test.manifest.items, f"probe test set under {cfg.probe.test.root}")
    if cfg.probe.pool_test:  # fold over both sets: every item is tested once per repeat
        return Pool([(train, grouped_items(train.manifest.items, cfg.probe)), (test, grouped_items(test.manifest.items, cfg.probe))], None)
    n_tr, n_te = len(train.manifest.items), len(test.manifest.items)
    return Pool([(train, train.manifest.items), (test, test.manifest.items)], (np.arange(n_tr), np.arange(n_tr, n_tr + n_te)))


def classification_test_items(cfg: RunConfig) -> list[ManifestItem]:
    """The classification probe's test items when they are a fixed set (``probe.test``, or the inductive hold-out), else []."""
    if cfg.probe.test is not None:
        return ScannedData.scan(cfg.probe.test).manifest.items
    train_cfg = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    labels = {i.label for i in train.manifest.items}
    if None in labels or len(labels) < 2:
        return []
    held = probe_holdout(cfg, train, grouped_items(train.manifest.items, cfg.probe))
    return held.test if held is not None else []


def evaluation_plan(
    labels: np.ndarray,
    groups: np.ndarray,
    probe: ProbeConfig,
    seed: int,
    fixed: tuple[np.ndarray, np.ndarray] | None = None,
    fractions: list[float] | None = None,
    classify: bool = True,
) -> list[Split]:
    """Every (repeat, fold, label share) evaluation, built once from labels and groups so all models share it.

    Repeat r uses seed ``seed + r`` for its folds; the label subset of (repeat, fold, share) is drawn
    with the seed sequence (seed + r, fold, share · 10⁶). ``classify``: every training side must hold
    two classes (the dense probe only stratifies by label).
    """
    plan = []
    for r in range(probe.repeats):
        if fixed is not None:
            folds = [fixed]
        else:
            try:
                fold_of = group_folds(labels, groups, probe.folds, seed + r)
            except ValueError as exc:
                raise DataError(f"probe.folds={probe.folds}: {exc}; lower probe.folds or add labelled items.") from None
            folds = [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(probe.folds)]
        for k, (train, test) in enumerate(folds):
            for f in fractions or probe.label_fractions:
                if classify and len(np.unique(labels[train])) < 2:
                    raise DataError(f"probe fold {k} (repeat {r}) trains on a single class; lower probe.folds or add labelled items.")
                sub = label_subset(train, labels, f, [seed + r, k, round(f * 1e6)])
                plan.append(Split(r, k, f, sub, test))
    return plan


# ---------------------------------------------------------------- summary


def summarise(
    scored: dict[str, dict[tuple[str, float], dict[str, Any]]],
    metrics: dict[str, Any],
    units: np.ndarray,
    probe: ProbeConfig,
    seed: int,
    classes: np.ndarray | None = None,
    items: list[str] | None = None,
) -> dict[str, list[ProbeResult]]:
    """ProbeResults per model; models after the first (the frozen reference) also get Δ vs it with a
    bootstrap CI and p-value, and adapted models Δ vs the label-free baseline when it was scored.

    ``units``/``classes``/``items``: each pool item's bootstrap unit (group), label (the MIN_UNITS
    rule counts units per class; None: no classes) and id. Every row keeps its per-repeat counts of
    the items it scored; the reference model's rows also carry those items' ids and unit indices.
    Verdicts follow `decide_verdicts`.
    """
    names = list(scored)
    out: dict[str, list[ProbeResult]] = {n: [] for n in names}
    for key, frozen in scored[names[0]].items():
        for metric, fn in metrics[key[0]].items():
            seen = frozen["counts"][..., -1].sum(0) > 0 if metric == "accuracy" else frozen["seen"]
            unit_idx = np.unique(units[seen], return_inverse=True)[1].reshape(-1)
            cls = None if classes is None else classes[seen]
            for name in names:
                entry = scored[name][key]
                scores = [s[metric] if isinstance(s, dict) else s for s in entry["scores"]]
                mean, std = mean_std(scores)
                row = ProbeResult(
                    name, key[0], key[1], metric, mean, std, len(scores), round(float(np.mean(entry["n_train"]))), int(seen.sum())
                )
                row.knn_features = probe.knn_features if key[0] == "knn" else ""
                row.transductive = probe.transductive
                row.counts = _nested(entry["counts"][:, seen])
                if name == names[0]:
                    row.items = None if items is None else [items[i] for i in np.flatnonzero(seen)]
                    row.units = unit_idx.tolist()
                else:
                    d, diffs = bootstrap_differences(entry["counts"][:, seen], frozen["counts"][:, seen], fn, unit_idx, probe.bootstrap, seed, cls)
                    lo, hi = percentile_interval(diffs, probe.confidence)
                    row.delta = d
                    if diffs is not None:  # no bootstrap asked, or too few groups behind a class: no CI, no p
                        row.ci_low, row.ci_high, row.p_value = lo, hi, bootstrap_p_value(diffs)
                    base = scored.get(BASELINE, {}).get(key)
                    if base is not None and name != BASELINE:
                        row.vs_baseline_delta, diffs = bootstrap_differences(
                            entry["counts"][:, seen], base["counts"][:, seen], fn, unit_idx, probe.bootstrap, seed, cls
                        )
                        if diffs is not None:
                            row.vs_baseline_ci_low, row.vs_baseline_ci_high = percentile_interval(diffs, probe.confidence)
                out[name].append(row)
    decide_verdicts(out, probe)
    return out


def _nested(counts: np.ndarray) -> list:
    """Counts as nested lists, ints where every value is integral (pixel and item counts)."""
    return counts.astype(int).tolist() if np.array_equal(counts, np.round(counts)) else counts.tolist()


def decide_verdicts(results: dict[str, list[ProbeResult]], probe: ProbeConfig) -> None:
    """Mark the primary endpoint and set every verdict, in place (idempotent: rerun after merging probes).

    Per model, the row at ``probe.primary`` (`ProbeConfig.primary_endpoint`) is judged by its CI
    (p_adjusted = its p_value); every other row with a Δ is secondary: Holm over those rows' p-values,
    and 'resolved gain/loss' (by the sign of Δ) only when the adjusted p < 1 − confidence."""
    endpoint = probe.primary_endpoint()
    alpha = 1 - probe.confidence
    for rows in results.values():
        compared = [r for r in rows if r.delta is not None]
        for r in compared:
            r.primary = (r.probe, r.labels, r.metric) == endpoint
            if r.primary:
                r.p_adjusted = r.p_value
                r.verdict = "" if not probe.bootstrap else NO_CI if r.ci_low is None else verdict(r.ci_low, r.ci_high)
            else:
                r.p_adjusted, r.verdict = None, "" if not probe.bootstrap else NO_CI
        family = [r for r in compared if not r.primary and r.p_value is not None]
        for r, p in zip(family, holm([r.p_value for r in family]), strict=True):
            r.p_adjusted = float(p)
            r.verdict = (GAIN if r.delta > 0 else LOSS) if p < alpha else HOLM_UNRESOLVED
