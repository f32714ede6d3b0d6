"""Probe frozen features: the untouched backbone versus backbone + adapter packages, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import DataConfig, RunConfig
from insitu.domains import split_by_group
from insitu.domains.normalize import Normalizer
from insitu.errors import DataError
from insitu.heads import knn_accuracy, linear_probe_accuracy
from insitu.pipelines.data import SampleDataset, ScannedData, collate, fit_normalizer


@dataclass
class ProbeRow:
    name: str
    linear_acc: float
    knn_acc: float
    trainable_params: int
    n_train: int
    n_test: int


@torch.no_grad()
def extract_features(
    model: AdaptedBackbone, dataset: SampleDataset, batch_size: int = 64, features: str = "cls+mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (never an SSL projection head) and labels for every item of ``dataset``."""
    model.eval()
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if not batch["item_id"]:
            continue
        cls, patches, _ = model.forward_tokens(batch["image"])
        parts = {"cls": [cls], "mean": [patches.mean(1)], "cls+mean": [cls, patches.mean(1)]}[features]
        xs.append(torch.cat(parts, dim=1).float().numpy())
        ys.append(batch["label"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


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
        labels = {i.label for i in items}
        if None in labels or len(labels) < 2:
            raise DataError(
                f"probe {name} set under {train_cfg.root} needs labels of at least 2 classes "
                "(class subfolders, or *_labels arrays in an .npz); set probe.train/probe.test."
            )
    return train, train_items, test, test_items


def run_probe(cfg: RunConfig, adapter_paths: list[Path] | None = None) -> list[ProbeRow]:
    """Linear-probe and kNN accuracy for the frozen backbone and for each adapter package."""
    L.seed_everything(cfg.seed, verbose=False)
    backbone = create_backbone(cfg.backbone)
    train, train_items, test, test_items = probe_splits(cfg)
    packages = [load_package(p) for p in adapter_paths or []]
    models: list[tuple[str, AdaptedBackbone, Normalizer]] = []
    base_norm = (
        Normalizer.from_dict(packages[0].meta.normalizer)
        if packages and packages[0].meta.normalizer
        else fit_normalizer(train, train_items)
    )
    models.append(("frozen backbone", AdaptedBackbone(backbone, None), base_norm))
    for path, pkg in zip(adapter_paths or [], packages, strict=False):
        norm = Normalizer.from_dict(pkg.meta.normalizer) if pkg.meta.normalizer else base_norm
        models.append((f"+ adapters ({Path(path).parent.name or Path(path).name})", apply_package(pkg, backbone), norm))
    size = (cfg.probe.train or cfg.data).image_size
    rows = []
    for name, model, norm in models:
        x_tr, y_tr = extract_features(
            model, SampleDataset(train, train_items, norm, image_size=size), cfg.probe.batch_size, cfg.probe.features
        )
        x_te, y_te = extract_features(
            model, SampleDataset(test, test_items, norm, image_size=size), cfg.probe.batch_size, cfg.probe.features
        )
        trainable = sum(p.numel() for p in model.adapters.parameters()) if model.adapters is not None else 0
        rows.append(
            ProbeRow(
                name,
                linear_probe_accuracy(x_tr, y_tr, x_te, y_te),
                knn_accuracy(x_tr, y_tr, x_te, y_te, cfg.probe.knn_k),
                trainable,
                len(y_tr),
                len(y_te),
            )
        )
    return rows
