"""Per-channel normalisation fitted on training data, serialisable, applied identically at inference."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Normalizer:
    """``(clip(x, lo, hi) - mean) / std`` per channel; ``lo``/``hi`` are robust percentiles."""

    mean: list[float]
    std: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (image.ndim - 1) if image.ndim == 3 else (1, -1, 1, 1)
        x = image
        if self.lo is not None and self.hi is not None:
            lo = torch.tensor(self.lo, dtype=x.dtype).view(shape)
            hi = torch.tensor(self.hi, dtype=x.dtype).view(shape)
            x = torch.maximum(torch.minimum(x, hi), lo)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype).view(shape)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        return cls(list(data["mean"]), list(data["std"]), data.get("lo"), data.get("hi"))

    @classmethod
    def fit(cls, images: Iterable[torch.Tensor], percentiles: tuple[float, float] | None = (0.5, 99.5)) -> Normalizer:
        """Fit from C×H×W images or T×C×H×W clips (a sample of the training set is enough)."""
        flat = [(img.transpose(0, 1) if img.ndim == 4 else img).reshape(img.shape[-3], -1).float() for img in images]
        if not flat:
            raise ValueError("cannot fit a Normalizer on no images")
        values = torch.cat(flat, dim=1)
        if values.shape[1] > 2_000_000:  # quantile needs a bounded sample
            idx = torch.randperm(values.shape[1], generator=torch.Generator().manual_seed(0))[:2_000_000]
            values = values[:, idx]
        # statistics ignore NaN/Inf pixels: one bad image must not poison every input
        values = torch.where(torch.isfinite(values), values, torch.nan)
        lo = hi = None
        if percentiles is not None:
            q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100])
            qs = torch.nanquantile(values, q, dim=1)
            lo, hi = qs[0].tolist(), qs[1].tolist()
            values = torch.maximum(torch.minimum(values, qs[1][:, None]), qs[0][:, None])
        mean = values.nanmean(dim=1)
        std = ((values - mean[:, None]) ** 2).nanmean(dim=1).sqrt().clamp_min(1e-6)
        return cls(mean.tolist(), std.tolist(), lo, hi)
