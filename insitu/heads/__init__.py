"""Downstream heads and probes on the (adapted) backbone's features."""

from insitu.heads.probe import knn_accuracy, linear_probe_accuracy

__all__ = ["knn_accuracy", "linear_probe_accuracy"]
