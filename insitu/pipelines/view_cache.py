"""Cached views: the frozen prefix's output for a fixed pool of views per image (``train.cached_views``).

When adapters start at block k, blocks 0..k-1 are frozen and run without gradient, so their output
for a given view never changes during training. With ``train.cached_views: K``, every training
image gets K pre-drawn views per view position (for example K global crops for each of SimCLR's
two views); their prefix tokens are computed once, and each step draws, per position, one of the
K cached views and runs only blocks k.. (with adapters). This is exact for those views; what it
gives up is augmentation diversity (K draws per position instead of a fresh one every step), which
is why it is meant for short runs on small datasets (the embedded quickstart, laptop CPUs). Memory
is N × positions × K × tokens × width × 4 bytes, checked against ``MAX_CACHE_BYTES`` before any
work. Objectives that change pixels inside a step (GLARE's local corruption) cannot use it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from insitu.backbones.vit import ViTBackbone
from insitu.errors import ConfigError
from insitu.pipelines.data import SampleDataset

log = logging.getLogger("insitu")

MAX_CACHE_BYTES = 4 * 1024**3


class CachedViewDataset(Dataset):
    """Items whose ``views`` are frozen-prefix tokens drawn from K cached views per position."""

    def __init__(
        self, source: SampleDataset, tokens: list[torch.Tensor], kept: list[int], generator: torch.Generator | None = None
    ) -> None:
        self.data, self.tokens = source.data, tokens  # tokens: per position, [N, K, T, D]
        # which cached view a step sees: its own generator, run-seeded like the view recipes (and reseeded per worker)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed())
        self.items = [source.items[i] for i in kept]
        self.labels = [source.items[i].label for i in kept]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = self.tokens[0].shape[1]
        views = [t[index, int(torch.randint(k, (), generator=self.generator))] for t in self.tokens]
        label = self.labels[index]
        return {"item_id": self.items[index].item_id, "label": -1 if label is None else label, "views": views}


def check_cacheable(objective: Any, backbone: ViTBackbone, first_block: int, full_finetune: bool) -> None:
    """A typed error naming the setting that rules the cache out."""
    if not getattr(objective, "cacheable_views", False):
        raise ConfigError(
            f"train.cached_views does not work with objective '{objective.name}' (it changes pixels inside a training step); "
            "set train.cached_views=0 or use simclr or dino."
        )
    if full_finetune or first_block == 0:
        raise ConfigError(
            "train.cached_views needs a frozen prefix: adapters that start after block 0 (e.g. adapter.blocks: 2, the last two) "
            "and no train.full_finetune; set train.cached_views=0 otherwise."
        )


def build_view_cache(source: SampleDataset, backbone: ViTBackbone, first_block: int, k: int, batch_size: int = 64) -> CachedViewDataset:
    """Draw ``k`` views per position for every item and run the frozen prefix on them once.

    Each image is read once for its ``k`` view sets (and the first one once more, to size the cache
    before any work).
    """
    first = next((loaded[1] for i in range(len(source)) if (loaded := source.load(i)) is not None), None)
    if first is None:  # failures are logged by SampleDataset.load
        raise ConfigError("train.cached_views: no training item could be loaded")
    shapes = [tuple(v.shape[-2:]) for v in source.transform(first)]
    tokens_per_view = [(h // backbone.patch_size) * (w // backbone.patch_size) + backbone.num_prefix_tokens for h, w in shapes]
    need = len(source) * k * sum(tokens_per_view) * backbone.embed_dim * 4
    if need > MAX_CACHE_BYTES:
        raise ConfigError(
            f"train.cached_views={k} would hold {need / 1024**3:.1f} GiB of prefix tokens for {len(source)} items "
            f"(limit {MAX_CACHE_BYTES / 1024**3:.0f} GiB); lower train.cached_views or data.max_items, or set it to 0."
        )
    per_position: list[list[torch.Tensor]] = [[] for _ in shapes]
    pending: list[list[torch.Tensor]] = [[] for _ in shapes]
    kept: list[int] = []

    def flush() -> None:
        for pos, views in enumerate(pending):
            if views:
                per_position[pos].append(backbone.prefix_tokens(torch.stack(views), first_block))
                views.clear()

    for index in range(len(source)):
        loaded = source.load(index)
        if loaded is None:
            continue
        kept.append(index)
        for _ in range(k):
            for pos, view in enumerate(source.transform(loaded[1])):
                pending[pos].append(view)
        if len(pending[0]) >= batch_size * k:
            flush()
    flush()
    tokens = [torch.cat(chunks).view(len(kept), k, *chunks[0].shape[1:]) for chunks in per_position]
    log.info("cached %d views per position for %d items (%.0f MiB)", k, len(kept), sum(t.numel() for t in tokens) * 4 / 2**20)
    return CachedViewDataset(source, tokens, kept)
