"""The dense probe: a linear 1×1 head on patch tokens, scored by mIoU and foreground Dice over the
same repeated folds as the classification probe, adapted − frozen with paired CIs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from insitu.config import RunConfig
from insitu.domains import ManifestItem
from insitu.errors import DataError
from insitu.heads.metrics import dense_counts, fg_dice_from_counts, miou_from_counts
from insitu.heads.probe import dense_linear_probe
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


def dense_results(cfg: RunConfig, models: list[Model], stored: list[Stored] | None = None) -> dict[str, list[ProbeResult]]:
    """The dense probe per model: mIoU and foreground Dice over the same folds, adapted − frozen with CIs.

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
    plan = evaluation_plan(labels, groups, cfg.probe, cfg.seed, fixed, fractions=[1.0], classify=False)
    scored = {}
    for m in models:
        maps = torch.cat([p[0] for p in per_model[m.name]])
        masks = torch.cat([p[1] for p in per_model[m.name]])
        scored[m.name] = score_dense(maps, masks, plan, dense, cfg.seed)
    metrics = {"dense": {"mIoU": miou_from_counts, "dice": fg_dice_from_counts}}
    return summarise(scored, metrics, groups, cfg.probe, cfg.seed, items=[f"{side}:{i}" for side, i in ids])


def score_dense(
    maps: torch.Tensor, masks: torch.Tensor, plan: list[Split], dense: Any, seed: int
) -> dict[tuple[str, float], dict[str, Any]]:
    """Per-evaluation mIoU/Dice and per-repeat, per-image pixel counts (R × N × columns), for the dense probe."""
    counts = np.zeros((max(s.repeat for s in plan) + 1, len(masks), 3 * dense.num_classes + 3))
    entry: dict[str, Any] = {"scores": [], "counts": counts, "n_train": [], "seen": np.zeros(len(masks), dtype=bool)}
    for s in plan:
        train, test = torch.from_numpy(s.train), torch.from_numpy(s.test)
        pred = dense_linear_probe(
            maps[train], masks[train], maps[test], dense.num_classes, dense.steps, dense.lr, dense.ignore_index, seed + s.repeat
        )
        c = dense_counts(pred, masks[test], dense.num_classes, dense.ignore_index)
        total = c.sum(0)
        entry["scores"].append({"mIoU": float(miou_from_counts(total)), "dice": float(fg_dice_from_counts(total))})
        counts[s.repeat, s.test] += c
        entry["seen"][s.test] = True
        entry["n_train"].append(len(s.train))
    return {("dense", 1.0): entry}
