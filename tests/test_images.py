import numpy as np
import pytest
import torch
from PIL import Image

from insitu.domains import Manifest, ManifestItem, create_domain, split_by_group
from insitu.domains.normalize import Normalizer
from insitu.errors import DataError, EmptyDatasetError
from tests.conftest import shared


def test_folder_scan_labels_and_quarantine(shapes_dir):
    (shapes_dir / "circle" / "random.png").write_bytes(np.random.default_rng(0).bytes(300))
    good = shapes_dir / "square" / "square_0.png"
    (shapes_dir / "square" / "truncated.png").write_bytes(good.read_bytes()[:200])
    (shapes_dir / "notes.txt").write_text("not an image")
    before = good.read_bytes()
    manifest = create_domain("images").scan(shapes_dir)
    assert manifest.class_names == ["circle", "cross", "square", "triangle"]
    assert len(manifest.items) == 24
    assert {q.path.split("/")[-1] for q in manifest.quarantine} == {"random.png", "truncated.png"}
    assert all(q.reason == "cannot decode image" and q.message for q in manifest.quarantine)
    assert good.read_bytes() == before  # source data untouched
    sample = create_domain("images").load(manifest.items[0], manifest)
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert sample["label"] == manifest.items[0].label


def test_manifest_write_and_read(tmp_path, shapes_dir):
    manifest = create_domain("images").scan(shapes_dir)
    manifest.write(tmp_path / "m")
    again = Manifest.read(tmp_path / "m")
    assert [i.item_id for i in again.items] == [i.item_id for i in manifest.items]
    assert (tmp_path / "m" / "quarantine.csv").read_text().startswith("path,reason,message")


def test_grey_channel_option(shapes_dir):
    domain = create_domain("images", {"channels": 1})
    manifest = domain.scan(shapes_dir)
    assert domain.load(manifest.items[0], manifest)["image"].shape == (1, 32, 32)
    # grey is the ITU-R 601 luma of the colour pixels, and each item is its own file
    for item in manifest.items[:3]:
        grey = domain.load(item, manifest)["image"][0].numpy()
        rgb = np.asarray(Image.open(item.path).convert("RGB"), np.float32) / 255.0
        assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 0.1  # coloured, so channel mix-ups would show
        assert np.abs(grey - rgb @ np.array([0.299, 0.587, 0.114], np.float32)).max() <= 1 / 255 + 1e-6


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match=r"No usable image under .*empty"):
        create_domain("images").scan(tmp_path / "empty")


def test_only_corrupt_files_is_an_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(EmptyDatasetError, match=r"1 quarantined"):
        create_domain("images").scan(tmp_path / "bad")


def test_npz_splits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mini.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (10, 1)),
        val_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        val_labels=rng.integers(0, 2, (4, 1)),
    )
    domain = create_domain("images", {"split": "val", "channels": 1})
    manifest = domain.scan(path)
    assert len(manifest.items) == 4
    sample = domain.load(manifest.items[2], manifest)
    assert sample["image"].shape == (1, 28, 28)
    with pytest.raises(DataError, match=r"no 'test_images' array; data.options.split must be one of \['train', 'val'\]"):
        create_domain("images", {"split": "test"}).scan(path)


def test_real_pneumoniamnist():
    path = shared("medical", "pneumoniamnist", "pneumoniamnist_balanced_trainval.npz")
    manifest = create_domain("images", {"split": "val", "channels": 1}).scan(path)
    assert len(manifest.items) == 270
    assert {i.label for i in manifest.items} == {0, 1}


def test_real_busi_with_spaces_in_names():
    root = shared("medical", "busi")
    manifest = create_domain("images", {"channels": 1}).scan(root, max_items=30)
    assert manifest.class_names == ["benign", "malignant", "normal"]
    assert len(manifest.items) == 30 and not manifest.quarantine


def test_split_by_group_never_mixes_groups():
    items = [ManifestItem(f"i{n}", f"p{n}", f"patient{n % 7}") for n in range(70)]
    parts = split_by_group(items, {"train": 0.7, "val": 0.3}, seed=3)
    groups = {k: {i.group for i in v} for k, v in parts.items()}
    assert not groups["train"] & groups["val"]
    assert sum(len(v) for v in parts.values()) == 70
    assert split_by_group(list(reversed(items)), {"train": 0.7, "val": 0.3}, seed=3)["val"][0].group in groups["val"]
    assert 14 <= len(parts["val"]) <= 30


def test_normalizer_fit_ignores_nan_and_round_trips():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(2, 16, 16, generator=g) * torch.tensor([1.0, 10.0]).view(2, 1, 1) for _ in range(4)]
    imgs[0][0, 0, 0] = float("nan")
    norm = Normalizer.fit(imgs)
    assert all(np.isfinite(norm.mean)) and norm.std[1] > norm.std[0] * 5
    out = Normalizer.from_dict(norm.to_dict())(imgs[1])
    assert abs(float(out[1].mean())) < 0.5


def test_group_pattern(tmp_path):
    for name in ("case01_a.png", "case01_b.png", "case02_a.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    manifest = create_domain("images", {"group_pattern": r"(case\d+)_"}).scan(tmp_path)
    groups = [i.group for i in manifest.items]
    assert groups[0] == groups[1] != groups[2]
