"""Fine-tune a downstream head (and optionally the adapters) on labelled data; save it for ``predict``.

Downstream always reads backbone features (pooled CLS + mean patch token, or intermediate token
maps for segmentation), never an SSL projection head. In ``mode: head`` the backbone and adapters
are frozen, so features are computed once and the head trains on the cache; in ``mode: adapters``
every step runs the adapted backbone and the adapters train with the head.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import DataConfig, DownstreamConfig, RunConfig, dump_config
from insitu.domains import ManifestItem, split_by_group
from insitu.domains.normalize import Normalizer
from insitu.errors import ConfigError, DataError
from insitu.heads import create_head
from insitu.heads.metrics import classification_metrics, multilabel_metrics, segmentation_metrics
from insitu.io import claim_folder, write_json
from insitu.pipelines.data import SampleDataset, ScannedData, collate, fit_normalizer
from insitu.sharing.signing import trust_of

log = logging.getLogger("insitu")
HEAD_FILE, HEAD_META = "head.safetensors", "head.json"


class DownstreamModel(nn.Module):
    """An adapted backbone plus a task head: images in, logits (B×K or B×K×H×W) out."""

    def __init__(self, adapted: AdaptedBackbone, head: nn.Module, task: str, layers: int = 4) -> None:
        super().__init__()
        self.adapted, self.head, self.task, self.layers = adapted, head, task, layers

    def features(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Backbone features the head reads: pooled vectors, or token maps for segmentation."""
        if self.task == "segmentation":
            return self.adapted.forward_intermediates(x, min(self.layers, self.adapted.num_blocks))
        cls, patches, _ = self.adapted.forward_tokens(x)
        return torch.cat([cls, patches.mean(1)], dim=1)

    def head_logits(self, feats: torch.Tensor | list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.head(feats, size) if self.task == "segmentation" else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.features(x), tuple(x.shape[-2:]))


@dataclass
class Labelled:
    """Every labelled item of one split, loaded and normalised into tensors."""

    images: torch.Tensor
    targets: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)


@dataclass
class FinetuneResult:
    name: str
    seed: int
    metrics: dict[str, float]
    trainable_params: int
    n_train: int
    n_test: int
    wall_s: float
    out_dir: Path | None = None
    history: list[float] = field(default_factory=list)


def downstream_of(cfg: RunConfig) -> DownstreamConfig:
    """The run's downstream section (defaults when absent)."""
    return cfg.downstream or DownstreamConfig()


def labelled_splits(cfg: RunConfig) -> tuple[ScannedData, list[ManifestItem], ScannedData, list[ManifestItem]]:
    """(train data, train items, test data, test items): ``probe.train``/``probe.test`` or a group split."""
    train_cfg: DataConfig = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    if cfg.probe.test is not None:
        test = ScannedData.scan(cfg.probe.test)
        return train, train.manifest.items, test, test.manifest.items
    parts = split_by_group(train.manifest.items, {"train": 1 - cfg.probe.test_fraction, "test": cfg.probe.test_fraction}, seed=cfg.seed)
    if not parts["train"] or not parts["test"]:
        raise DataError(f"{train_cfg.root}: too few groups to split into train and test; set probe.train and probe.test.")
    return train, parts["train"], train, parts["test"]


def load_labelled(data: ScannedData, items: list[ManifestItem], norm: Normalizer, size: int, task: str, where: str) -> Labelled:
    """Load, normalise and resize every item; the targets the task needs must be there."""
    batch = collate([SampleDataset(data, items, norm, image_size=size)[i] for i in range(len(items))])
    if not batch["item_id"]:
        raise DataError(f"no item of {where} could be loaded; see the warnings above for each file.")
    key = {"segmentation": "mask", "multilabel": "multilabel"}.get(task, "label")
    targets = batch.get(key)
    if targets is None or (key == "label" and bool((targets < 0).any())):
        hint = {
            "mask": "image/mask pairs (images/ + masks/ folders, label rasters)",
            "multilabel": "multi-label tags (e.g. BigEarthNet metadata)",
            "label": "integer labels for every item (class subfolders or *_labels arrays)",
        }[key]
        raise DataError(f"downstream task '{task}' needs {hint}, but items of {where} have none.")
    return Labelled(batch["image"], targets, list(data.manifest.class_names), batch["item_id"])


