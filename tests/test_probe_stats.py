"""The repeated probe's statistics against hand-computed values, the dense probe, and `insitu probe` outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.cli import main
from insitu.config import ProbeConfig, load_config
from insitu.heads.metrics import dense_counts, fg_dice_from_counts, miou_from_counts, segmentation_metrics
from insitu.heads.stats import (
    GAIN,
    HOLM_UNRESOLVED,
    LOSS,
    MIN_UNITS,
    UNRESOLVED,
    accuracy_from_counts,
    group_folds,
    label_subset,
    mean_std,
    paired_bootstrap,
    seed_interval,
    verdict,
)
from insitu.pipelines import probe as probe_mod
from insitu.pipelines.probe import run_probe
from insitu.pipelines.probe_plan import BASELINE, evaluation_plan
from tests.conftest import shared, tiny_config

CSV_BEFORE = ["model", "probe", "labels", "metric", "mean", "std", "evaluations", "n_train", "n_test", "delta", "ci_low", "ci_high", "verdict"]


def test_group_folds_are_stratified_and_group_disjoint():
    # 3 classes of 60/30/15 items in groups of 1..3 items (a group never mixes classes here)
    labels, groups = [], []
    for c, n in enumerate((60, 30, 15)):
        i = 0
        while i < n:
            size = min(1 + (i % 3), n - i)
            labels += [c] * size
            groups += [f"c{c}g{i}"] * size
            i += size
    labels, groups = np.array(labels), np.array(groups)
    fold = group_folds(labels, groups, folds=5, seed=3)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1  # no group crosses folds
    for c, n in enumerate((60, 30, 15)):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 3, (c, per_fold)  # within one group size of n/5
        assert per_fold.sum() == n
    assert not np.array_equal(fold, group_folds(labels, groups, folds=5, seed=4))  # the seed changes the folds
    np.testing.assert_array_equal(fold, group_folds(labels, groups, folds=5, seed=3))
    with pytest.raises(ValueError, match="folds"):
        group_folds(labels[:3], groups[:3], folds=5)


def test_label_subsets_have_the_right_sizes_and_every_class():
    labels = np.array([0] * 70 + [1] * 25 + [2] * 5)
    train = np.arange(100)
    for fraction, sizes in ((0.1, (7, 2, 1)), (0.01, (1, 1, 1)), (1.0, (70, 25, 5))):
        sub = label_subset(train, labels, fraction, [0, 1, 2])
        assert tuple(np.bincount(labels[sub], minlength=3)) == sizes
        assert len(set(sub)) == len(sub) and set(sub) <= set(train)
    np.testing.assert_array_equal(label_subset(train, labels, 0.1, [0, 1, 2]), label_subset(train, labels, 0.1, [0, 1, 2]))
    plan = evaluation_plan(labels, np.arange(100).astype(str), ProbeConfig(folds=4, repeats=2), seed=0)
    assert len(plan) == 2 * 4 * 3  # repeats × folds × label fractions
    for s in plan:
        assert not set(s.train) & set(s.test)
        assert set(np.unique(labels[s.train])) == {0, 1, 2}
    for r in range(2):  # every item is tested exactly once per repeat
        tested = np.concatenate([s.test for s in plan if s.repeat == r and s.fraction == 1.0])
        np.testing.assert_array_equal(np.sort(tested), np.arange(100))


def test_mean_std_matches_numpy():
    values = [0.81, 0.77, 0.9, 0.85, 0.79]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_seed_interval_by_hand():
    # deltas 0.01, 0.03, 0.02: mean 0.02, sd 0.01, se 0.01/sqrt(3); t(0.975, 2 df) = 4.302653
    mean, low, high = seed_interval([0.01, 0.03, 0.02])
    half = 4.302653 * 0.01 / np.sqrt(3)
    assert mean == pytest.approx(0.02)
    assert (low, high) == (pytest.approx(0.02 - half, abs=1e-6), pytest.approx(0.02 + half, abs=1e-6))
    assert verdict(low, high) == UNRESOLVED  # three small, spread seeds do not resolve
    assert verdict(*seed_interval([0.030, 0.031, 0.030])[1:]) == GAIN
    mean, low, high = seed_interval([0.05])
    assert mean == 0.05 and np.isnan(low) and np.isnan(high)


def test_paired_bootstrap_on_constructed_differences():
    n = 50
    right, wrong = np.tile([1.0, 1.0], (n, 1)), np.tile([0.0, 1.0], (n, 1))
    # adapted right on every item, frozen wrong on every item: +1 everywhere, CI [1, 1]
    assert paired_bootstrap(right, wrong, accuracy_from_counts, n_boot=500) == (1.0, 1.0, 1.0)
    assert verdict(1.0, 1.0) == GAIN
    # symmetric ±1: half the items gain, half lose: Δ = 0 and the CI spans 0
    adapted = np.where(np.arange(n)[:, None] % 2 == 0, right, wrong)
    frozen = np.where(np.arange(n)[:, None] % 2 == 0, wrong, right)
    delta, lo, hi = paired_bootstrap(adapted, frozen, accuracy_from_counts, n_boot=2000, seed=1)
    assert delta == 0.0 and lo < 0 < hi and verdict(lo, hi) == UNRESOLVED
    # the standard error of a mean of ±1 over 50 items is ~0.141: the 95 % CI is about ±0.28
    assert 0.2 < hi < 0.36 and -0.36 < lo < -0.2
    # units: items of one group are resampled together; six groups, three gaining and three losing on every item
    d, lo, hi = paired_bootstrap(adapted, frozen, accuracy_from_counts, units=np.arange(n) % 6, n_boot=2000)
    assert d == pytest.approx(0.0, abs=0.05) and lo < -0.5 and hi > 0.5
    # fewer than MIN_UNITS groups (all test tiles from one scene, say): no CI rather than a degenerate one
    d, lo, hi = paired_bootstrap(right, wrong, accuracy_from_counts, units=np.zeros(n), n_boot=500)
    assert d == 1.0 and np.isnan(lo) and np.isnan(hi) and MIN_UNITS == 5
    assert verdict(-0.3, -0.1) == LOSS
    # repeats (R × N × C): repeat 0 gains on every item, repeat 1 loses on every item. Pooled Δ = 0;
    # resampling items alone would give CI [0, 0], resampling repeats too gives [-1, 1]
    d, lo, hi = paired_bootstrap(np.stack([right, wrong]), np.stack([wrong, right]), accuracy_from_counts, n_boot=500)
    assert d == 0.0 and lo == -1.0 and hi == 1.0
    d, lo, hi = paired_bootstrap(np.stack([right, right]), np.stack([wrong, wrong]), accuracy_from_counts, n_boot=200)
    assert (d, lo, hi) == (1.0, 1.0, 1.0)


def test_dense_counts_against_a_hand_computation():
    target = torch.tensor([[[0, 0, 1], [0, 1, 1]]])  # 3 fg pixels
    pred = torch.tensor([[[0, 1, 1], [0, 0, 1]]])  # 3 fg pixels, 2 of them right
    c = dense_counts(pred, target, num_classes=2)
    # class 0: I = 2, P = 3, T = 3 -> IoU 2/4; class 1: I = 2, P = 3, T = 3 -> IoU 2/4; fg Dice 2·2/(3+3)
    np.testing.assert_array_equal(c[0], [2, 3, 3, 2, 3, 3, 2, 3, 3])
    assert miou_from_counts(c.sum(0)) == pytest.approx(0.5)
    assert fg_dice_from_counts(c.sum(0)) == pytest.approx(2 / 3)
    assert miou_from_counts(c.sum(0)) == pytest.approx(segmentation_metrics(pred, target, 2)["mIoU"])
    ignored = torch.tensor([[[0, 0, 255], [0, 1, 1]]])  # the ignored pixel counts nowhere
    # class 0 keeps its 3 + 3 pixels (I = 2); class 1 loses one predicted pixel: I = 1, P = 2, T = 2
    np.testing.assert_array_equal(dense_counts(pred, ignored, 2)[0], [2, 3, 3, 1, 2, 2, 1, 2, 2])


def write_block_set(root: Path, n: int = 16, size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Dark images with bright 8×8 blocks on the patch grid; the mask is exactly the bright blocks."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ("a", "b")[i % 2]
        blocks = rng.random((size // 8, size // 8)) < 0.4
        blocks[0, 0], blocks[-1, -1] = True, False
        mask = np.kron(blocks, np.ones((8, 8), dtype=bool))
        img = np.where(mask, 200, 40) + rng.integers(0, 10, (size, size))
        for sub, arr in (("images", img.astype(np.uint8)), ("masks", mask.astype(np.uint8) * 255)):
            (root / sub / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / cls / f"x{i:02d}.png")
    return root / "images", root / "masks"


def test_dense_probe_scores_high_when_masks_follow_intensity(tmp_path):
    images, masks = write_block_set(tmp_path / "blocks")
    data = {"domain": "images", "root": str(images), "image_size": 32, "options": {"channels": 3, "masks": str(masks)}}
    dense = {"data": data, "steps": 60, "lr": 0.1}
    cfg = load_config(
        tiny_config(images, tmp_path / "runs", probe={"folds": 2, "label_fractions": [1.0], "bootstrap": 100, "dense": dense, "transductive": True})
    )
    rows = run_probe(cfg)
    dense_rows = {r.metric: r for r in rows[0].results if r.probe == "dense"}
    assert dense_rows["mIoU"].mean > 0.8 and dense_rows["dice"].mean > 0.8, dense_rows
    assert dense_rows["mIoU"].evaluations == 2 and dense_rows["mIoU"].n_test == 16


def test_dense_probe_reads_busi_masks():
    busi, masks = shared("medical", "busi"), shared("medical", "busi_masks")
    from insitu.domains import create_domain

    domain = create_domain("images", {"channels": 1, "masks": str(masks)})
    manifest = domain.scan(busi, max_items=6)
    sample = domain.load(manifest.items[0], manifest)
    assert sample["mask"].shape == sample["image"].shape[-2:] and set(sample["mask"].unique().tolist()) <= {0, 1}
    assert sample["mask"].sum() > 0  # the first benign image has a lesion


def test_cli_probe_writes_csv_with_the_new_columns(tmp_path, shapes_dir, monkeypatch, capsys):
    import yaml

    from insitu.pipelines.pretrain import pretrain

    raw = tiny_config(shapes_dir, tmp_path / "runs", train={"max_steps": 2, "batch_size": 4}, probe={"knn_k": 3, "bootstrap": 200, "transductive": True})
    result = pretrain(load_config(raw), quiet=True)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    plans = []
    score = probe_mod.score_classification
    monkeypatch.setattr(probe_mod, "score_classification", lambda *a, **kw: plans.append(a[2]) or score(*a, **kw))
    out = tmp_path / "probe_out"
    assert main(["--quiet", "probe", "-c", str(tmp_path / "cfg.yaml"), "--adapter", str(result.adapter_dir), "--out", str(out)]) == 0
    # frozen, adapted and the whitened baseline were scored on identical folds and label subsets (a paired comparison)
    assert len(plans) == 3 and len(plans[0]) == 5 * 3
    for a, b, c in zip(*plans, strict=True):
        np.testing.assert_array_equal(a.train, b.train)
        np.testing.assert_array_equal(a.test, c.test)
    with open(out / "probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[: len(CSV_BEFORE)] == CSV_BEFORE and list(rows[0]) == probe_mod.CSV_COLUMNS  # new columns at the end
    assert len(rows) == 3 * 2 * 3  # models (frozen, adapted, baseline) × (linear, kNN) × label fractions
    adapted = [r for r in rows if r["model"].startswith("+ adapters")]
    assert all(float(r["ci_low"]) <= float(r["delta"]) <= float(r["ci_high"]) and 0 < float(r["p_value"]) <= 1 for r in adapted)
    (primary,) = [r for r in adapted if r["primary"] == "True"]
    assert (primary["probe"], primary["labels"]) == ("linear", "1.0") and primary["verdict"] in (GAIN, LOSS, UNRESOLVED)
    assert primary["p_adjusted"] == primary["p_value"] and primary["vs_baseline_delta"] != ""
    assert all(r["verdict"] in (GAIN, LOSS, HOLM_UNRESOLVED) for r in adapted if r is not primary)
    assert {r["knn_features"] for r in rows if r["probe"] == "knn"} == {"standardised"} and {r["transductive"] for r in rows} == {"True"}
    assert {r["labels"] for r in rows} == {"1.0", "0.1", "0.01"} and all(r["evaluations"] == "5" for r in rows)
    assert {r["model"] for r in rows if r["delta"] == ""} == {"frozen backbone"} and any(r["model"] == BASELINE for r in rows)
    saved = json.loads((out / "probe.json").read_text())
    assert saved["protocol"]["folds"] == 5 and saved["rows"][0]["name"] == "frozen backbone"
    assert saved["protocol"]["primary"] == "linear@1.0:accuracy"
    # per-item counts: R × N × 2 ints over the tested items, in the order of the top-level items and units
    items, units = saved["items"]["linear"], saved["units"]["knn"]
    assert len(items) == len(units) == 24 and all(isinstance(u, int) for u in units) and saved["items"]["knn"] == items
    for row in saved["rows"]:
        for r in row["results"]:
            counts = np.array(r["counts"])
            assert counts.shape == (1, 24, 2) and counts.dtype == int and (counts[..., 1] == 1).all() and "items" not in r
    # the stored counts reproduce the row's Δ and CI
    (a_row,) = [r for r in saved["rows"][1]["results"] if r["primary"]]
    f_row = next(r for r in saved["rows"][0]["results"] if (r["probe"], r["labels"]) == ("linear", 1.0))
    d, lo, hi = paired_bootstrap(np.array(a_row["counts"]), np.array(f_row["counts"]), accuracy_from_counts, units, 200, 0)
    assert (d, lo, hi) == pytest.approx((a_row["delta"], a_row["ci_low"], a_row["ci_high"]))
    printed = capsys.readouterr().out
    assert "Δ vs frozen" in printed and "probe.csv" in printed
    assert "primary endpoint linear@1.0:accuracy, + adapters" in printed and f"vs {BASELINE}:" in printed


def test_run_probe_folds_keep_groups_apart_and_pool_test_folds_both_sets(tmp_path, shapes_dir, monkeypatch):
    from tests.conftest import write_shapes

    plans = []
    score = probe_mod.score_classification
    monkeypatch.setattr(probe_mod, "score_classification", lambda *a, **kw: plans.append(a[2]) or score(*a, **kw))
    # files shape_<i>.png: group by i, so each group holds one image of every class (mixed-label groups)
    data = {"domain": "images", "root": str(shapes_dir), "image_size": 32, "options": {"group_pattern": r"_(\d+)\."}}
    probe = {"folds": 3, "label_fractions": [1.0], "bootstrap": 50, "transductive": True}  # folds over the pretraining pool
    rows = run_probe(load_config(tiny_config(shapes_dir, tmp_path / "runs", data=data, probe=probe)))
    items = probe_mod.classification_pool(load_config(tiny_config(shapes_dir, tmp_path / "runs", data=data, probe=probe))).items
    groups = np.array([i.group for i in items])
    assert len(set(groups)) == 6 and len(plans[0]) == 3
    for s in plans[0]:
        assert not set(groups[s.train]) & set(groups[s.test])
    assert rows[0].evaluations == 3 and rows[0].n_train + rows[0].n_test == 24
    # a second set with the same relative file names: folds over train ∪ test keep all 48 items apart
    other = write_shapes(tmp_path / "other", seed=1)
    plans.clear()
    test = {"domain": "images", "root": str(other), "image_size": 32}
    rows = run_probe(load_config(tiny_config(shapes_dir, tmp_path / "runs", probe={**probe, "test": test, "pool_test": True})))
    tested = np.concatenate([s.test for s in plans[0]])
    np.testing.assert_array_equal(np.sort(tested), np.arange(48))
    assert rows[0].n_train + rows[0].n_test == 48


def test_knn_k_is_capped_at_the_smallest_labelled_class():
    from insitu.heads.probe import effective_k, knn_predict

    four_each = np.repeat(np.arange(4), 4)
    assert effective_k(10, four_each) == 4 and effective_k(3, four_each) == 3
    assert effective_k(20, np.array([0] * 50 + [1] * 30)) == 20
    assert effective_k(5, np.array([0, 0, 2, 2])) == 2  # absent class ids do not count as empty classes
    # why: 2 labels of class 0 sit right at the test point, 6 of class 1 further away. An 8-neighbour vote
    # with flat weights goes to the far majority (computed by hand below); capped at k = 2 the near pair wins.
    x_train = np.array([[1.0, 0.02], [1.0, -0.02]] + [[1.0, 0.9 + 0.01 * i] for i in range(6)])
    y_train = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    x_test = np.array([[1.0, 0.0]])
    unit = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    weights = np.exp(unit @ x_test[0] / 10.0)
    assert weights[y_train == 1].sum() > weights[y_train == 0].sum()  # the uncapped vote would say class 1
    assert knn_predict(x_train, y_train, x_test, k=8, temperature=10.0)[0] == 0
