"""Inductive by default: the probe's test items (and their near-duplicates) never reach pretraining."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from insitu.config import load_config
from insitu.pipelines.data import ScannedData
from insitu.pipelines.holdout import item_keys, pretraining_items, probe_test_items
from insitu.pipelines.probe_plan import classification_pool
from tests.conftest import tiny_config, write_shapes


def _cfg(tmp_path: Path, root: Path, **probe: object):
    return load_config(tiny_config(root, tmp_path / "runs", probe={"knn_k": 3, **probe}))


def test_folding_the_pretraining_pool_holds_out_a_group_disjoint_test_side(tmp_path: Path) -> None:
    root = write_shapes(tmp_path / "data", n_per_class=6)
    cfg = _cfg(tmp_path, root)
    data = ScannedData.scan(cfg.data)
    kept = pretraining_items(cfg, data)
    pool = classification_pool(cfg)
    assert pool.fixed is not None  # the probe is a fixed split now: train side, then the held-out test side
    items = pool.items
    test = [items[i] for i in pool.fixed[1]]
    train = [items[i] for i in pool.fixed[0]]
    assert 0 < len(test) < len(data.manifest.items) and len(train) + len(test) == len(data.manifest.items)
    # pretraining sees every item but the probe's test items, and none of them
    assert not set(item_keys(kept)) & set(item_keys(test))
    assert len(kept) == len(data.manifest.items) - len(test)
    # every class is on both sides, and no group straddles them
    assert {i.label for i in test} == {i.label for i in train} == {0, 1, 2, 3}
    assert not {i.group for i in test} & {i.group for i in train}
    # the hold-out does not depend on the training seed: runs with different seeds share their test items
    other = load_config({**tiny_config(root, tmp_path / "runs", probe={"knn_k": 3}), "seed": 7})
    assert set(item_keys(probe_test_items(other, data))) == set(item_keys(test))


def test_transductive_keeps_every_item_and_folds_as_before(tmp_path: Path) -> None:
    root = write_shapes(tmp_path / "data", n_per_class=6)
    cfg = _cfg(tmp_path, root, transductive=True)
    data = ScannedData.scan(cfg.data)
    assert pretraining_items(cfg, data) == data.manifest.items
    assert classification_pool(cfg).fixed is None


def test_a_separate_probe_test_set_inside_the_pool_is_removed_with_its_near_duplicates(tmp_path: Path) -> None:
    root = write_shapes(tmp_path / "data", n_per_class=4)
    held = write_shapes(tmp_path / "data" / "heldout", n_per_class=2, seed=5, classes=2)  # a labelled test set inside the root
    copy = tmp_path / "data" / "circle" / "copy_of_a_test_image.png"
    shutil.copyfile(next((held / "circle").glob("*.png")), copy)  # its byte-identical copy, filed elsewhere under the root
    cfg = _cfg(tmp_path, root, test={"root": str(held), "image_size": 32})
    data = ScannedData.scan(cfg.data)
    kept = {Path(i.path).resolve() for i in pretraining_items(cfg, data)}
    assert not any(p.is_relative_to(held.resolve()) for p in kept)
    assert copy.resolve() in kept  # without near-duplicate grouping only the test items themselves go
    grouped = _cfg(tmp_path, root, test={"root": str(held), "image_size": 32}, group_near_duplicates=True)
    kept = {Path(i.path).resolve() for i in pretraining_items(grouped, data)}
    assert copy.resolve() not in kept and not any(p.is_relative_to(held.resolve()) for p in kept)


def test_a_disjoint_labelled_pool_is_folded_and_pretraining_keeps_everything(tmp_path: Path) -> None:
    root = write_shapes(tmp_path / "unlabelled", n_per_class=4, seed=1)
    labelled = write_shapes(tmp_path / "labelled", n_per_class=6, seed=2)
    cfg = _cfg(tmp_path, root, train={"root": str(labelled), "image_size": 32})
    data = ScannedData.scan(cfg.data)
    assert pretraining_items(cfg, data) == data.manifest.items
    assert classification_pool(cfg).fixed is None


def test_npz_items_are_identified_by_file_and_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "set.npz"
    images = rng.integers(0, 255, (40, 28, 28), dtype=np.uint8)
    np.savez(path, train_images=images, train_labels=rng.integers(0, 2, (40, 1)))
    raw = tiny_config(path, tmp_path / "runs", probe={"knn_k": 3})
    raw["data"]["options"] = {"split": "train", "channels": 1}
    cfg = load_config(raw)
    data = ScannedData.scan(cfg.data)
    kept = pretraining_items(cfg, data)
    test = probe_test_items(cfg, data)
    assert len(set(item_keys(data.manifest.items))) == 40  # one file, 40 distinct items
    assert 5 < len(test) < 20 and len(kept) == 40 - len(test)
    assert not set(item_keys(kept)) & set(item_keys(test))
