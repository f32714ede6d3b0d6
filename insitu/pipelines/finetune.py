"""Fine-tune a downstream head (and optionally the adapters) on labelled data; save it for ``predict``.

Downstream always reads backbone features (pooled CLS + mean patch token, or intermediate token
maps for segmentation), never an SSL projection head. In ``mode: head`` the backbone and adapters
are frozen, so features are computed once and the head trains on the cache (unless an augmentation
preset is set); in ``mode: adapters`` every step runs the adapted backbone and the adapters train
with the head. Training runs on Lightning (`insitu.pipelines.downstream`); the head folder that
``predict`` reads is written by `insitu.pipelines.head_folder`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything

from insitu.adapters.package import load_package
from insitu.backbones import ViTBackbone
from insitu.config import DownstreamConfig, RunConfig
from insitu.domains import ManifestItem, split_by_group
from insitu.errors import ConfigError
from insitu.heads.metrics import classification_metrics, multilabel_metrics, segmentation_metrics
from insitu.io import claim_folder, is_secondary_rank
from insitu.pipelines.downstream import DownstreamTask, Features, LabelledData, LabelledItems, downstream_trainer
from insitu.pipelines.downstream_model import DownstreamModel, FinetuneResult, build_model, downstream_of
from insitu.pipelines.head_folder import save_head
from insitu.pipelines.labelled import Labelled, labelled_splits, load_labelled
from insitu.pipelines.preprocess import Preprocessing, resolve_preprocessing
from insitu.sharing.signing import trust_of

log = logging.getLogger("insitu")


def num_classes_of(ds: DownstreamConfig, train: Labelled, test: Labelled) -> int:
    if ds.num_classes:
        return ds.num_classes
    if ds.task == "multilabel":
        return int(train.targets.shape[1])
    values = torch.cat([train.targets.flatten(), test.targets.flatten()])
    values = values[values != ds.ignore_index]
    if ds.task == "segmentation":  # classes are the mask values; folder names label the images, not the pixels
        return max(2, int(values.max()) + 1)
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


def task_metrics(ds: DownstreamConfig, logits: torch.Tensor, target: torch.Tensor, k: int) -> dict[str, float]:
    if ds.task == "segmentation":
        return segmentation_metrics(logits, target, k, ds.ignore_index)
    if ds.task == "multilabel":
        return multilabel_metrics(logits, target)
    return classification_metrics(logits, target, k)


@torch.no_grad()
def encode(model: DownstreamModel, images: torch.Tensor, batch_size: int = 64) -> Features:
    """Frozen features of every image, batched (the cache ``mode: head`` trains on)."""
    model.eval()
    parts = [model.features(images[i : i + batch_size].to(_device(model))) for i in range(0, len(images), batch_size)]
    if isinstance(parts[0], list):
        return [torch.cat([p[level].cpu() for p in parts]) for level in range(len(parts[0]))]
    return torch.cat([p.cpu() for p in parts])


@torch.no_grad()
def predict_logits(model: DownstreamModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size].to(_device(model))).float().cpu() for i in range(0, len(images), batch_size)])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def trainable_count(model: DownstreamModel, mode: str) -> int:
    """Parameters this run trains: the head, plus the adapters in ``mode: adapters``."""
    n = sum(p.numel() for p in model.head.parameters())
    if mode == "adapters" and model.adapted.adapters is not None:
        n += sum(p.numel() for p in model.adapted.adapters.parameters())
    return n


@dataclass
class Prepared:
    """A downstream run's data: its preprocessing contract, labelled train / validation / test splits, class count."""

    prep: Preprocessing
    train: Labelled
    val: Labelled | None
    test: Labelled
    k: int


def prepare(cfg: RunConfig, adapter: Path | None) -> Prepared:
    """The preprocessing contract (the package's, else the backbone's with a normaliser fitted on train;
    `insitu.pipelines.preprocess`), the labelled splits as tensors, class count.

    ``downstream.val_fraction`` of the training groups become the validation split (none when the
    training split has too few groups; a warning says so).
    """
    ds = downstream_of(cfg)
    train_data, train_items, test_data, test_items = labelled_splits(cfg)
    val_items: list[ManifestItem] = []
    if ds.val_fraction > 0:
        parts = split_by_group(train_items, {"train": 1 - ds.val_fraction, "val": ds.val_fraction}, seed=cfg.seed)
        if parts["train"] and parts["val"]:
            train_items, val_items = parts["train"], parts["val"]
        else:
            log.warning("downstream: too few training groups for a validation split; training without validation")
    size = (cfg.probe.train or cfg.data).image_size
    package = load_package(adapter, trust_of(cfg)) if adapter is not None else None
    prep = resolve_preprocessing(package, train_data, train_items, size, cfg.backbone)
    if test_data is not train_data:  # the test side must match the contract too (channels, bands)
        resolve_preprocessing(prep, test_data, test_items, prep.image_size, cfg.backbone)
    train = load_labelled(train_data, train_items, prep, ds.task, "the downstream train split")
    val = load_labelled(train_data, val_items, prep, ds.task, "the downstream validation split") if val_items else None
    test = load_labelled(test_data, test_items, prep, ds.task, "the downstream test split")
    return Prepared(prep, train, val, test, num_classes_of(ds, train, test))


