"""Demo data: seeded frames of a textured shape moving over a textured background."""

from __future__ import annotations

import numpy as np

from insitu.domains.synthetic import SHAPES, shape_mask, smooth_noise


def moving_shape_frames(rng: np.random.Generator, label: int, size: int, n_frames: int = 16) -> np.ndarray:
    """A textured shape drifting and turning over a textured background (T×H×W×3 uint8)."""
    r = rng.uniform(0.2, 0.3) * size
    start = rng.uniform(r, size - r, 2)
    velocity = rng.uniform(-1, 1, 2) * size / (3 * n_frames)
    spin = rng.uniform(-0.1, 0.1)
    angle = rng.uniform(0, 2 * np.pi)
    background = smooth_noise(rng, size, int(rng.integers(2, 6)))
    yy, xx = np.mgrid[0:size, 0:size]
    freq, theta = rng.uniform(0.15, 0.6), rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    bg_lo, bg_hi = np.sort(rng.uniform(0, 1, (2, 3)), axis=0)
    fg_lo, fg_hi = np.sort(rng.uniform(0, 1, (2, 3)), axis=0)
    frames = []
    for t in range(n_frames):
        cx, cy = np.clip(start + velocity * t, r, size - r)
        mask = shape_mask(SHAPES[label], size, cx, cy, r, angle + spin * t)
        bg = bg_lo + (bg_hi - bg_lo) * background[..., None]
        fg = fg_lo + (fg_hi - fg_lo) * stripes[..., None]
        img = np.where(mask[..., None], fg, bg) + rng.normal(0, 0.02, (size, size, 3))
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(frames)