def num_classes_of(ds: DownstreamConfig, train: Labelled, test: Labelled) -> int:
    if ds.num_classes:
        return ds.num_classes
    if ds.task == "multilabel":
        return int(train.targets.shape[1])
    values = torch.cat([train.targets.flatten(), test.targets.flatten()])
    values = values[values != ds.ignore_index]
    return max(2, int(values.max()) + 1, len(train.class_names))


def class_weights(ds: DownstreamConfig, targets: torch.Tensor, k: int) -> torch.Tensor | None:
    """``balanced``: N / (K · count_k) over labels (or non-ignored pixels); a list is used as given."""
    if ds.class_weights == "none" or ds.task == "multilabel":
        return None
    if isinstance(ds.class_weights, list):
        if len(ds.class_weights) != k:
            raise ConfigError(f"downstream.class_weights has {len(ds.class_weights)} values but the task has {k} classes.")
        return torch.tensor(ds.class_weights, dtype=torch.float32)
    t = targets.flatten()
    counts = torch.bincount(t[t != ds.ignore_index], minlength=k)[:k].float()
    return counts.sum() / (k * counts.clamp(min=1))


def task_loss(ds: DownstreamConfig, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if ds.task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ds.ignore_index)


def task_metrics(ds: DownstreamConfig, logits: torch.Tensor, target: torch.Tensor, k: int) -> dict[str, float]:
    if ds.task == "segmentation":
        return segmentation_metrics(logits, target, k, ds.ignore_index)
    if ds.task == "multilabel":
        return multilabel_metrics(logits, target)
    return classification_metrics(logits, target, k)


def package_normalizer(adapter: Path | None) -> Normalizer | None:
    """The normaliser stored in an adapter package, so downstream sees the data as pretraining did."""
    if adapter is None:
        return None
    meta = load_package(adapter).meta
    return Normalizer.from_dict(meta.normalizer) if meta.normalizer else None


def build_model(cfg: RunConfig, adapter: Path | None, k: int) -> DownstreamModel:
    """Backbone (+ adapter package) + a fresh head."""
    ds = downstream_of(cfg)
    backbone = create_backbone(cfg.backbone)
    adapted = apply_package(load_package(adapter, trust_of(cfg)), backbone) if adapter is not None else AdaptedBackbone(backbone, None)
    in_dim = backbone.embed_dim * (1 if ds.task == "segmentation" else 2)
    levels = min(ds.layers, backbone.num_blocks)
    head = create_head(ds.task, ds.head, in_dim, k, hidden_dim=ds.hidden_dim, levels=levels, decoder_dim=ds.decoder_dim)
    return DownstreamModel(adapted, head, ds.task, ds.layers)


