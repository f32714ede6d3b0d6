"""Reading binary segmentation masks stored as images (Kvasir ``masks/``, BUSI ``busi_masks/``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def read_binary_mask(path: str | Path, size_hw: tuple[int, int], threshold: int = 127) -> torch.Tensor:
    """int64 H×W mask: 1 where the grey level is above ``threshold`` (0/255 masks), resized nearest to ``size_hw``."""
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L").resize((size_hw[1], size_hw[0]), Image.NEAREST))
    return torch.from_numpy((grey > threshold).astype(np.int64))
