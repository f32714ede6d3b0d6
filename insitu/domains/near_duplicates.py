"""Near-duplicate-aware grouping and a seeded, stratified train/test split of a class-folder image set.

Sets such as BUSI (breast ultrasound, class subfolders benign/malignant/normal) ship no split and no
patient ids, and near-duplicate images remain in them. Items are grouped by a perceptual hash (a
16×16 grey thumbnail thresholded at its mean), so near-identical images land on the same side; the
split is then drawn per class with `split_by_group`, so each class keeps its share on both sides.
The same seed always gives the same split: on BUSI it is the split our measurements use. The probe
uses the same hash for ``probe.group_near_duplicates``; :func:`insitu.api.split_class_folders`
offers the split to scripts.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from insitu.domains import ManifestItem, create_domain, split_by_group, stable_id
from insitu.domains.base import Manifest


def thumbnail_hash(path: str | Path, size: int = 16) -> str:
    """Average hash: near-duplicates (resaved, lightly annotated) share it; different images rarely do."""
    stat = os.stat(path)
    return _thumbnail_hash(str(path), stat.st_mtime_ns, stat.st_size, size)


@lru_cache(maxsize=65536)
def _thumbnail_hash(path: str, mtime_ns: int, nbytes: int, size: int) -> str:
    # keyed on mtime and size too, so a changed file is hashed again
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    bits = (grey > grey.mean()).flatten()
    return stable_id(np.packbits(bits).tobytes().hex())


def stratified_split(items: list[ManifestItem], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[ManifestItem], list[ManifestItem]]:
    """(train, test): per class, whole hash groups go to one side, near ``test_fraction`` of each class."""
    grouped = [replace(i, group=thumbnail_hash(i.path)) for i in items]
    train: list[ManifestItem] = []
    test: list[ManifestItem] = []
    for label in sorted({i.label for i in grouped}, key=str):
        parts = split_by_group([i for i in grouped if i.label == label], {"train": 1 - test_fraction, "test": test_fraction}, seed)
        train += [replace(i, split="train") for i in parts["train"]]
        test += [replace(i, split="test") for i in parts["test"]]
    # a hash group filed under two classes must not straddle the split: keep it in train only
    train_groups = {i.group for i in train}
    return train, [i for i in test if i.group not in train_groups]


def split_class_folders(
    root: str | Path, test_fraction: float = 0.3, seed: int = 0, channels: int = 1
) -> tuple[Manifest, list[ManifestItem], list[ManifestItem]]:
    """Scan class folders of images (``channels`` per image) and split them; returns (manifest, train, test)."""
    manifest = create_domain("images", {"channels": channels, "labels": "folders"}).scan(Path(root))
    train, test = stratified_split(manifest.items, test_fraction, seed)
    return manifest, train, test
