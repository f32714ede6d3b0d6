"""Cached views: the frozen prefix's output for a fixed pool of views per image (``train.cached_views``).

When adapters start at block k, blocks 0..k-1 are frozen and run without gradient, so their output
for a given view never changes during training. With ``train.cached_views: K``, every training
image gets K pre-drawn views per view position (for example K global crops for each of SimCLR's
two views); their prefix tokens are computed once, and each step draws, per position, one of the
K cached views and runs only blocks k.. (with adapters). This is exact for those views; what it
gives up is augmentation diversity (K draws per position instead of a fresh one every step), which
is why it is meant for short runs on small datasets (the embedded quickstart, laptop CPUs). The cache
holds N × K × Σ_positions tokens × width × 4 bytes (float32), written in place (nothing is copied
after it is built). Before any work that size is estimated from the item count and checked against
`cache_limit_bytes`: ``MAX_CACHE_BYTES``, or ``AVAILABLE_FRACTION`` of the memory available now when
that is less (a run that would exhaust memory is refused with the estimate, not killed part-way).
Objectives that change pixels inside a step (GLARE's local corruption) cannot use it; `insitu.config`
refuses those, and a cache without a frozen prefix, when it validates the config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from insitu.backbones.vit import ViTBackbone
from insitu.errors import ConfigError
from insitu.pipelines.data import SampleDataset

log = logging.getLogger("insitu")

MAX_CACHE_BYTES = 4 * 1024**3
AVAILABLE_FRACTION = 0.5  # the share of the memory available at build time the cache may take (the loader and model need the rest)
CACHE_DTYPE_BYTES = 4  # the prefix tokens are float32


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


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation now: ``MemAvailable`` (Linux), else free physical pages (``os.sysconf``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):  # not Linux, or an unreadable /proc: ask sysconf
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # no such names on this platform
        return None


def cache_limit_bytes() -> tuple[int, str]:
    """The most the cache may hold, and why: ``MAX_CACHE_BYTES``, or a share of the available memory when that is less."""
    available = available_memory_bytes()
    if available is not None and AVAILABLE_FRACTION * available < MAX_CACHE_BYTES:
        return int(AVAILABLE_FRACTION * available), f"{AVAILABLE_FRACTION:.0%} of the {available / 1024**3:.1f} GiB of memory available now"
    return MAX_CACHE_BYTES, "insitu.pipelines.view_cache.MAX_CACHE_BYTES"


def cache_bytes(items: int, k: int, tokens_per_view: list[int], embed_dim: int) -> int:
    """The bytes the cache holds: items × K views × every position's tokens × width × float32."""
    return items * k * sum(tokens_per_view) * embed_dim * CACHE_DTYPE_BYTES


def build_view_cache(source: SampleDataset, backbone: ViTBackbone, first_block: int, k: int, batch_size: int = 64) -> CachedViewDataset:
    """Draw ``k`` views per position for every item and run the frozen prefix on them once.

    Each image is read once for its ``k`` view sets (and the first one once more, to size the cache
    before any work). The tokens are written into one tensor per position, allocated once.
    """
    first = next((loaded[1] for i in range(len(source)) if (loaded := source.load(i)) is not None), None)
    if first is None:  # failures are logged by SampleDataset.load
        raise ConfigError("train.cached_views: no training item could be loaded")
    shapes = [tuple(v.shape[-2:]) for v in source.transform(first)]
    tokens_per_view = [(h // backbone.patch_size) * (w // backbone.patch_size) + backbone.num_prefix_tokens for h, w in shapes]
    need = cache_bytes(len(source), k, tokens_per_view, backbone.embed_dim)
    limit, why = cache_limit_bytes()
    if need > limit:
        raise ConfigError(
            f"train.cached_views={k} would hold {need / 1024**3:.2f} GiB of prefix tokens for {len(source)} items "
            f"({len(shapes)} view positions × {k} views × {sum(tokens_per_view) // len(shapes)} tokens × {backbone.embed_dim} float32), "
            f"over the limit of {limit / 1024**3:.2f} GiB ({why}); lower train.cached_views or data.max_items, or set it to 0."
        )
    per_position: list[torch.Tensor | None] = [None for _ in shapes]  # [N·K, T, D] each, allocated at the first flush
    filled = [0 for _ in shapes]
    pending: list[list[torch.Tensor]] = [[] for _ in shapes]
    kept: list[int] = []

    def flush() -> None:
        for pos, views in enumerate(pending):
            if views:
                chunk = backbone.prefix_tokens(torch.stack(views), first_block)
                if per_position[pos] is None:
                    per_position[pos] = chunk.new_empty((len(source) * k, *chunk.shape[1:]))
                per_position[pos][filled[pos] : filled[pos] + len(chunk)] = chunk
                filled[pos] += len(chunk)
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
    if not kept:
        raise ConfigError("train.cached_views: no training item could be loaded")
    # items that failed to load leave unused rows at the end: a view of the filled rows, no copy
    tokens = [t[: len(kept) * k].view(len(kept), k, *t.shape[1:]) for t in per_position]
    log.info("cached %d views per position for %d items (%.0f MiB)", k, len(kept), sum(t.numel() for t in tokens) * 4 / 2**20)
    return CachedViewDataset(source, tokens, kept)
