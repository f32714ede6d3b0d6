"""Frozen-feature probes: logistic-regression linear probe and cosine kNN (DINO-style voting)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def linear_probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float = 1.0) -> float:
    """Standardise features, fit multinomial logistic regression, return test accuracy."""
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


def knn_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int = 20, temperature: float = 0.07
) -> float:
    """Weighted kNN on cosine similarity: each of the k neighbours votes exp(sim / T) for its label."""
    train = F.normalize(torch.from_numpy(x_train).float(), dim=1)
    test = F.normalize(torch.from_numpy(x_test).float(), dim=1)
    labels = torch.from_numpy(y_train).long()
    n_classes = int(max(labels.max().item(), int(y_test.max())) + 1)
    k = min(k, len(train))
    sims, idx = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), n_classes)
    votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
    return float((votes.argmax(1).numpy() == y_test).mean())
