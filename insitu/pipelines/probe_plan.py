"""The probe's protocol, shared by every probe: the labelled pool, repeated group folds with label
subsets, and the summary of per-evaluation scores into results with paired bootstrap CIs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from insitu.adapters import AdaptedBackbone
from insitu.config import DataConfig, ProbeConfig, RunConfig
from insitu.domains import ManifestItem, split_by_group
from insitu.domains.normalize import Normalizer
from insitu.errors import DataError
from insitu.heads.stats import NO_CI, group_folds, label_subset, mean_std, paired_bootstrap, verdict
from insitu.pipelines.data import ScannedData


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
        return Pool([(train, grouped_items(train.manifest.items, cfg.probe))], None)
    test = ScannedData.scan(cfg.probe.test)
    _check_labels(test.manifest.items, f"probe test set under {cfg.probe.test.root}")
    if cfg.probe.pool_test:  # fold over both sets: every item is tested once per repeat
        return Pool([(train, grouped_items(train.manifest.items, cfg.probe)), (test, grouped_items(test.manifest.items, cfg.probe))], None)
    n_tr, n_te = len(train.manifest.items), len(test.manifest.items)
    return Pool([(train, train.manifest.items), (test, test.manifest.items)], (np.arange(n_tr), np.arange(n_tr, n_tr + n_te)))


def grouped_items(items: list[ManifestItem], probe: ProbeConfig) -> list[ManifestItem]:
    """Items regrouped by a perceptual hash when ``probe.group_near_duplicates`` (BUSI-style sets)."""
    if not probe.group_near_duplicates:
        return items
    from insitu.domains.near_duplicates import thumbnail_hash

    return [replace(i, group=thumbnail_hash(i.path)) if Path(i.path).suffix.lower() != ".npz" else i for i in items]


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
) -> dict[str, list[ProbeResult]]:
    """ProbeResults per model; models after the first also get adapted − frozen with its bootstrap CI."""
    names = list(scored)
    out: dict[str, list[ProbeResult]] = {n: [] for n in names}
    for key, frozen in scored[names[0]].items():
        for metric, fn in metrics[key[0]].items():
            for name in names:
                entry = scored[name][key]
                seen = entry["counts"][..., -1].sum(0) > 0 if metric == "accuracy" else entry["seen"]
                scores = [s[metric] if isinstance(s, dict) else s for s in entry["scores"]]
                mean, std = mean_std(scores)
                row = ProbeResult(
                    name, key[0], key[1], metric, mean, std, len(scores), round(float(np.mean(entry["n_train"]))), int(seen.sum())
                )
                if name != names[0]:
                    d, lo, hi = paired_bootstrap(
                        entry["counts"][:, seen], frozen["counts"][:, seen], fn, units[seen], probe.bootstrap, seed, probe.confidence
                    )
                    no_ci = bool(np.isnan(lo))  # no bootstrap asked, or too few groups among the test items
                    row.delta, row.ci_low, row.ci_high = d, None if no_ci else lo, None if no_ci else hi
                    row.verdict = "" if not probe.bootstrap else NO_CI if no_ci else verdict(lo, hi)
                out[name].append(row)
    return out
