"""Downstream metrics through torchmetrics: one function per task, returning plain floats."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_jaccard_index,
    multilabel_average_precision,
)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall) and one-vs-rest macro AUROC."""
    probs = logits.float().softmax(dim=1)
    target = target.long()
    out = {
        "accuracy": float(multiclass_accuracy(probs, target, num_classes, average="micro")),
        "balanced_accuracy": float(multiclass_accuracy(probs, target, num_classes, average="macro")),
    }
    # AUROC is undefined when the test set holds a single class
    out["auroc"] = float(multiclass_auroc(probs, target, num_classes, average="macro")) if target.unique().numel() > 1 else float("nan")
    return out


def multilabel_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Macro mean average precision over the labels (BigEarthNet-style tags)."""
    probs = logits.float().sigmoid()
    return {"mAP": float(multilabel_average_precision(probs, target.long(), num_labels=target.shape[1], average="macro"))}


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> dict[str, float]:
    """Mean IoU, mean Dice and pixel accuracy over classes, skipping ``ignore_index`` pixels.

    ``pred`` is a class map B×H×W (or logits B×K×H×W). Classes absent from both prediction and
    target are left out of the means (torchmetrics' ``zero_division`` would count them as 0 or 1).
    """
    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(dim=1)
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    miou = multiclass_jaccard_index(p, t, num_classes, average="none", zero_division=float("nan"))
    present = torch.bincount(p, minlength=num_classes)[:num_classes] + torch.bincount(t, minlength=num_classes)[:num_classes] > 0
    dice = 2 * miou / (1 + miou)  # Dice = 2·IoU / (1 + IoU) per class
    return {
        "mIoU": float(miou[present].nanmean()),
        "dice": float(dice[present].nanmean()),
        "pixel_accuracy": float((p == t).float().mean()) if t.numel() else float("nan"),
    }


def dense_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Per-image pixel counts (B × (3K + 3)) from which mIoU and Dice are computed over any set of images.

    Columns: intersection I_k, predicted P_k and target T_k pixels for each class k (3K), then the
    same three for the foreground (every class but 0) as one class. ``ignore_index`` pixels are skipped.
    """
    keep = target != ignore_index
    cols = []
    for k in range(num_classes):
        p, t = (pred == k) & keep, (target == k) & keep
        cols += [(p & t).flatten(1).sum(1), p.flatten(1).sum(1), t.flatten(1).sum(1)]
    p, t = (pred != 0) & keep, (target != 0) & keep
    cols += [(p & t).flatten(1).sum(1), p.flatten(1).sum(1), t.flatten(1).sum(1)]
    return torch.stack(cols, dim=1).double().numpy()


def miou_from_counts(counts: np.ndarray) -> np.ndarray:
    """Mean IoU over the classes present in prediction or target, from ``dense_counts`` summed over images."""
    k = (counts.shape[-1] - 3) // 3
    c = counts[..., : 3 * k].reshape(*counts.shape[:-1], k, 3)
    inter, union = c[..., 0], c[..., 1] + c[..., 2] - c[..., 0]
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    with np.errstate(all="ignore"):
        return np.nanmean(iou, axis=-1)


def fg_dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice of the foreground (all classes but 0 as one) 2I / (P + T), from ``dense_counts`` sums (NaN if empty)."""
    inter, p, t = counts[..., -3], counts[..., -2], counts[..., -1]
    return np.where(p + t > 0, 2 * inter / np.maximum(p + t, 1), np.nan)
