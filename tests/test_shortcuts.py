"""The shortcut check (trivial statistics of the raw files vs chance) and the images domain's ``aspect`` option."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.config import ProbeConfig, load_config
from insitu.domains import IGNORE_INDEX, create_domain
from insitu.pipelines.data import resize_square
from insitu.pipelines.probe import run_probe
from insitu.pipelines.probe_plan import evaluation_plan
from insitu.pipelines.probe_shortcuts import TRIVIAL, shortcut_check, trivial_statistics
from tests.conftest import shared, tiny_config

SIZES = ((64, 36), (64, 48))  # (width, height)


def _noise(rng: np.random.Generator, width: int, height: int, ramps: bool) -> np.ndarray:
    """Uniform grey noise; ``ramps`` sorts each row, a different texture from the very same pixel values."""
    arr = rng.integers(0, 256, (height, width), dtype=np.uint8)
    return np.sort(arr, axis=1) if ramps else arr


def write_set(root: Path, shortcut: bool, n: int = 20, seed: int = 0) -> Path:
    """Two class folders of grey PNGs. shortcut: class a is 64×36 and class b 64×48, same noise; else both
    classes use both sizes equally and differ only in texture (noise vs row-sorted noise: the same grey levels)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            width, height = SIZES[label] if shortcut else SIZES[i % 2]
            arr = _noise(rng, width, height, ramps=not shortcut and label == 1)
            Image.fromarray(arr).save(root / name / f"{name}_{i}.png")
    return root


def check_of(root: Path, **options) -> object:
    domain = create_domain("images", {"channels": 1, **options})
    items = domain.scan(root).items
    labels = np.array([i.label for i in items])
    groups = np.array([i.group for i in items])
    plan = evaluation_plan(labels, groups, ProbeConfig(folds=5, label_fractions=[1.0]), seed=0)
    return shortcut_check(trivial_statistics(items), labels, plan, groups, n_boot=500)


def test_an_aspect_ratio_shortcut_is_flagged(tmp_path):
    check = check_of(write_set(tmp_path / "s", shortcut=True))
    assert check.above_chance and check.accuracy > 0.95 and check.chance == pytest.approx(0.5)
    assert check.strongest in ("height", "aspect (w/h)") and check.strongest_accuracy > 0.95
    assert check.evaluations == 5 and check.n_test == 40


def test_classes_that_differ_in_texture_only_are_not_flagged(tmp_path):
    check = check_of(write_set(tmp_path / "t", shortcut=False))
    assert not check.above_chance, check
    assert check.accuracy < 0.75


def test_statistics_come_from_the_raw_file_not_the_cropped_image(tmp_path):
    root = write_set(tmp_path / "s", shortcut=True, n=2)
    items = create_domain("images", {"channels": 1, "aspect": "crop"}).scan(root).items
    stats = trivial_statistics(items)
    assert stats.shape == (4, 5)
    np.testing.assert_allclose(stats[:, :2], [[36, 64], [36, 64], [48, 64], [48, 64]])  # height, width of the files
    np.testing.assert_allclose(stats[:, 2], stats[:, 1] / stats[:, 0])


def test_crop_makes_every_image_square_before_the_resize_with_no_border(tmp_path):
    root = write_set(tmp_path / "s", shortcut=True, n=1)
    domain = create_domain("images", {"channels": 1, "aspect": "crop"})
    manifest = domain.scan(root)
    shapes, resized = [], []
    for item in manifest.items:
        image = domain.load(item, manifest)["image"]
        raw = torch.from_numpy(np.asarray(Image.open(item.path), dtype=np.float32) / 255.0)
        h, w = raw.shape
        s = min(h, w)
        # the centred square of the file itself: no fill, no border, nothing resampled
        torch.testing.assert_close(image[0], raw[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])
        shapes.append(tuple(image.shape))
        resized.append(resize_square(image, 32).shape)
    assert shapes == [(1, 36, 36), (1, 48, 48)]
    assert resized[0] == resized[1] == (1, 32, 32)
    keep = create_domain("images", {"channels": 1})
    assert tuple(keep.load(manifest.items[0], manifest)["image"].shape) == (1, 36, 64)  # the default is unchanged


