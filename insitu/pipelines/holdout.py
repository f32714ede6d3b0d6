"""Inductive by default: the probe's test items are never in the pretraining pool.

A probe that tests on images the adapters were pretrained on measures the in-situ (transductive)
setting: useful, but a different claim from "adaptation helps on new images". Unless the config
says ``probe.transductive: true``:

- When the probe has its own ``probe.test`` set, pretraining drops every item of its pool that is
  one of those test items (the same file, or the same item of a multi-item file such as an
  ``.npz``), and, with ``probe.group_near_duplicates``, every item in a near-duplicate cluster with
  one.
- When the probe folds a labelled pool that overlaps the pretraining pool (``probe.train`` unset,
  or pointing at the same files), that pool is split once, by group and stratified by label, into a
  probe-train side and a probe-test side (about ``probe.test_fraction``; seed ``probe.split_seed``,
  the same for every training seed, so runs with different seeds are scored on the same items);
  the probe trains on the first and tests on the second (``repeats`` vary the label subsets), and
  pretraining never sees the second.
- A labelled pool that shares no item with the pretraining pool needs nothing: its folds are
  inductive already.

`pretraining_items` is what `insitu pretrain` calls; `probe_holdout` and `dense_holdout` are what the probe calls. Both
derive the split from the config alone, so they agree without passing anything between runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from insitu.domains import ManifestItem
from insitu.heads.stats import group_folds

if TYPE_CHECKING:
    from insitu.config import ProbeConfig, RunConfig
    from insitu.pipelines.data import ScannedData

log = logging.getLogger("insitu")


def item_keys(items: list[ManifestItem]) -> list[str]:
    """One identity per item across scans of different roots: the real file path, plus the item id when a file holds several items."""
    paths = [os.path.realpath(i.path) for i in items]
    counts: dict[str, int] = {}
    for p in paths:
        counts[p] = counts.get(p, 0) + 1
    return [p if counts[p] == 1 and not p.endswith(".npz") else f"{p}::{i.item_id}" for p, i in zip(paths, items, strict=True)]


@dataclass
class Holdout:
    """The probe's fixed split of a pool that overlaps pretraining: (train side, test side) and the test items' identities."""

    train: list[ManifestItem]
    test: list[ManifestItem]
    test_keys: set[str]


def grouped_items(items: list[ManifestItem], probe: ProbeConfig) -> list[ManifestItem]:
    """Items regrouped by near-duplicate cluster of their image files when ``probe.group_near_duplicates`` (BUSI-style sets)."""
    if not probe.group_near_duplicates:
        return items
    from insitu.domains.near_duplicates import group_near_duplicates

    return group_near_duplicates(items)


def transductive(cfg: RunConfig) -> bool:
    return bool(getattr(cfg.probe, "transductive", False))


def split_seed(cfg: RunConfig) -> int:
    return int(getattr(cfg.probe, "split_seed", 0))


def stratified_holdout(items: list[ManifestItem], test_fraction: float, seed: int) -> tuple[list[ManifestItem], list[ManifestItem]]:
    """(train, test): whole groups on one side, every class near ``test_fraction`` on the test side.

    Built on `group_folds` with round(1 / test_fraction) folds (fold 0 is the test side), so a group
    whose items carry several labels still lands on one side."""
    labels = np.array([-1 if i.label is None else int(i.label) for i in items])
    groups = np.array([i.group for i in items])
    folds = max(2, round(1 / test_fraction))
    folds = min(folds, len(set(groups.tolist())))
    fold_of = group_folds(labels, groups, folds, seed)
    return [i for i, f in zip(items, fold_of, strict=True) if f != 0], [i for i, f in zip(items, fold_of, strict=True) if f == 0]


def probe_holdout(cfg: RunConfig, pool: ScannedData, items: list[ManifestItem], pretraining: ScannedData | None = None) -> Holdout | None:
    """The fixed probe split of ``items`` (a labelled pool scanned from ``pool``) when it overlaps the pretraining pool, else None.

    ``items`` carry the probe's groups (near-duplicate clusters when ``probe.group_near_duplicates``).
    ``pretraining``: the scanned ``cfg.data`` (scanned here when not given)."""
    if transductive(cfg) or cfg.probe.test is not None:
        return None
    if pretraining is None:
        from insitu.pipelines.data import ScannedData

        pretraining = ScannedData.scan(cfg.data)
    if not set(item_keys(items)) & set(item_keys(pretraining.manifest.items)):
        return None  # a labelled pool pretraining never sees: folds over it are inductive already
    train, test = stratified_holdout(items, cfg.probe.test_fraction, split_seed(cfg))
    return Holdout(train, test, set(item_keys(test)))


def probe_test_items(cfg: RunConfig, pretraining: ScannedData) -> list[ManifestItem]:
    """Every item the probe tests on (classification and dense), as far as pretraining could hold it."""
    from insitu.pipelines.data import ScannedData

    tests: list[ManifestItem] = []
    if cfg.probe.test is not None:
        tests += ScannedData.scan(cfg.probe.test).manifest.items
    else:
        pool = ScannedData.scan(cfg.probe.train) if cfg.probe.train is not None else pretraining
        labels = {i.label for i in pool.manifest.items}
        if None not in labels and len(labels) >= 2:  # an unlabelled pool is no probe pool: nothing is held out
            held = probe_holdout(cfg, pool, grouped_items(pool.manifest.items, cfg.probe), pretraining)
            tests += held.test if held is not None else []
    dense = cfg.probe.dense
    if dense is not None:
        if dense.test is not None:
            tests += ScannedData.scan(dense.test).manifest.items
        else:
            held_dense = dense_holdout(cfg, ScannedData.scan(dense.data).manifest.items, set(item_keys(tests)), pretraining)
            tests += held_dense.test if held_dense is not None else []
    return tests


def dense_holdout(
    cfg: RunConfig, items: list[ManifestItem], classification_keys: set[str], pretraining: ScannedData | None = None
) -> Holdout | None:
    """The dense probe's fixed split when its pool overlaps pretraining: the classification hold-out's items when the
    two pools share files (BUSI's images and its masks), else its own stratified group split."""
    if transductive(cfg) or cfg.probe.dense is None or cfg.probe.dense.test is not None:
        return None
    from insitu.pipelines.data import ScannedData

    if pretraining is None:
        pretraining = ScannedData.scan(cfg.data)
    keys = item_keys(items)
    if not set(keys) & set(item_keys(pretraining.manifest.items)):
        return None
    grouped = grouped_items(items, cfg.probe)
    if set(keys) & classification_keys:
        test_groups = {g.group for g, k in zip(grouped, keys, strict=True) if k in classification_keys}
        test = [g for g in grouped if g.group in test_groups]
        train = [g for g in grouped if g.group not in test_groups]
    else:
        train, test = stratified_holdout(grouped, cfg.probe.test_fraction, split_seed(cfg))
    return Holdout(train, test, set(item_keys(test)))


def pretraining_items(cfg: RunConfig, data: ScannedData) -> list[ManifestItem]:
    """``data``'s items minus the probe's test items (and their near-duplicates), unless ``probe.transductive``."""
    items = data.manifest.items
    if transductive(cfg):
        return items
    tests = probe_test_items(cfg, data)
    if not tests:
        return items
    keys, test_keys = item_keys(items), set(item_keys(tests))
    drop = {k for k in keys if k in test_keys}
    if cfg.probe.group_near_duplicates:
        drop |= _near_duplicate_keys(items, keys, tests)
    kept = [i for i, k in zip(items, keys, strict=True) if k not in drop]
    if len(kept) < len(items):
        log.info(
            "pretraining on %d of %d items: %d are the probe's test items or their near-duplicates (probe.transductive: false)",
            len(kept),
            len(items),
            len(items) - len(kept),
        )
    return kept


def _near_duplicate_keys(items: list[ManifestItem], keys: list[str], tests: list[ManifestItem]) -> set[str]:
    """Keys of pretraining items in a near-duplicate group (grouped over pretraining ∪ test items) with a test item."""
    from insitu.config import ProbeConfig

    grouped = grouped_items(items + tests, ProbeConfig(group_near_duplicates=True))
    test_groups = {g.group for g in grouped[len(items) :]}
    return {k for g, k in zip(grouped[: len(items)], keys, strict=True) if g.group in test_groups}
