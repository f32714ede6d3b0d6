"""The dense probe: a linear 1×1 head on patch tokens, scored by mIoU and foreground Dice over the
same repeated folds as the classification probe, adapted − frozen with paired CIs.

The head is trained until its loss plateaus (issue 38; before it ran a fixed 100 full-batch Adam
steps without class weighting, and on BUSI the frozen random-init ViT's head often predicted all
background: lesion Dice 0.002). `fit_dense_head` trains full-batch Adam and checks every ``window``
steps the relative change of the mean loss of the last window against the window before; below
``tolerance`` it stops (converged), else it stops at the cap ``steps`` (not converged).
``tolerance: 0`` runs exactly ``steps``. The pixel cross-entropy is weighted per class
(``class_weight``): ``sqrt`` (default) w_c ∝ 1/sqrt(n_c) over the training pixels, ``balanced``
inverse frequency N / (C·n_c), ``none`` the plain pixel mean. The unweighted loss is pixel accuracy,
dominated by background when lesions are ~10 % of the pixels; full inverse frequency over-corrects
(it buys lesion recall with background false positives, and mIoU averages the background's IoU
in); on frozen BUSI the square root gave the best mIoU and lesion Dice of the three, on the
reported test side and again on an inner split of the training side that never reads it
(docs/results/evaluation.md). Each dense result row reports the fits in ``fit`` (`summarise_fits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from insitu.config import RunConfig
from insitu.domains import ManifestItem
from insitu.errors import DataError
from insitu.heads.metrics import dense_counts, fg_dice_from_counts, miou_from_counts
from insitu.pipelines.data import ScannedData, collate
from insitu.pipelines.holdout import dense_holdout, item_keys
from insitu.pipelines.preprocess import Preprocessing, Stored, resolve_comparison
from insitu.pipelines.probe_plan import Model, ProbeResult, Split, classification_test_items, evaluation_plan, grouped_items, summarise


@torch.no_grad()
def token_maps(model: Model, data: ScannedData, items: list[ManifestItem], prep: Preprocessing, batch_size: int):
    """(patch-token maps B×D×h×w, masks B×H×W, item ids) for items that carry masks, their input prepared by ``prep``."""
    model.model.eval()
    maps, masks, ids = [], [], []
    for batch in DataLoader(prep.dataset(data, items), batch_size=batch_size, collate_fn=collate):
        if not batch["item_id"]:
            continue
        if "mask" not in batch:
            raise DataError(
                f"probe.dense.data under {data.manifest.root} gives no masks; use domain images with options.masks "
                "(a mask folder mirroring the images) or a video folder with images/ + masks/."
            )
        _, patches, (h, w) = model.model.forward_tokens(batch["image"])
        maps.append(patches.float().transpose(1, 2).reshape(len(patches), -1, h, w))
        masks.append(batch["mask"])
        ids += batch["item_id"]
    return torch.cat(maps), torch.cat(masks), ids


def stored_of(models: list[Model], stored: list[Stored] | None) -> list[Stored]:
    """What each model stores: ``stored`` when given (None, then packages: `insitu.pipelines.probe.load_models`), else each model's normaliser."""
    return stored if stored is not None else [m.normalizer for m in models]


