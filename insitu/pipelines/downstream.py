"""Downstream training on Lightning: one `DownstreamTask` for classification, multi-label and segmentation.

The run's ``trainer`` section (accelerator, devices, strategy, precision) is the one pretraining
uses. Batches are drawn per step from ``(seed, step)`` (`StepBatchSampler`), so a run resumed from
its checkpoint sees the batches an uninterrupted run would and ends at the same weights. In
``mode: head`` without augmentation the head trains on features cached once; otherwise every
step runs the (adapted) backbone, and in ``mode: adapters`` the adapters train with the head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex, MultilabelAveragePrecision

from insitu.config import DownstreamConfig, RunConfig
from insitu.engine import Optimisation, Task, make_trainer

MAIN_METRIC = {"classification": "accuracy", "multilabel": "mAP", "segmentation": "mIoU"}
Features = torch.Tensor | list[torch.Tensor]


def metric_collection(task: str, k: int, ignore_index: int = 255) -> MetricCollection:
    """The validation metrics of a task (the test metrics are `insitu.heads.metrics`, which skip absent classes)."""
    if task == "segmentation":
        return MetricCollection({"mIoU": MulticlassJaccardIndex(k, ignore_index=ignore_index, average="macro")})
    if task == "multilabel":
        return MetricCollection({"mAP": MultilabelAveragePrecision(num_labels=k, average="macro")})
    return MetricCollection(
        {"accuracy": MulticlassAccuracy(k, average="micro"), "balanced_accuracy": MulticlassAccuracy(k, average="macro")}
    )


def task_loss(ds: DownstreamConfig, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if ds.task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.float())
    return F.cross_entropy(logits.float(), target.long(), weight=weight, ignore_index=ds.ignore_index)


class DownstreamTask(Task):
    """A `DownstreamModel` (adapted backbone + head) trained for a task; only the head (and adapters) learn.

    AdamW at weight decay 1e-4 on every trainable parameter (biases too) and a cosine from ``ds.lr``
    to 0 over ``ds.steps``, without warm-up.
    """

    def __init__(
        self, model: torch.nn.Module, ds: DownstreamConfig, num_classes: int, weight: torch.Tensor | None, image_size: int
    ) -> None:
        self.ds, self.k, self.image_size = ds, num_classes, image_size
        super().__init__(Optimisation(ds.lr, ds.steps, weight_decay=1e-4, decay_all=True), {"downstream": ds})
        self.model = model
        self.register_buffer("class_weight", weight if weight is not None else torch.empty(0), persistent=False)
        self.val_metrics = metric_collection(ds.task, num_classes, ds.ignore_index).clone(prefix="val/")
        self.history: list[float] = []  # training loss per step of this segment
        train_adapters = ds.mode == "adapters" and model.adapted.adapters is not None
        for p in model.adapted.parameters():
            p.requires_grad_(False)
        if train_adapters:
            for p in model.adapted.adapters.parameters():
                p.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        if "features" in batch:
            return self.model.head_logits(batch["features"], (self.image_size, self.image_size))
        return self.model(batch["image"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        weight = self.class_weight if self.class_weight.numel() else None
        loss = task_loss(self.ds, self.logits(batch), batch["target"], weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        self.history.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, target = self.logits(batch).float(), batch["target"]
        self.log("val/loss", task_loss(self.ds, logits, target, None), batch_size=len(target), sync_dist=True)
        scores = logits.sigmoid() if self.ds.task == "multilabel" else logits.argmax(1) if self.ds.task == "segmentation" else logits
        self.val_metrics.update(scores, target.long())

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches for steps ``start … steps-1``: step s takes a permutation seeded by (seed, s), this rank's share.

    Each index comes with its step, so per-item augmentation can be seeded by (seed, step, index) too.
    """

    def __init__(self, n: int, batch_size: int, seed: int, steps: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.steps, self.start = n, min(batch_size, n), seed, steps, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            idx = torch.randperm(self.n, generator=gen)[: self.batch][self.rank :: self.world]
            yield [(step, int(i)) for i in idx]


class LabelledItems(Dataset):
    """Model inputs (images, or cached features) with their targets; ``augment(image, mask)`` on images."""

    def __init__(
        self, inputs: Features, targets: torch.Tensor, task: str, augment: Callable | None = None, seed: int = 0, key: str = "image"
    ) -> None:
        self.inputs, self.targets, self.task, self.augment, self.seed, self.key = inputs, targets, task, augment, seed, key

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, where: int | tuple[int, int]) -> dict[str, Any]:
        step, i = where if isinstance(where, tuple) else (-1, where)
        x = [f[i] for f in self.inputs] if isinstance(self.inputs, list) else self.inputs[i]
        target = self.targets[i]
        if self.augment is not None and step >= 0:
            self.augment.reseed(hash((self.seed, step, i)) & 0x7FFFFFFF)
            x, mask = self.augment(x, target if self.task == "segmentation" else None)
            target = mask if mask is not None else target
        return {self.key: x, "target": target}