def model_name(adapter: Path | None, mode: str = "head") -> str:
    if adapter is None:
        return "fresh adapters + head" if mode == "adapters" else "frozen backbone"
    return f"+ adapters ({Path(adapter).parent.name or Path(adapter).name})"


def train_downstream(
    cfg: RunConfig,
    model: DownstreamModel,
    data: Prepared,
    seed: int,
    cache: Features | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    quiet: bool = True,
) -> tuple[list[float], L.Trainer]:
    """Train ``model``'s head (and adapters in ``mode: adapters``) with Lightning; returns the loss per step.

    Head-only runs without augmentation train on frozen features (``cache``: of ``data.train``, reused
    across seeds). ``run_dir`` holds ``checkpoints/`` and ``logs/``; ``resume`` continues from
    ``checkpoints/last.ckpt`` and reaches the weights the uninterrupted run would.
    """
    ds = downstream_of(cfg)
    size = (cfg.probe.train or cfg.data).image_size
    on_features = ds.mode == "head" and ds.augment == "none"
    if on_features and cache is None:
        cache = encode(model, data.train.images)
    augment = None
    if not on_features and ds.augment != "none":
        from insitu.pipelines.downstream_aug import build_augmentation

        augment = build_augmentation(ds.augment, size, seed, ds.ignore_index)
    train = (
        LabelledItems(cache, data.train.targets, ds.task, key="features")
        if on_features
        else LabelledItems(data.train.images, data.train.targets, ds.task, augment, seed)
    )
    val = LabelledItems(data.val.images, data.val.targets, ds.task) if data.val is not None else None
    last = run_dir / "checkpoints" / "last.ckpt" if run_dir is not None else None
    if resume and (last is None or not last.exists()):
        raise ConfigError(f"--resume: no checkpoint at {last}. Run without --resume to start.")
    start = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"]) if resume else 0
    seed_everything(seed, workers=True)
    task = DownstreamTask(model, ds, data.k, class_weights(ds, data.train.targets, data.k), size)
    trainer = downstream_trainer(
        cfg, ds, run_dir / "checkpoints" if run_dir else None, run_dir / "logs" if run_dir else None, val is not None, quiet
    )
    trainer.fit(task, datamodule=LabelledData(train, val, ds, seed, start), ckpt_path=str(last) if resume else None, weights_only=True)
    model.cpu().eval()
    return task.history, trainer


def fit_and_score(
    cfg: RunConfig,
    adapter: Path | None,
    data: Prepared,
    seed: int,
    cache: Features | None = None,
    backbone: ViTBackbone | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    quiet: bool = True,
) -> tuple[DownstreamModel, FinetuneResult, torch.Tensor]:
    """Train a fresh head (seeded) and score it on the test split; returns the model, result and test logits."""
    ds = downstream_of(cfg)
    start = time.time()
    torch.manual_seed(seed)
    model = build_model(cfg, adapter, data.k, backbone)
    history, _ = train_downstream(cfg, model, data, seed, cache, run_dir, resume, quiet)
    logits = predict_logits(model, data.test.images)
    metrics = task_metrics(ds, logits, data.test.targets, data.k)
    result = FinetuneResult(
        model_name(adapter, ds.mode),
        seed,
        metrics,
        trainable_count(model, ds.mode),
        len(data.train.images),
        len(data.test.images),
        round(time.time() - start, 2),
        history=history,
    )
    return model, result, logits


def finetune(
    cfg: RunConfig,
    adapter: Path | None = None,
    seed: int | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = True,
) -> FinetuneResult:
    """Train the configured head on ``probe.train`` (or a split of ``data``), score it on the test split.

    With ``out_dir`` the head, its metadata and the resolved config are saved there for ``insitu predict``
    (the folder is claimed before training: an earlier model there is replaced only with ``overwrite``;
    ``resume`` continues the run whose checkpoints are there). Secondary ranks of a distributed run
    train but write nothing.
    """
    writer = out_dir is not None and not is_secondary_rank()
    folder = None
    if writer and not resume:
        folder = claim_folder(Path(out_dir), "finetune", overwrite)
    seed = cfg.seed if seed is None else seed
    data = prepare(cfg, adapter)
    model, result, _ = fit_and_score(cfg, adapter, data, seed, run_dir=Path(out_dir) if out_dir else None, resume=resume, quiet=quiet)
    if writer:
        result.out_dir = save_head(model, cfg, adapter, data.prep, data.k, data.train.class_names, result, Path(out_dir))
    if folder is not None:
        folder.record()
    return result


def summarize(results: list[FinetuneResult]) -> dict[str, tuple[float, float]]:
    """Mean and std over seeds of every metric."""
    keys = results[0].metrics.keys()
    return {k: (float(np.nanmean([r.metrics[k] for r in results])), float(np.nanstd([r.metrics[k] for r in results]))) for k in keys}