def test_pad_fills_with_the_image_mean_not_zeros(tmp_path):
    root = write_set(tmp_path / "s", shortcut=True, n=1)
    domain = create_domain("images", {"channels": 3, "aspect": "pad"})
    manifest = domain.scan(root)
    image = domain.load(manifest.items[0], manifest)["image"]  # 64×36 → 64×64, 14 rows above, 14 below
    assert tuple(image.shape) == (3, 64, 64)
    content = image[:, 14:50]
    torch.testing.assert_close(image[:, :14], content.mean((1, 2), keepdim=True).expand(3, 14, 64))
    assert image[:, :14].min() > 0.3


def _write_masked(root: Path, masks: Path) -> None:
    """A 64×36 image whose mask marks exactly its bright pixels, so a misaligned crop shows."""
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, (36, 64), dtype=np.uint8) * 255
    for folder in (root / "c", masks / "c"):
        folder.mkdir(parents=True)
    Image.fromarray(bits).save(root / "c" / "x.png")
    Image.fromarray(bits).save(masks / "c" / "x.png")


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_masks_follow_the_crop_and_the_pad(tmp_path, aspect):
    _write_masked(tmp_path / "img", tmp_path / "masks")
    domain = create_domain("images", {"channels": 1, "masks": str(tmp_path / "masks"), "aspect": aspect})
    manifest = domain.scan(tmp_path / "img")
    sample = domain.load(manifest.items[0], manifest)
    image, mask = sample["image"][0], sample["mask"]
    assert mask.shape == image.shape
    if aspect == "crop":
        assert image.shape == (36, 36)
        torch.testing.assert_close(mask, (image > 0.5).long())
    else:
        assert image.shape == (64, 64)
        assert (mask[:14] == IGNORE_INDEX).all() and (mask[50:] == IGNORE_INDEX).all()
        torch.testing.assert_close(mask[14:50], (image[14:50] > 0.5).long())


def test_run_probe_adds_the_trivial_row_only_for_a_shortcut(tmp_path, caplog):
    root = write_set(tmp_path / "s", shortcut=True, n=12)
    # transductive: 3 folds over all 24 items (an inductive hold-out tests too few per class for a CI)
    probe = {"knn_k": 3, "folds": 3, "label_fractions": [1.0], "bootstrap": 200, "transductive": True}
    raw = tiny_config(root, tmp_path / "runs", data={"options": {"channels": 3}}, probe=probe)
    with caplog.at_level(logging.WARNING, logger="insitu"):
        rows = run_probe(load_config(raw))
    trivial = [r for r in rows if r.name == TRIVIAL]
    assert len(trivial) == 1 and trivial[0].linear_acc > 0.9
    result, knn = trivial[0].results  # the check's logistic regression, and kNN beside the models' kNN rows
    assert (result.probe, knn.probe) == ("linear", "knn") and knn.verdict == "" and 0.0 <= knn.mean <= 1.0
    assert result.verdict.startswith("shortcut: above chance") and result.evaluations == rows[0].evaluations == 3  # the models' folds
    assert any("Shortcut:" in r.message and "aspect" in r.message for r in caplog.records)
    off = run_probe(load_config({**raw, "probe": {**probe, "shortcut_check": False}}))
    assert TRIVIAL not in [r.name for r in off] and off[0].name == "frozen backbone"


def test_polypgen_centre_b_frame_size_gives_the_class_away():
    root = shared("endoscopy", "polypgen", "centre_B")
    domain = create_domain("images", {"channels": 3, "labels": "folders", "group_pattern": r"^(seq\d+)_"})
    items = domain.scan(root).items
    labels = np.array([i.label for i in items])
    groups = np.array([i.group for i in items])
    plan = evaluation_plan(labels, groups, ProbeConfig(folds=5, label_fractions=[1.0]), seed=0)
    check = shortcut_check(trivial_statistics(items), labels, plan, groups, n_boot=500)
    assert check.above_chance and check.accuracy > 0.9, check
