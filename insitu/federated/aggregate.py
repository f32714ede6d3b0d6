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

No site can own the average by the size of its update either: with ``max_update_norm`` set, an
update whose L2 distance to the global state (over all shared tensors) is larger is scaled back to
that distance, so a boosted or sign-flipped update moves the global state at most
``max_update_norm`` times its weight. Without an absolute bound, each round's updates are clipped
to ``update_norm_factor`` (default 3) times the median norm of that round's accepted updates
(norm bounding relative to the honest majority, as in Sun et al. 2019, "Can you really backdoor
federated learning?"): a sign-flipped or boosted update then counts as at most 3 typical ones.
With fewer than 3 sites the median is no safer than the mean, so this bound then does nothing
useful; an absolute ``max_update_norm`` is the only protection there. The robust rules (``trimmed_mean``, ``median``, ``krum``)
are Flower's own aggregation functions (:mod:`flwr.server.strategy.aggregate`), applied to the
replies that passed these checks, so the checks and the records stay insitu's.

Text a site sends (its reason for declining, its fingerprint) goes through :func:`site_text`
before it reaches a log or a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_ABS = 1e6  # the magnitude bound of a package's tensors (insitu.package_format): an update beyond it could never be packaged
MAX_TEXT = 200  # characters of a site's text kept in logs and files
RULES = ("mean", "trimmed_mean", "median", "krum")
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.")  # ANSI CSI, OSC and 2-byte sequences


def site_text(value: object, limit: int = MAX_TEXT) -> str:
    """A site's free text made safe for a log line, a CSV cell or JSON: printable ASCII, one line, at most ``limit`` characters.

    Terminal escape sequences are removed, line breaks and tabs become spaces, every other character
    outside printable ASCII becomes ``?``, and a leading ``= + - @`` (a spreadsheet formula) gets a
    ``'`` in front, as spreadsheets themselves mark text."""
    text = _ESCAPES.sub("", str(value))
    text = re.sub(r"[\r\n\t\v\f]+", " ", text)
    text = "".join(c if " " <= c <= "~" else "?" for c in text).strip()
    if text[:1] in ("=", "+", "-", "@"):
        text = "'" + text
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    reason = check_tensors(update.arrays, shapes)
    if reason is not None:
        return reason
    if update.items <= 0:
        return f"claims {update.items} training items"
    return None


def check_tensors(arrays: list[np.ndarray], shapes: list[tuple[int, ...]]) -> str | None:
    """Why ``arrays`` cannot stand for the global state (count, shapes, dtype, NaN/Inf as float32, magnitude), or None.

    Used by the server on every reply and by a site on every global state it receives."""
    if len(arrays) != len(shapes):
        return f"sent {len(arrays)} tensors, the global state has {len(shapes)}"
    wrong = [i for i, (a, s) in enumerate(zip(arrays, shapes, strict=True)) if tuple(np.shape(a)) != tuple(s)]
    if wrong:
        i = wrong[0]
        return f"{len(wrong)} tensors with the wrong shape (tensor {i}: {tuple(np.shape(arrays[i]))}, expected {tuple(shapes[i])})"
    if any(not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating) for a in arrays):
        return "sent non-floating-point tensors"
    with np.errstate(over="ignore", invalid="ignore"):
        working = [a.astype(np.float32, copy=False) for a in arrays]  # the working dtype: check what will be averaged
    bad = [i for i, a in enumerate(working) if not np.isfinite(a).all()]
    if bad:
        return f"{len(bad)} tensors hold NaN or Inf as float32 (first: tensor {bad[0]})"
    huge = [i for i, a in enumerate(working) if a.size and float(np.abs(a).max()) > MAX_ABS]
    if huge:
        return f"{len(huge)} tensors hold values above {MAX_ABS:g} in magnitude (first: tensor {huge[0]})"
    return None


@dataclass(frozen=True)
class WeightPolicy:
    """How much say each site gets in the average (``federated.weighting``, ``max_site_items``, ``max_site_share``)."""

    weighting: str = "items"  # "items" (FedAvg) or "equal"
    max_items: int = 1_000_000  # a larger claim counts as this many items
    max_share: float = 0.5  # no site's weight above this share (or 1 / sites, when that is larger)
    rule: str = "mean"  # "mean" (fedavg/fedprox), or Flower's "trimmed_mean", "median", "krum"
    max_update_norm: float | None = None  # clip each update's L2 distance to the global state to this (None: no clip)
    update_norm_factor: float | None = 3.0  # without max_update_norm: clip to this × the round's median update norm (None: off)
    trim_fraction: float = 0.2  # trimmed_mean: the share cut from each end, per coordinate
    krum_malicious: int = 1  # krum: the number of malicious sites it must tolerate (f)
    krum_keep: int = 0  # krum: 0 picks one reply (Krum); m > 0 averages the m best (Multi-Krum)


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


