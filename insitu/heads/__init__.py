"""Downstream heads and probes on the (adapted) backbone's features, registered by name with
``@CLASSIFICATION_HEADS.register(name)`` / ``@SEGMENTATION_HEADS.register(name)`` (insitu.registry).

``create_head(task, name, in_dim, num_classes, ...)`` is the one entry point: classification and
multilabel heads (``linear``, ``mlp``) take pooled features; segmentation heads (``linear``,
``fpn``, ``upernet``) take the intermediate token maps from ``backbone.forward_intermediates``.
"""

from __future__ import annotations

from torch import nn

from insitu.heads.classification import few_shot_accuracy, prototype_logits
from insitu.heads.probe import knn_accuracy, linear_probe_accuracy
from insitu.registry import CLASSIFICATION_HEADS, SEGMENTATION_HEADS, validated


def head_options(task: str, name: str, offered: dict[str, int]) -> dict[str, int]:
    """The entries of ``offered`` that head ``name`` takes (the run offers its inputs, such as ``levels`` from
    ``downstream.layers``, to whichever head takes them; a config's ``downstream.head.options`` are the head's own)."""
    model = (SEGMENTATION_HEADS if task == "segmentation" else CLASSIFICATION_HEADS).options(name)
    return {k: v for k, v in offered.items() if k in model.model_fields}


def create_head(task: str, name: str, in_dim: int, num_classes: int, **options: int) -> nn.Module:
    """Build the head named ``name`` for ``task`` (classification, multilabel or segmentation) with its own ``options``.

    A key the head does not take, or a value out of its bounds, is a `ConfigError` naming the head (a run config's
    ``downstream.head: {name, options}`` was already checked the same way by `insitu.config`).
    """
    registry = SEGMENTATION_HEADS if task == "segmentation" else CLASSIFICATION_HEADS
    head, model = registry.get(name), registry.options(name)
    own = validated(model, options, "options", f"for {registry.kind} {name!r}")
    return head(in_dim, num_classes, **own.model_dump())


__all__ = [
    "CLASSIFICATION_HEADS",
    "SEGMENTATION_HEADS",
    "create_head",
    "head_options",
    "few_shot_accuracy",
    "knn_accuracy",
    "linear_probe_accuracy",
    "prototype_logits",
]