class LabelledData(L.LightningDataModule):
    """Train batches by step (`StepBatchSampler`), validation in order."""

    def __init__(self, train: LabelledItems, val: LabelledItems | None, ds: DownstreamConfig, seed: int, start: int = 0) -> None:
        super().__init__()
        self.train, self.val, self.ds, self.seed, self.start = train, val, ds, seed, start

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = StepBatchSampler(len(self.train), self.ds.batch_size, self.seed, self.ds.steps, self.start, rank, world)
        return DataLoader(self.train, batch_sampler=sampler, num_workers=self.ds.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        return DataLoader(self.val, batch_size=self.ds.batch_size, num_workers=self.ds.num_workers)


class KeepBest(Callback):
    """Keep the trainable weights of the best validation score and restore them when training ends."""

    def __init__(self, monitor: str) -> None:
        self.monitor, self.best, self.state = monitor, float("-inf"), None

    def on_validation_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            self.state = {k: v.detach().clone() for k, v in task.model.state_dict().items() if _trainable(task, k)}

    def on_fit_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        if self.state is not None:
            task.model.load_state_dict(self.state, strict=False)


def _trainable(task: L.LightningModule, key: str) -> bool:
    return key.startswith("head.") or (task.ds.mode == "adapters" and ".adapters." in f".{key}")


def downstream_trainer(
    cfg: RunConfig, ds: DownstreamConfig, ckpt_dir: Path | None, log_dir: Path | None, has_val: bool, quiet: bool
) -> L.Trainer:
    """A Lightning trainer (`insitu.engine.make_trainer`) for ``ds.steps`` steps on the run's ``trainer`` section."""
    monitor = "val/" + MAIN_METRIC[ds.task]
    callbacks: list[Callback] = []
    if ckpt_dir is not None:
        every = ds.checkpoint_every or max(1, ds.steps // 4)
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=every, save_last=True, auto_insert_metric_name=False
            )
        )
    if has_val:
        callbacks.append(KeepBest(monitor))
        if ds.early_stopping is not None:
            callbacks.append(EarlyStopping(monitor, mode="max", patience=ds.early_stopping, check_on_train_epoch_end=False))
    return make_trainer(
        cfg.trainer,
        callbacks,
        max_steps=ds.steps,
        quiet=quiet,
        max_epochs=1,  # one epoch = the StepBatchSampler's steps
        logger=CSVLogger(log_dir, name="", version="") if log_dir is not None else False,
        val_check_interval=min(ds.val_every, ds.steps) if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=max(1, min(10, ds.steps // 10)),
        enable_checkpointing=ckpt_dir is not None,
        use_distributed_sampler=False,  # StepBatchSampler shards by rank itself
        default_root_dir=log_dir,
    )