@torch.no_grad()
def encode(model: DownstreamModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor | list[torch.Tensor]:
    """Frozen features of every image, batched (the cache ``mode: head`` trains on)."""
    model.eval()
    parts = [model.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if isinstance(parts[0], list):
        return [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]
    return torch.cat(parts)


def _take(feats: torch.Tensor | list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    return [f[idx] for f in feats] if isinstance(feats, list) else feats[idx]


def train_head(
    model: DownstreamModel,
    ds: DownstreamConfig,
    train: Labelled,
    weight: torch.Tensor | None,
    seed: int,
    cache: torch.Tensor | list[torch.Tensor] | None = None,
) -> list[float]:
    """Optimise the head (and, in ``mode: adapters``, the adapters) for ``ds.steps`` minibatch steps.

    ``cache``: frozen features of ``train.images`` already computed (reused across seeds).
    """
    gen = torch.Generator().manual_seed(seed)
    train_adapters = ds.mode == "adapters" and model.adapted.adapters is not None
    params = list(model.head.parameters()) + (list(model.adapted.adapters.parameters()) if train_adapters else [])
    for p in model.adapted.adapters.parameters() if model.adapted.adapters is not None else []:
        p.requires_grad_(train_adapters)
    if not train_adapters and cache is None:
        cache = encode(model, train.images)
    cache = None if train_adapters else cache
    opt = torch.optim.AdamW(params, lr=ds.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ds.steps)
    size = tuple(train.images.shape[-2:])
    history = []
    model.train()
    for _ in range(ds.steps):
        idx = torch.randperm(len(train.images), generator=gen)[: ds.batch_size]
        feats = model.features(train.images[idx]) if cache is None else _take(cache, idx)
        loss = task_loss(ds, model.head_logits(feats, size), train.targets[idx], weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: DownstreamModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def trainable_count(model: DownstreamModel, mode: str) -> int:
    """Parameters this run trains: the head, plus the adapters in ``mode: adapters``."""
    n = sum(p.numel() for p in model.head.parameters())
    if mode == "adapters" and model.adapted.adapters is not None:
        n += sum(p.numel() for p in model.adapted.adapters.parameters())
    return n


def prepare(cfg: RunConfig, adapter: Path | None) -> tuple[Normalizer, Labelled, Labelled, int]:
    """Normaliser (the package's, else fitted on train), both labelled splits as tensors, class count."""
    ds = downstream_of(cfg)
    train_data, train_items, test_data, test_items = labelled_splits(cfg)
    size = (cfg.probe.train or cfg.data).image_size
    norm = package_normalizer(adapter) or fit_normalizer(train_data, train_items)
    train = load_labelled(train_data, train_items, norm, size, ds.task, "the downstream train split")
    test = load_labelled(test_data, test_items, norm, size, ds.task, "the downstream test split")
    return norm, train, test, num_classes_of(ds, train, test)


def model_name(adapter: Path | None) -> str:
    return "frozen backbone" if adapter is None else f"+ adapters ({Path(adapter).parent.name or Path(adapter).name})"


def fit_and_score(
    cfg: RunConfig,
    adapter: Path | None,
    train: Labelled,
    test: Labelled,
    k: int,
    seed: int,
    cache: torch.Tensor | list[torch.Tensor] | None = None,
) -> tuple[DownstreamModel, FinetuneResult, torch.Tensor]:
    """Train a fresh head (seeded) and score it on ``test``; returns the model, result and test logits."""
    ds = downstream_of(cfg)
    start = time.time()
    torch.manual_seed(seed)
    model = build_model(cfg, adapter, k)
    history = train_head(model, ds, train, class_weights(ds, train.targets, k), seed, cache)
    logits = predict_logits(model, test.images)
    metrics = task_metrics(ds, logits, test.targets, k)
    result = FinetuneResult(
        model_name(adapter),
        seed,
        metrics,
        trainable_count(model, ds.mode),
        len(train.images),
        len(test.images),
        round(time.time() - start, 2),
        history=history,
    )
    return model, result, logits


def finetune(
    cfg: RunConfig, adapter: Path | None = None, seed: int | None = None, out_dir: Path | None = None, overwrite: bool = False
) -> FinetuneResult:
    """Train the configured head on ``probe.train`` (or a split of ``data``), score it on the test split.

    With ``out_dir`` the head, its metadata and the resolved config are saved there for ``insitu predict``
    (the folder is claimed before training: an earlier model there is replaced only with ``overwrite``).
    """
    folder = claim_folder(Path(out_dir), "finetune", overwrite) if out_dir is not None else None
    seed = cfg.seed if seed is None else seed
    norm, train, test, k = prepare(cfg, adapter)
    model, result, _ = fit_and_score(cfg, adapter, train, test, k, seed)
    if out_dir is not None:
        size = (cfg.probe.train or cfg.data).image_size
        result.out_dir = save_head(model, cfg, adapter, norm, k, train.class_names, size, result, Path(out_dir))
    if folder is not None:
        folder.record()
    return result


def save_head(
    model: DownstreamModel,
    cfg: RunConfig,
    adapter: Path | None,
    norm: Normalizer,
    k: int,
    class_names: list[str],
    size: int,
    result: FinetuneResult,
    out_dir: Path,
) -> Path:
    """Write ``head.safetensors`` (head, plus adapters when they were trained) and ``head.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = downstream_of(cfg)
    tensors = {f"head.{k_}": v.detach().contiguous() for k_, v in model.head.state_dict().items()}
    if model.adapted.adapters is not None:
        tensors |= {f"adapter.{k_}": v.detach().contiguous() for k_, v in model.adapted.adapters.state_dict().items()}
    save_file(tensors, str(out_dir / HEAD_FILE))
    meta = {
        "task": ds.task,
        "num_classes": k,
        "class_names": class_names,
        "image_size": size,
        "in_chans": cfg.backbone.in_chans,
        "adapter_package": package_ref(Path(adapter), out_dir) if adapter is not None else None,
        "normalizer": norm.to_dict(),
        "metrics": result.metrics,
        "trainable_params": result.trainable_params,
        "domain": (cfg.probe.train or cfg.data).domain,
        "domain_options": (cfg.probe.train or cfg.data).options,
    }
    write_json(out_dir / HEAD_META, meta)
    dump_config(cfg, out_dir / "config.yaml")
    return out_dir


def load_head(model_dir: Path) -> tuple[DownstreamModel, dict[str, Any], Normalizer]:
    """Rebuild a saved downstream model (backbone from its config, adapters and head from safetensors)."""
    from insitu.config import load_config

    model_dir = Path(model_dir)
    if not (model_dir / HEAD_META).is_file():
        raise ConfigError(f"{model_dir} holds no {HEAD_META}; pass the folder `insitu finetune --out` wrote.")
    meta = json.loads((model_dir / HEAD_META).read_text())
    cfg = load_config(model_dir / "config.yaml", check_paths=False)
    adapter = resolve_package_ref(model_dir, meta["adapter_package"])
    model = build_model(cfg, adapter, meta["num_classes"])
    tensors = load_file(str(model_dir / HEAD_FILE))
    model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    if model.adapted.adapters is not None:
        model.adapted.adapters.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
    return model.eval(), meta, Normalizer.from_dict(meta["normalizer"])


def package_ref(adapter: Path, head_dir: Path) -> dict[str, Any]:
    """How a head folder names its adapter package: a path relative to the head folder (never an
    absolute one: head folders are shared) and the package's content hash."""
    rel = os.path.relpath(Path(adapter).resolve(), Path(head_dir).resolve())
    return {"path": Path(rel).as_posix(), "content_sha256": load_package(adapter).meta.content_sha256}


def resolve_package_ref(head_dir: Path, ref: str | dict[str, Any] | None) -> Path | None:
    """The adapter package a head folder was trained with; a typed error when it moved or changed.

    Head folders written before the relative form stored an absolute path (a plain string).
    """
    if not ref:
        return None
    path = Path(ref) if isinstance(ref, str) else (Path(head_dir) / ref["path"]).resolve()
    where = ref if isinstance(ref, str) else f"{ref['path']} (relative to the head folder)"
    if not path.exists():
        raise ConfigError(
            f"{head_dir}/{HEAD_META} was trained with the adapter package at {where}, which is not there. "
            "Keep the head folder and its adapter package where they were relative to each other (copy both together)."
        )
    expected = None if isinstance(ref, str) else ref.get("content_sha256")
    found = load_package(path).meta.content_sha256
    if expected and found != expected:
        raise ConfigError(
            f"{head_dir}/{HEAD_META} was trained with an adapter package of content hash {expected[:12]}…, "
            f"but {path} holds {str(found)[:12]}…: this head only fits the package it was trained with."
        )
    return path


def summarize(results: list[FinetuneResult]) -> dict[str, tuple[float, float]]:
    """Mean and std over seeds of every metric."""
    keys = results[0].metrics.keys()
    return {k: (float(np.nanmean([r.metrics[k] for r in results])), float(np.nanstd([r.metrics[k] for r in results]))) for k in keys}
