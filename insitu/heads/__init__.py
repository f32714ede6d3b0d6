"""Downstream heads and probes on the (adapted) backbone's features, registered by name.

``create_head(task, name, in_dim, num_classes, ...)`` is the one entry point: classification and
multilabel heads (``linear``, ``mlp``) take pooled features; segmentation heads (``linear``,
``fpn``) take the intermediate token maps from ``backbone.forward_intermediates``.
"""

from __future__ import annotations

from torch import nn

from insitu.heads.classification import LinearHead, MLPHead, few_shot_accuracy, prototype_logits
from insitu.heads.probe import dense_linear_probe, knn_accuracy, knn_predict, linear_probe_accuracy, linear_probe_predict
from insitu.heads.segmentation import FPNDecoder, LinearSegHead
from insitu.registry import Registry

CLASSIFICATION_HEADS: Registry[nn.Module] = Registry("classification head")
SEGMENTATION_HEADS: Registry[nn.Module] = Registry("segmentation head")
CLASSIFICATION_HEADS.register("linear")(lambda in_dim, k, hidden_dim=256, **_: LinearHead(in_dim, k))
CLASSIFICATION_HEADS.register("mlp")(lambda in_dim, k, hidden_dim=256, **_: MLPHead(in_dim, k, hidden_dim))
SEGMENTATION_HEADS.register("linear")(lambda in_dim, k, **_: LinearSegHead(in_dim, k))
SEGMENTATION_HEADS.register("fpn")(lambda in_dim, k, levels=4, decoder_dim=64, **_: FPNDecoder(in_dim, k, levels, decoder_dim))


def create_head(task: str, name: str, in_dim: int, num_classes: int, **options: int) -> nn.Module:
    """Build the head named ``name`` for ``task`` (classification, multilabel or segmentation)."""
    registry = SEGMENTATION_HEADS if task == "segmentation" else CLASSIFICATION_HEADS
    return registry.get(name)(in_dim, num_classes, **options)


__all__ = [
    "FPNDecoder",
    "LinearHead",
    "LinearSegHead",
    "MLPHead",
    "create_head",
    "dense_linear_probe",
    "few_shot_accuracy",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "linear_probe_predict",
    "prototype_logits",
]
