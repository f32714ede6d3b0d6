"""The labelled splits of a downstream run: scanned, split by group, loaded through the preprocessing contract.

A split's images stay in memory when they fit in ``IN_MEMORY_MB`` (preprocessed float32 at the
model size; small sets train fastest that way); larger splits are `LazyImages`, read from disk per
batch, so memory is bounded by a batch whatever the data's size. The targets (labels, multi-hot
tags, masks) are always held: they are small and the class count and class weights need them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from insitu.config import DataConfig, RunConfig
from insitu.domains import ManifestItem, split_by_group
from insitu.domains.near_duplicates import stratified_split
from insitu.errors import DataError
from insitu.pipelines.data import SampleDataset, ScannedData
from insitu.pipelines.preprocess import Preprocessing

IN_MEMORY_MB = 2048


class LazyImages:
    """The preprocessed images of one split, read from disk on access: ``len``, ``[i]`` and ``[a:b]`` like a tensor."""

    def __init__(self, dataset: SampleDataset, index: list[int]) -> None:
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        if isinstance(key, slice):
            return torch.stack([self.one(i) for i in range(*key.indices(len(self)))])
        if torch.is_tensor(key) and key.ndim == 1:
            return torch.stack([self.one(int(i)) for i in key])
        return self.one(int(key))

    def one(self, i: int) -> torch.Tensor:
        sample = self.dataset[self.index[i]]
        if sample is None:
            item = self.dataset.items[self.index[i]]
            raise DataError(f"{item.item_id} ({item.path}) loaded when the split was prepared but fails now; was it changed or removed?")
        return sample["image"]


@dataclass
class Labelled:
    """Every labelled item of one split: its model inputs (in memory, or `LazyImages`) and targets."""

    images: torch.Tensor | LazyImages
    targets: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)


def labelled_splits(cfg: RunConfig) -> tuple[ScannedData, list[ManifestItem], ScannedData, list[ManifestItem]]:
    """(train data, train items, test data, test items): ``probe.train``/``probe.test``, or a split of one side
    by group (``probe.group_near_duplicates``: stratified per class, near-duplicates grouped by hash)."""
    train_cfg: DataConfig = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    if cfg.probe.test is not None:
        test = ScannedData.scan(cfg.probe.test)
        return train, train.manifest.items, test, test.manifest.items
    if cfg.probe.group_near_duplicates:  # per class, near-duplicate images never straddle the split
        train_items, test_items = stratified_split(train.manifest.items, cfg.probe.test_fraction, cfg.seed)
        return train, train_items, train, test_items
    parts = split_by_group(train.manifest.items, {"train": 1 - cfg.probe.test_fraction, "test": cfg.probe.test_fraction}, seed=cfg.seed)
    if not parts["train"] or not parts["test"]:
        raise DataError(f"{train_cfg.root}: too few groups to split into train and test; set probe.train and probe.test.")
    return train, parts["train"], train, parts["test"]


def load_labelled(
    data: ScannedData, items: list[ManifestItem], prep: Preprocessing, task: str, where: str, in_memory_mb: float | None = None
) -> Labelled:
    """Read every item once through the preprocessing contract: the targets are kept, the images too when
    they fit in ``in_memory_mb`` (else `LazyImages`). Items that fail to load are skipped (warned by name)."""
    dataset = prep.dataset(data, items)
    budget = IN_MEMORY_MB if in_memory_mb is None else in_memory_mb
    keep_images = len(items) * prep.in_chans * prep.image_size**2 * 4 <= budget * 2**20
    key = {"segmentation": "mask", "multilabel": "multilabel"}.get(task, "label")
    loaded, images, targets, ids = [], [], [], []
    for i in range(len(items)):
        sample = dataset[i]
        if sample is None:
            continue
        target = sample.get(key)
        if target is None or (key == "label" and int(target) < 0):
            targets = None
            break
        loaded.append(i)
        ids.append(sample["item_id"])
        targets.append(torch.as_tensor(target))
        if keep_images:
            images.append(sample["image"])
    if targets is not None and not loaded:
        raise DataError(f"no item of {where} could be loaded; see the warnings above for each file.")
    if targets is None:
        hint = {
            "mask": "image/mask pairs (images/ + masks/ folders, label rasters)",
            "multilabel": "multi-label tags (e.g. BigEarthNet metadata)",
            "label": "integer labels for every item (class subfolders or *_labels arrays)",
        }[key]
        raise DataError(f"downstream task '{task}' needs {hint}, but items of {where} have none.")
    stacked = torch.stack(images) if keep_images else LazyImages(dataset, loaded)
    return Labelled(stacked, torch.stack(targets), list(data.manifest.class_names), ids)