def dense_inputs(cfg: RunConfig, models: list[Model], stored: list[Stored] | None = None) -> dict[str, Any]:
    """Token maps and masks per model, the evaluation plan and the items' bootstrap units and ids (for `dense_results`).

    Each model's input follows `resolve_comparison` on ``probe.dense.data`` (``stored``: what each model
    stores, as from `insitu.pipelines.probe.load_models`; by default each model's normaliser).
    """
    dense = cfg.probe.dense
    data = ScannedData.scan(dense.data)
    sides = [(data, grouped_items(data.manifest.items, cfg.probe))]
    held = None
    if dense.test is not None:
        test = ScannedData.scan(dense.test)
        sides.append((test, test.manifest.items))
    else:  # inductive unless probe.transductive: the images pretraining never saw are the test side
        held = dense_holdout(cfg, data.manifest.items, set(item_keys(classification_test_items(cfg))))
        if held is not None:
            sides = [(data, held.train), (data, held.test)]
    preps = resolve_comparison(stored_of(models, stored), data, data.manifest.items, dense.data.image_size, cfg.backbone)
    per_model = {}
    for m, prep in zip(models, preps, strict=True):
        per_model[m.name] = [token_maps(m, d, items, prep, cfg.probe.batch_size) for d, items in sides]
    by_key = {(side, i.item_id): i for side, (_, its) in enumerate(sides) for i in its}
    ids = [(side, i) for side, part in enumerate(per_model[models[0].name]) for i in part[2]]
    labels = np.array([by_key[k].label if by_key[k].label is not None else 0 for k in ids])
    groups = np.array([f"{k[0]}:{by_key[k].group}" for k in ids])
    n_first = len(per_model[models[0].name][0][2])
    fixed = (np.arange(n_first), np.arange(n_first, len(ids))) if dense.test is not None or held is not None else None
    # a fixed split has one training side: its repeats would refit the same convex full-batch head from another
    # init (mIoU spread over 5 such refits on BUSI: 0.0004-0.0005), so it is fitted once
    probe = cfg.probe.model_copy(update={"repeats": 1}) if fixed is not None else cfg.probe
    plan = evaluation_plan(labels, groups, probe, cfg.seed, fixed, fractions=[1.0], classify=False)
    maps = {name: (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])) for name, parts in per_model.items()}
    return {"maps": maps, "plan": plan, "groups": groups, "items": [f"{side}:{i}" for side, i in ids]}


def dense_results(cfg: RunConfig, models: list[Model], stored: list[Stored] | None = None) -> dict[str, list[ProbeResult]]:
    """The dense probe per model: mIoU and foreground Dice over the same folds, adapted − frozen with CIs;
    every row's ``fit`` says how its heads were trained (`summarise_fits`). Inputs as `dense_inputs`."""
    inputs = dense_inputs(cfg, models, stored)
    scored = {m.name: score_dense(*inputs["maps"][m.name], inputs["plan"], cfg.probe.dense, cfg.seed) for m in models}
    metrics = {"dense": {"mIoU": miou_from_counts, "dice": fg_dice_from_counts}}
    results = summarise(scored, metrics, inputs["groups"], cfg.probe, cfg.seed, items=inputs["items"])
    for name, rows in results.items():
        for row in rows:
            row.fit = scored[name][("dense", 1.0)]["fit"]
    return results


# ---------------------------------------------------------------- the head


@dataclass
class DenseFit:
    """How one dense head was trained: steps used, whether the loss plateaued, the loss at the end."""

    steps: int
    converged: bool
    final_loss: float
    relative_change: float | None  # of the last window's mean loss vs the window before (None: fewer than two windows)
    class_weights: list[float]


def summarise_fits(fits: list[DenseFit], dense: Any) -> dict[str, Any]:
    """The ``fit`` entry of a dense result row: the settings, and per evaluation steps, convergence and final loss."""
    return {
        "max_steps": dense.steps,
        "tolerance": dense.tolerance,
        "window": dense.window,
        "class_weight": dense.class_weight,
        "converged": all(f.converged for f in fits),
        "converged_evaluations": sum(f.converged for f in fits),
        "steps": [f.steps for f in fits],
        "final_loss": [round(f.final_loss, 6) for f in fits],
        "relative_change": [None if f.relative_change is None else float(f"{f.relative_change:.3g}") for f in fits],
        "class_weights": [fits[0].class_weights] if fits else [],
    }


def class_weights(masks: torch.Tensor, num_classes: int, ignore_index: int, rule: str) -> torch.Tensor:
    """Per-class loss weights from the training pixels: ``balanced`` N / (C·n_c), ``sqrt`` ∝ 1/sqrt(n_c)
    (scaled to average 1 over the pixels), ``none`` ones. An absent class gets weight 0 (it has no pixels)."""
    counts = torch.bincount(masks[masks != ignore_index].long().reshape(-1), minlength=num_classes)[:num_classes].double()
    if rule == "none":
        return torch.ones(num_classes)
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    if rule == "balanced":
        w[present] = counts.sum() / (num_classes * counts[present])
    else:  # sqrt
        w[present] = counts[present].rsqrt()
        w *= counts.sum() / (w * counts).sum()
    return w.float()


