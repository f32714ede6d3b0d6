"""From a data config to Lightning-ready datasets: scan, fit the normaliser, views, collate."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, get_worker_info

from insitu.config import DataConfig
from insitu.domains import Domain, Manifest, ManifestItem, create_domain
from insitu.domains.normalize import Normalizer
from insitu.objectives.augment import reseed_views, worker_seed
from insitu.objectives.views import resize_square

log = logging.getLogger("insitu")


@dataclass
class ScannedData:
    """A domain reader with the manifest it produced."""

    domain: Domain
    manifest: Manifest

    @classmethod
    def scan(cls, cfg: DataConfig) -> ScannedData:
        domain = create_domain(cfg.domain, cfg.options)
        return cls(domain, domain.scan(cfg.root, max_items=cfg.max_items))


class SampleDataset(Dataset):
    """Loads manifest items through their domain, normalises, and applies a view transform.

    An item that fails to load at training time (a file changed since the scan) is skipped with
    a warning naming it, so one bad file never kills a long run; the batch is built from the rest.
    """

    def __init__(
        self,
        data: ScannedData,
        items: list[ManifestItem],
        normalizer: Normalizer | None,
        transform: Callable[[torch.Tensor], list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]] | None = None,
        image_size: int = 64,
    ) -> None:
        self.data, self.items, self.normalizer = data, items, normalizer
        self.transform, self.image_size = transform, image_size

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[dict[str, Any], torch.Tensor] | None:
        """(the domain's sample, its normalised image), or None (logged) when the item fails to load."""
        item = self.items[index]
        try:
            sample = self.data.domain.load(item, self.data.manifest)
        except Exception as exc:  # noqa: BLE001 - quarantined at run time, reported by id
            log.warning("skipping item %s (%s): %s: %s", item.item_id, item.path, type(exc).__name__, exc)
            return None
        image = sample["image"].float()
        return sample, self.normalizer(image) if self.normalizer is not None else image

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        loaded = self.load(index)
        if loaded is None:
            return None
        sample, image = loaded
        item = self.items[index]
        out: dict[str, Any] = {"item_id": item.item_id, "label": sample.get("label", -1)}
        if sample.get("text") is not None:  # image-text pairs (ConVIRT-style objectives)
            out["text"] = sample["text"]
        if self.transform is not None:
            views = self.transform(image)
            # a transform may also return per-sample view metadata (e.g. each clip's playback speed)
            if isinstance(views, tuple):
                views, out["view_meta"] = views
            out["views"] = views
        else:
            out["image"] = resize_square(image, self.image_size)
            if sample.get("mask") is not None:  # segmentation items: nearest-neighbour keeps class ids
                out["mask"] = resize_mask(sample["mask"], self.image_size)
        if sample.get("multilabel") is not None:  # multi-hot tags (BigEarthNet-style)
            out["multilabel"] = sample["multilabel"]
        return out


def model_input(image: torch.Tensor, normalizer: Normalizer | None, size: int) -> torch.Tensor:
    """What the model sees for one C×H×W image in physical units: normalised, then resized to size×size.

    Prediction calls it; `SampleDataset` (training, probes) applies the same two steps, normalising
    in `load` and resizing in `__getitem__` (a test checks the two give the same tensor).
    """
    image = image.float()
    return resize_square(normalizer(image) if normalizer is not None else image, size)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """An int64 H×W label map resized to size×size with nearest neighbour (ignore pixels stay 255)."""
    m = torch.as_tensor(mask).long()
    if m.shape[-2:] == (size, size):
        return m
    return torch.nn.functional.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


def collate(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack samples, dropping items that failed to load."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return {"item_id": [], "label": torch.empty(0, dtype=torch.long)}
    out: dict[str, Any] = {
        "item_id": [b["item_id"] for b in batch],
        "label": torch.tensor([b["label"] if b["label"] is not None else -1 for b in batch]),
    }
    if "text" in batch[0]:
        out["text"] = [b.get("text", "") for b in batch]
    if "views" in batch[0]:
        out["views"] = [torch.stack([b["views"][v] for b in batch]) for v in range(len(batch[0]["views"]))]
        if "view_meta" in batch[0]:
            out["view_meta"] = torch.stack([b["view_meta"] for b in batch])
    else:
        out["image"] = torch.stack([b["image"] for b in batch])
        if all("mask" in b for b in batch):
            out["mask"] = torch.stack([b["mask"] for b in batch])
    if all("multilabel" in b for b in batch):
        out["multilabel"] = torch.stack([b["multilabel"] for b in batch])
    return out


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: one augmentation generator per DataLoader worker, from the run seed and the worker id.

    The dataset's view recipe restarts at `worker_seed` (``get_worker_info().seed``: the loader's base
    seed, drawn from the run's seeded torch RNG, plus the worker id). The worker's global torch, numpy
    and ``random`` state is seeded as Lightning's own worker_init_fn does after
    ``seed_everything(workers=True)`` (setting a worker_init_fn stops Lightning from adding its own).
    """
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id)
    info = get_worker_info()
    if info is not None:
        reseed_views(info.dataset, worker_seed())


def fit_normalizer(data: ScannedData, items: list[ManifestItem], max_items: int = 256) -> Normalizer:
    """Per-channel robust statistics from (a spread sample of) the training items."""
    step = max(1, len(items) // max_items)
    images = []
    for item in items[::step][:max_items]:
        try:
            images.append(data.domain.load(item, data.manifest)["image"].float())
        except Exception as exc:  # noqa: BLE001
            log.warning("normaliser: skipping %s: %s", item.path, exc)
    return Normalizer.fit(images)


class PretrainDataModule(L.LightningDataModule):
    """Training views for an objective, over the scanned training items."""

    def __init__(self, dataset: SampleDataset, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.dataset, self.num_workers = dataset, num_workers
        self.batch_size = min(batch_size, len(dataset))
        self.device_views: Any = None  # views.device: a MultiCrop that builds the views after the transfer
        self.view_seed = 0

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if self.device_views is not None and "image" in batch:
            trainer = self.trainer
            # a function of (seed, earlier rounds' steps, batch index, rank): every micro-batch of an accumulated
            # step draws its own views, and a resumed run (whose loop progress is restored) draws the same ones
            batch_index = trainer.fit_loop.epoch_loop.batch_progress.total.ready
            offset = getattr(trainer.lightning_module, "step_offset", 0)
            self.device_views.reseed(((self.view_seed * 1_000_003 + offset) * 1_000_003 + batch_index) * 1_009 + trainer.global_rank)
            batch["views"] = self.device_views.batch(batch.pop("image"))
        return batch

    def train_dataloader(self) -> DataLoader:
        sampler = self.sampler()
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker,
        )

    def sampler(self) -> WeightedRandomSampler | None:
        """Weighted sampling when the domain weights its sources (``sample_weights(items)``), else None."""
        hook = getattr(self.dataset.data.domain, "sample_weights", None)
        weights = hook(self.dataset.items) if hook is not None else None
        if not weights:
            return None
        return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
