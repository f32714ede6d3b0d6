"""What the server does with site updates: check each one, then average the ones that pass.

Pure numpy, no Flower and no torch, so the arithmetic and the drop rules are tested on their own.
An update is dropped from its round, with a reason the server logs, when it was made on another
base (fingerprint), when its tensor names, count or shapes differ from the global state's, when a
value is NaN or Inf, or when it claims no items. The round goes on with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SiteUpdate:
    """One site's reply to a round: its trained tensors (in the global state's order) and how many items it trained on."""

    site: str  # the server's own label for the connection (never a site's name or path)
    arrays: list[np.ndarray]
    items: int
    fingerprint: str
    loss: float | None = None
    refused: str | None = None  # set by a site that declined the round (e.g. its base differs)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))


def check_update(update: SiteUpdate, shapes: list[tuple[int, ...]], fingerprint: str) -> str | None:
    """The reason to drop ``update`` from the round, or None when it may be averaged."""
    if update.refused:
        return f"the site declined the round: {update.refused}"
    if update.fingerprint != fingerprint:
        return f"trained on another base (fingerprint {update.fingerprint[:12]}..., the federation's is {fingerprint[:12]}...)"
    if len(update.arrays) != len(shapes):
        return f"sent {len(update.arrays)} tensors, the global state has {len(shapes)}"
    wrong = [i for i, (a, s) in enumerate(zip(update.arrays, shapes, strict=True)) if tuple(a.shape) != tuple(s)]
    if wrong:
        i = wrong[0]
        return f"{len(wrong)} tensors with the wrong shape (tensor {i}: {tuple(update.arrays[i].shape)}, expected {tuple(shapes[i])})"
    if any(not np.issubdtype(a.dtype, np.floating) for a in update.arrays):
        return "sent non-floating-point tensors"
    bad = [i for i, a in enumerate(update.arrays) if not np.isfinite(a).all()]
    if bad:
        return f"{len(bad)} tensors hold NaN or Inf (first: tensor {bad[0]})"
    if update.items <= 0:
        return f"claims {update.items} training items"
    return None


def weighted_average(updates: list[SiteUpdate]) -> list[np.ndarray]:
    """FedAvg: each tensor is the item-weighted mean of the sites' tensors (float32)."""
    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(u.items for u in updates))
    out = []
    for parts in zip(*(u.arrays for u in updates), strict=True):
        acc = np.zeros(parts[0].shape, dtype=np.float64)
        for u, a in zip(updates, parts, strict=True):
            acc += (u.items / total) * a.astype(np.float64)
        out.append(acc.astype(np.float32))
    return out


def aggregate(
    updates: list[SiteUpdate], shapes: list[tuple[int, ...]], fingerprint: str
) -> tuple[list[np.ndarray] | None, list[SiteUpdate], dict[str, str]]:
    """Check every update and average those that pass: ``(average or None, accepted, {site: reason dropped})``."""
    accepted, dropped = [], {}
    for update in updates:
        reason = check_update(update, shapes, fingerprint)
        if reason is None:
            accepted.append(update)
        else:
            dropped[update.site] = reason
    return (weighted_average(accepted) if accepted else None), accepted, dropped
