"""Frozen-feature probes: logistic-regression linear probe, cosine kNN (DINO-style voting; on raw or
standardised features), a dense linear 1×1 probe on patch tokens, and the label-free PCA whitening
the probe's baseline row applies."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def linear_probe_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Standardise features, fit multinomial logistic regression, return the test predictions."""
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(scaler.transform(x_train), y_train)
    return clf.predict(scaler.transform(x_test))


def linear_probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float = 1.0) -> float:
    """Test accuracy of ``linear_probe_predict``."""
    return float((linear_probe_predict(x_train, y_train, x_test, c) == y_test).mean())


def effective_k(knn_k: int, train_labels: np.ndarray) -> int:
    """``knn_k`` capped at the smallest class's count among the labelled training items.

    With 4 labels per class and k = 10, at least 6 of every test item's neighbours belong to other
    classes whatever the features are; the cap keeps a few-label kNN a nearest-neighbour vote."""
    counts = np.unique(train_labels, return_counts=True)[1]
    return max(1, min(knn_k, int(counts.min()) if len(counts) else knn_k))


def standardise_features(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides centred and scaled per feature by the *training* mean and std (ddof 0) + 1e-6."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mean) / std, (x_test - mean) / std


def pca_whiten(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides PCA-whitened with the training side's statistics: min(n_train − 1, dim) components.

    As sklearn's ``PCA(whiten=True)`` fitted on ``x_train``: centre by the training mean, project
    on the principal axes and divide each by its training standard deviation (ddof 1), so the
    training features have identity covariance. Axes with no training variance (< 1e-9 of the
    largest) are dropped rather than divided by zero."""
    x_tr, x_te = np.asarray(x_train, dtype=np.float64), np.asarray(x_test, dtype=np.float64)
    mean = x_tr.mean(0)
    _, s, vt = np.linalg.svd(x_tr - mean, full_matrices=False)
    n = min(len(x_tr) - 1, x_tr.shape[1])
    keep = s[:n] > 1e-9 * (s[0] if len(s) else 0.0)
    if not keep.any():
        raise ValueError(f"PCA whitening needs at least 2 distinct training items, got {len(x_tr)}")
    s, vt = s[:n][keep], vt[:n][keep]
    scale = s / np.sqrt(len(x_tr) - 1)
    return ((x_tr - mean) @ vt.T / scale).astype(np.float32), ((x_te - mean) @ vt.T / scale).astype(np.float32)


def knn_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int = 20, temperature: float = 0.07, standardise: bool = False
) -> np.ndarray:
    """Weighted kNN on cosine similarity: each of the k neighbours votes exp(sim / T) for its label;
    k is capped at the smallest class's count in ``y_train`` (``effective_k``). ``standardise``:
    features are first standardised with the training side's mean and std (`standardise_features`),
    so no single large or offset dimension dominates the cosine."""
    if standardise:
        x_train, x_test = standardise_features(x_train, x_test)
    train = F.normalize(torch.from_numpy(np.ascontiguousarray(x_train)).float(), dim=1)
    test = F.normalize(torch.from_numpy(np.ascontiguousarray(x_test)).float(), dim=1)
    labels = torch.from_numpy(y_train).long()
    n_classes = int(labels.max().item()) + 1
    k = min(effective_k(k, y_train), len(train))
    sims, idx = (test @ train.T).topk(k, dim=1)
    votes = torch.zeros(len(test), n_classes)
    votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
    return votes.argmax(1).numpy()


def knn_accuracy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    standardise: bool = False,
) -> float:
    """Test accuracy of ``knn_predict``."""
    return float((knn_predict(x_train, y_train, x_test, k, temperature, standardise) == y_test).mean())
