"""Frame preparation: on-screen text masking, field-of-view detection, downsizing."""

from __future__ import annotations

import numpy as np
from PIL import Image


def mask_text(frame: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Black out on-screen text regions given as fractional ``(x0, y0, x1, y1)`` boxes."""
    if not boxes:
        return frame
    out = frame.copy()
    h, w = frame.shape[:2]
    for x0, y0, x1, y1 in boxes:
        out[int(y0 * h) : int(np.ceil(y1 * h)), int(x0 * w) : int(np.ceil(x1 * w))] = 0
    return out


def detect_fov(frame: np.ndarray, threshold: int = 20, min_fraction: float = 0.02) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the field of view: rows/columns with enough pixels above ``threshold``.

    Endoscope images sit in a black border or a circular mask; cropping to the lit region's
    bounding box removes the border (the circle's corners stay, which the model learns to ignore).
    """
    bright = frame.max(axis=-1) > threshold if frame.ndim == 3 else frame > threshold
    rows = np.flatnonzero(bright.mean(axis=1) > min_fraction)
    cols = np.flatnonzero(bright.mean(axis=0) > min_fraction)
    h, w = bright.shape
    if len(rows) < h // 8 or len(cols) < w // 8:
        return 0, 0, h, w  # a dark first frame: keep everything rather than crop to noise
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def downsize(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is at most ``size`` (never upsample: the model's resize does that)."""
    h, w = frame.shape[:2]
    if min(h, w) <= size:
        return np.array(frame)  # a writable copy: PIL/PyAV buffers are read-only
    scale = size / min(h, w)
    im = Image.fromarray(frame).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return np.array(im)
