"""Demo data: seeded endoscope-like clips of four mucosa appearances, and moving textured shapes (tests)."""

from __future__ import annotations

import numpy as np

from insitu.domains.synthetic import SHAPES, TISSUE_CLASSES, shape_mask, smooth_noise, tissue_texture


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


# ---------------------------------------------------------------- the video quickstart's clips

MUCOSA = ("normal", "inflamed", "bile_stained", "pale")
# mean RGB per appearance; the four share every texture, so colour carries the class
MUCOSA_COLOURS = np.array([(0.80, 0.50, 0.46), (0.70, 0.18, 0.18), (0.56, 0.60, 0.26), (0.74, 0.74, 0.70)])


def mucosa_frames(rng: np.random.Generator, label: int, size: int, n_frames: int = 16) -> np.ndarray:
    """An endoscope-like clip (T×H×W×3 uint8): the camera pans across mucosa of appearance ``label``.

    The colour is the class's (jittered ±15 % per channel and clip); the texture, one of the four
    tissue textures, is drawn independently of the class; a vignette (the scope's light falls off
    toward the edge), a per-clip illumination gain (0.7-1.2) and sensor noise vary per clip."""
    canvas = 2 * size
    texture = tissue_texture(rng, int(rng.integers(len(TISSUE_CLASSES))), canvas)
    field = 0.8 + 0.4 * smooth_noise(rng, canvas, int(rng.integers(2, 5)))
    colour = MUCOSA_COLOURS[label] * rng.uniform(0.85, 1.15, 3)
    tissue = colour[None, None] * (field * (0.7 + 0.6 * texture))[..., None]
    yy, xx = (np.mgrid[0:size, 0:size] - (size - 1) / 2) / (size / 2)
    vignette = np.clip(1.15 - 0.45 * (xx**2 + yy**2), 0.3, 1)[..., None] * rng.uniform(0.7, 1.2)
    start, end = rng.uniform(0, size, (2, 2))
    frames = []
    for t in range(n_frames):
        y, x = (start + (end - start) * t / max(1, n_frames - 1)).round().astype(int)
        img = tissue[y : y + size, x : x + size] * vignette + rng.normal(0, 0.015, (size, size, 3))
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(frames)
