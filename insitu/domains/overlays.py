"""Overlays a person can look at: predicted masks tinted over the image, saved as PNG.

The images domain's prediction output (`ImageFolderDomain.write_predictions`) and `insitu evaluate`'s figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from insitu.domains.base import IGNORE_INDEX

PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]], np.float32
)


def to_rgb_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C×H×W float image (any range) as H×W×3 uint8 for display: min-max scaled, first 3 channels or grey."""
    x = torch.as_tensor(image).float()
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / max(hi - lo, 1e-6)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay_mask(rgb: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Tint each non-background class (ids 1.., ignore 255 left untouched) over an H×W×3 uint8 image."""
    img = rgb.astype(np.float32).copy()
    classes = np.asarray(classes)
    on = (classes > 0) & (classes != IGNORE_INDEX)
    colours = PALETTE[1:][(classes[on] - 1) % (len(PALETTE) - 1)]
    img[on] = (1 - alpha) * img[on] + alpha * colours
    return img.round().astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write an H×W (uint8 ids) or H×W×3 array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path
