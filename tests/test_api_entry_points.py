"""The script entry points for several adapter packages on one backbone and for the near-duplicate-aware split."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.adapters import create_adapters
from insitu.adapters.package import save_package
from insitu.api import load_adapters, split_class_folders
from insitu.backbones import create_backbone
from insitu.errors import AdapterMismatchError, ConfigError
from tests.conftest import TINY_BACKBONE


def _package(bb, path: Path, seed: int):
    torch.manual_seed(seed)
    adapters = create_adapters(bb, {"bottleneck_dim": 8})
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return adapters, save_package(path, bb, adapters)


def test_load_adapters_switches_packages_by_name(tmp_path: Path) -> None:
    bb = create_backbone(TINY_BACKBONE)
    x = torch.randn(1, 3, 32, 32)
    a, path_a = _package(bb, tmp_path / "site_a", 1)
    b, path_b = _package(bb, tmp_path / "site_b", 2)
    multi = load_adapters([path_a, path_b], bb)
    assert multi.active == "site_a"
    assert torch.equal(multi.use("site_b").forward_tokens(x)[0], bb.forward_tokens(x, b)[0])
    assert torch.equal(multi.use("site_a").forward_tokens(x)[0], bb.forward_tokens(x, a)[0])
    assert torch.equal(multi.use(None).forward_tokens(x)[0], bb.forward_tokens(x)[0])
    assert list(load_adapters({"ct": path_b}, bb).sets) == ["ct"]
    with pytest.raises(ConfigError, match="share a name"):
        load_adapters([path_a, tmp_path / "other" / "site_a"], bb)
    other = create_backbone({**TINY_BACKBONE, "in_chans": 1})
    with pytest.raises(AdapterMismatchError):
        load_adapters([path_a], other)


def test_split_class_folders_keeps_near_duplicates_together(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (tmp_path / label).mkdir()
        for i in range(12):
            img = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / label / f"{i}.png")
            Image.fromarray(img).save(tmp_path / label / f"{i}_copy.png")  # a resaved near-duplicate
    manifest, train, test = split_class_folders(tmp_path, test_fraction=0.25, seed=0)
    assert len(manifest.items) == 48 and train and test
    assert {i.group for i in train}.isdisjoint({i.group for i in test})
    originals = [{(Path(i.path).parent.name, Path(i.path).stem.removesuffix("_copy")) for i in side} for side in (train, test)]
    assert originals[0].isdisjoint(originals[1])  # an image and its copy are on the same side
    assert [i.item_id for i in test] == [i.item_id for i in split_class_folders(tmp_path, 0.25, 0)[2]]