def fit_dense_head(
    train_tokens: torch.Tensor,
    train_masks: torch.Tensor,
    test_tokens: torch.Tensor,
    num_classes: int,
    steps: int = 2000,
    lr: float = 0.05,
    ignore_index: int = 255,
    seed: int = 0,
    tolerance: float = 1e-3,
    window: int = 25,
    class_weight: str = "sqrt",
) -> tuple[torch.Tensor, DenseFit]:
    """A linear 1×1 head on frozen patch-token maps (B×D×h×w) by full-batch Adam on the (weighted) pixel
    cross-entropy, until the loss plateaus or ``steps``; the test class maps (B×H×W) and how it went.

    Tokens are standardised with the training statistics and logits bilinearly upsampled to the mask
    size. ``tolerance=0, class_weight='none', steps=100`` is the fixed-step probe this replaced. The head's
    init is seeded by ``seed``; the fit is full-batch, so the result is deterministic under it.
    """
    mean = train_tokens.mean((0, 2, 3), keepdim=True)
    std = train_tokens.std((0, 2, 3), keepdim=True) + 1e-6
    x_tr, x_te = (train_tokens - mean) / std, (test_tokens - mean) / std
    size = tuple(train_masks.shape[-2:])
    target = train_masks.long()
    weights = class_weights(train_masks, num_classes, ignore_index, class_weight)
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Conv2d(x_tr.shape[1], num_classes, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses: list[float] = []
    converged, change = False, None
    with torch.enable_grad():
        while len(losses) < steps:
            opt.zero_grad()
            logits = F.interpolate(head(x_tr), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore_index)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if tolerance > 0 and len(losses) % window == 0 and len(losses) >= 2 * window:
                change = plateau_change(losses, window)
                if change < tolerance:
                    converged = True
                    break
    with torch.no_grad():
        pred = F.interpolate(head(x_te), size=size, mode="bilinear", align_corners=False).argmax(1)
    if change is None and len(losses) >= 2 * window:
        change = plateau_change(losses, window)
    return pred, DenseFit(len(losses), converged, losses[-1], change, [round(float(w), 4) for w in weights])


def plateau_change(losses: list[float], window: int) -> float:
    """|mean of the last ``window`` losses − mean of the window before| / the latter (full-batch losses are not noisy,
    but Adam oscillates: window means smooth that)."""
    last, prev = np.mean(losses[-window:]), np.mean(losses[-2 * window : -window])
    return float(abs(prev - last) / max(abs(prev), 1e-12))


def score_dense(
    maps: torch.Tensor, masks: torch.Tensor, plan: list[Split], dense: Any, seed: int
) -> dict[tuple[str, float], dict[str, Any]]:
    """Per-evaluation mIoU/Dice and per-repeat, per-image pixel counts (R × N × columns), for the dense probe;
    ``fit``: how the heads were trained (`summarise_fits`)."""
    counts = np.zeros((max(s.repeat for s in plan) + 1, len(masks), 3 * dense.num_classes + 3))
    entry: dict[str, Any] = {"scores": [], "counts": counts, "n_train": [], "seen": np.zeros(len(masks), dtype=bool)}
    fits = []
    for s in plan:
        train, test = torch.from_numpy(s.train), torch.from_numpy(s.test)
        pred, fit = fit_dense_head(
            maps[train],
            masks[train],
            maps[test],
            dense.num_classes,
            dense.steps,
            dense.lr,
            dense.ignore_index,
            seed + s.repeat,
            dense.tolerance,
            dense.window,
            dense.class_weight,
        )
        fits.append(fit)
        c = dense_counts(pred, masks[test], dense.num_classes, dense.ignore_index)
        total = c.sum(0)
        entry["scores"].append({"mIoU": float(miou_from_counts(total)), "dice": float(fg_dice_from_counts(total))})
        counts[s.repeat, s.test] += c
        entry["seen"][s.test] = True
        entry["n_train"].append(len(s.train))
    entry["fit"] = summarise_fits(fits, dense)
    return {("dense", 1.0): entry}