def update_norm(update: SiteUpdate, reference: list[np.ndarray]) -> float:
    """The L2 norm of ``update - reference`` over all shared tensors (float32 values, float64 sums)."""
    total = sum(
        float(np.sum((a.astype(np.float32).astype(np.float64) - r.astype(np.float64)) ** 2))
        for a, r in zip(update.arrays, reference, strict=True)
    )
    return float(np.sqrt(total))


def clip_updates(
    updates: list[SiteUpdate], reference: list[np.ndarray], max_norm: float, source: str = "federated.max_update_norm"
) -> tuple[list[SiteUpdate], dict[str, str]]:
    """Each update whose distance to ``reference`` exceeds ``max_norm`` scaled back onto that sphere around it, with a note."""
    out, notes = [], {}
    for u in updates:
        norm = update_norm(u, reference)
        if norm <= max_norm:
            out.append(u)
            continue
        scale = max_norm / norm
        arrays = [
            (r.astype(np.float64) + scale * (a.astype(np.float32).astype(np.float64) - r)).astype(np.float32)
            for a, r in zip(u.arrays, reference, strict=True)
        ]
        out.append(SiteUpdate(u.site, arrays, u.items, u.fingerprint, u.loss, u.refused))
        notes[u.site] = f"update norm {norm:.4g} clipped to {max_norm:.4g} ({source})"
    return out, notes


def robust_average(updates: list[SiteUpdate], weights: np.ndarray, policy: WeightPolicy) -> tuple[list[np.ndarray], dict[str, str]]:
    """The aggregate under ``policy.rule``, by Flower's own functions; ``{site: note}`` for the sites a rule left out.

    Flower's functions take ``(tensors, num_examples)`` pairs; the second element carries the
    capped weight (trimmed mean and median ignore it, as Flower's FedTrimmedAvg and FedMedian do:
    every accepted site has an equal say; Multi-Krum averages its choice with these weights)."""
    if policy.rule == "mean":
        return weighted_average(updates, weights), {}
    from insitu.federated.telemetry import import_flower

    import_flower("flwr")  # telemetry switched before Flower is first imported
    from flwr.server.strategy import aggregate as rules

    pairs = [([a.astype(np.float32).astype(np.float64) for a in u.arrays], float(w)) for u, w in zip(updates, weights, strict=True)]
    notes: dict[str, str] = {}
    if policy.rule == "trimmed_mean":
        cut = int(policy.trim_fraction * len(updates))
        if cut == 0 and len(updates) > 1:
            notes["all"] = f"trimmed_mean cuts nothing with {len(updates)} sites (trim_fraction {policy.trim_fraction:g}): a plain mean"
        result = rules.aggregate_trimmed_avg(pairs, proportiontocut=policy.trim_fraction)
    elif policy.rule == "median":
        result = rules.aggregate_median(pairs)
    elif policy.rule == "krum":
        f, keep = policy.krum_malicious, min(policy.krum_keep, len(updates))
        result = rules.aggregate_krum(pairs, num_malicious=f, to_keep=keep)
        if len(updates) < 2 * f + 3:
            notes["all"] = f"krum tolerates {f} malicious sites only with at least {2 * f + 3} sites; this round had {len(updates)}"
        if keep == 0:  # Flower's Krum returns the chosen site's own tensors
            notes.update({u.site: "not chosen by krum" for u, (arrays, _) in zip(updates, pairs, strict=True) if arrays is not result})
    else:
        raise ValueError(f"unknown aggregation rule {policy.rule!r}; choose one of {', '.join(RULES)}")
    return [np.asarray(a, dtype=np.float32) for a in result], notes


def aggregate(
    updates: list[SiteUpdate],
    shapes: list[tuple[int, ...]],
    fingerprint: str,
    policy: WeightPolicy | None = None,
    reference: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray] | None, list[SiteUpdate], dict[str, str], dict[str, str]]:
    """Check every update, clip the norms of those that pass (against ``reference``, the global state) and aggregate them under ``policy``.

    Returns ``(aggregate or None, accepted, {site: reason dropped}, {site: weight or norm clip applied})``."""
    policy = policy or WeightPolicy()
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
    used = accepted
    limit = policy.max_update_norm
    if limit is None and policy.update_norm_factor is not None and reference is not None and len(accepted) >= 3:
        median = float(np.median([update_norm(u, reference) for u in accepted]))
        limit = policy.update_norm_factor * median if median > 0 else None
    if limit is not None:
        if reference is None:
            raise ValueError("max_update_norm needs the global state (reference) to measure updates against")
        used, norm_notes = clip_updates(
            accepted,
            reference,
            limit,
            "federated.max_update_norm"
            if policy.max_update_norm
            else f"federated.update_norm_factor {policy.update_norm_factor:g} x the round's median",
        )
        _merge(clipped, norm_notes)
    average, rule_notes = robust_average(used, weights, policy)
    _merge(clipped, rule_notes)
    return average, accepted, dropped, clipped


def _merge(notes: dict[str, str], more: dict[str, str]) -> None:
    for site, note in more.items():
        notes[site] = f"{notes[site]}; {note}" if site in notes else note
