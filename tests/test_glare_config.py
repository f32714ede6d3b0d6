"""The shipped GLARE config runs at tiny size; the seeded stratified BUSI split is stable and leak-free."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insitu.config import load_config
from insitu.domains.near_duplicates import split_class_folders as busi_split
from insitu.domains.near_duplicates import stratified_split, thumbnail_hash
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe
from tests.conftest import REPO, TINY_PNEUMONIA, TINY_RUN, shared

TINY = [
    *TINY_RUN,
    "objective.options.dense_out_dim=32",
    *TINY_PNEUMONIA,
]


def test_pneumoniamnist_glare_config_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shared("medical", "pneumoniamnist")
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "medical" / "pneumoniamnist_glare.yaml", [*TINY, f"out_dir={tmp_path}"])
    assert cfg.objective.name == "glare" and cfg.objective.options["regional"]["enabled"]
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and result.final_loss is not None
    rows = run_probe(cfg, [result.adapter_dir])
    assert len(rows) == 3 and all(r.n_test == 20 for r in rows)  # frozen, adapted, frozen + PCA whitening


def digests(paths: list[str]) -> dict[str, str]:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def test_busi_split_is_seeded_stratified_and_leak_free():
    root = shared("medical", "busi")
    manifest, train, test = busi_split(root, test_fraction=0.3, seed=0)
    again = busi_split(root, test_fraction=0.3, seed=0)
    assert [i.item_id for i in train] == [i.item_id for i in again[1]]
    assert {i.group for i in train}.isdisjoint({i.group for i in test})
    assert len(train) + len(test) <= len(manifest.items) == 622
    per_class, test_per_class = Counter(i.label for i in manifest.items), Counter(i.label for i in test)
    for label, n in per_class.items():
        assert abs(test_per_class[label] / n - 0.3) < 0.05, manifest.class_names[label]
    other = busi_split(root, test_fraction=0.3, seed=1)[2]
    assert {i.item_id for i in other} != {i.item_id for i in test}


def test_near_duplicates_share_a_side(tmp_path: Path):
    rng = np.random.default_rng(0)
    root = tmp_path / "set"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / label / f"{i}.png")
    original = np.asarray(Image.open(root / "a" / "0.png"))
    resaved = np.clip(original.astype(int) + 1, 0, 255).astype(np.uint8)  # a near-duplicate
    Image.fromarray(resaved).save(root / "a" / "dup.png")
    paths = [str(p) for p in sorted(root.rglob("*.png"))]
    before = digests(paths)
    assert thumbnail_hash(root / "a" / "0.png") == thumbnail_hash(root / "a" / "dup.png")
    from insitu.domains import create_domain

    items = create_domain("images", {"channels": 1, "labels": "folders"}).scan(root).items
    for seed in range(5):
        train, test = stratified_split(items, 0.3, seed)
        sides = {Path(i.path).name: "train" for i in train if "/a/" in i.path} | {
            Path(i.path).name: "test" for i in test if "/a/" in i.path
        }
        assert sides["0.png"] == sides["dup.png"]
    assert digests(paths) == before  # the source files are only read
