"""What the server does with site updates: check each one, then average the ones that pass.

Pure numpy, no Flower and no torch, so the arithmetic and the drop rules are tested on their own.
An update is dropped from its round, with a reason the server logs, when it was made on another
base (fingerprint), when its tensor names, count or shapes differ from the global state's, when a
value is NaN or Inf once cast to float32 (so a float64 1e300 counts as Inf), when a value is larger
in magnitude than ``MAX_ABS`` (the bound a package's tensors obey), or when it claims no items.
The round goes on with the others.

No site can own the average by what it claims: a site's item count is a claim the server cannot
verify, so it is clipped to ``WeightPolicy.max_items`` and, after clipping, no site gets more than
``max_share`` of the weight (the excess goes to the other sites in proportion to their items);
``weighting: equal`` ignores the claims altogether. Every clip is recorded with the round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ABS = 1e6  # the magnitude bound of a package's tensors (insitu.package_format): an update beyond it could never be packaged


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
    with np.errstate(over="ignore", invalid="ignore"):
        working = [a.astype(np.float32, copy=False) for a in update.arrays]  # the working dtype: check what will be averaged
    bad = [i for i, a in enumerate(working) if not np.isfinite(a).all()]
    if bad:
        return f"{len(bad)} tensors hold NaN or Inf as float32 (first: tensor {bad[0]})"
    huge = [i for i, a in enumerate(working) if a.size and float(np.abs(a).max()) > MAX_ABS]
    if huge:
        return f"{len(huge)} tensors hold values above {MAX_ABS:g} in magnitude (first: tensor {huge[0]})"
    if update.items <= 0:
        return f"claims {update.items} training items"
    return None


@dataclass(frozen=True)
class WeightPolicy:
    """How much say each site gets in the average (``federated.weighting``, ``max_site_items``, ``max_site_share``)."""

    weighting: str = "items"  # "items" (FedAvg) or "equal"
    max_items: int = 1_000_000  # a larger claim counts as this many items
    max_share: float = 0.5  # no site's weight above this share (or 1 / sites, when that is larger)


def site_weights(updates: list[SiteUpdate], policy: WeightPolicy | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """Each accepted site's weight in the average (summing to 1) and ``{site: note}`` for every clip applied.

    Claims are clipped to ``max_items``; then every weight above ``cap = max(max_share, 1 / n)`` is
    set to the cap and the rest is shared among the others in proportion to their items, repeated
    until no weight exceeds the cap (at most n passes)."""
    policy = policy or WeightPolicy()
    n = len(updates)
    notes: dict[str, str] = {}
    if policy.weighting == "equal":
        return np.full(n, 1.0 / n), notes
    items = np.array([float(u.items) for u in updates])
    for u, claimed in zip(updates, items, strict=True):
        if claimed > policy.max_items:
            notes[u.site] = f"claimed {int(claimed)} items, counted as {policy.max_items} (federated.max_site_items)"
    items = np.minimum(items, float(policy.max_items))
    cap = max(policy.max_share, 1.0 / n)
    weights = items / items.sum()
    fixed = np.zeros(n, dtype=bool)
    for _ in range(n):
        over = (weights > cap + 1e-12) & ~fixed
        if not over.any():
            break
        fixed |= over
        rest = 1.0 - cap * fixed.sum()
        free = ~fixed
        weights = np.where(fixed, cap, rest * items / items[free].sum() if free.any() else 0.0)
    shares = items / items.sum()
    for u, w, share, f in zip(updates, weights, shares, fixed, strict=True):
        if f:
            capped = f"item share {share:.3f} capped at {w:.3f} (federated.max_site_share)"
            notes[u.site] = f"{notes[u.site]}; {capped}" if u.site in notes else capped
    return weights, notes


def weighted_average(updates: list[SiteUpdate], weights: np.ndarray | None = None) -> list[np.ndarray]:
    """FedAvg: each tensor is the weighted mean of the sites' tensors (float32); by default weighted by items, uncapped."""
    if not updates:
        raise ValueError("no updates to average")
    if weights is None:
        total = float(sum(u.items for u in updates))
        weights = np.array([u.items / total for u in updates])
    out = []
    for parts in zip(*(u.arrays for u in updates), strict=True):
        acc = np.zeros(parts[0].shape, dtype=np.float64)
        for w, a in zip(weights, parts, strict=True):
            acc += float(w) * a.astype(np.float32).astype(np.float64)
        out.append(acc.astype(np.float32))
    return out


def aggregate(
    updates: list[SiteUpdate], shapes: list[tuple[int, ...]], fingerprint: str, policy: WeightPolicy | None = None
) -> tuple[list[np.ndarray] | None, list[SiteUpdate], dict[str, str], dict[str, str]]:
    """Check every update and average those that pass under ``policy``.

    Returns ``(average or None, accepted, {site: reason dropped}, {site: weight clip applied})``."""
    accepted, dropped = [], {}
    for update in updates:
        reason = check_update(update, shapes, fingerprint)
        if reason is None:
            accepted.append(update)
        else:
            dropped[update.site] = reason
    if not accepted:
        return None, accepted, dropped, {}
    weights, clipped = site_weights(accepted, policy)
    return weighted_average(accepted, weights), accepted, dropped, clipped
