"""Classification heads on pooled backbone features, and the non-parametric few-shot prototypes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from insitu.registry import CLASSIFICATION_HEADS


@CLASSIFICATION_HEADS.register("linear")
class LinearHead(nn.Module):
    """One linear layer on pooled features (CLS and mean patch token, concatenated)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


class MLPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_dim: int = Field(256, gt=0)


@CLASSIFICATION_HEADS.register("mlp")
class MLPHead(nn.Module):
    """Two-layer MLP with GELU and dropout, for when a linear boundary is not enough."""

    Options = MLPOptions

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def prototype_logits(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cosine similarity of each query to each class's mean support embedding (ProtoNet-style)."""
    support = F.normalize(support_x.float(), dim=1)
    protos = torch.zeros(num_classes, support.shape[1])
    protos.index_add_(0, support_y.long(), support)
    return F.normalize(query_x.float(), dim=1) @ F.normalize(protos, dim=1).T


def few_shot_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, shots: int, episodes: int = 20, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) accuracy of prototype classification with ``shots`` support items per class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y_train)
    accs = []
    for _ in range(episodes):
        idx = np.concatenate(
            [rng.choice(np.flatnonzero(y_train == c), min(shots, int((y_train == c).sum())), replace=False) for c in classes]
        )
        logits = prototype_logits(
            torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx]), torch.from_numpy(x_test), int(classes.max()) + 1
        )
        accs.append(float((logits.argmax(1).numpy() == y_test).mean()))
    return float(np.mean(accs)), float(np.std(accs))
