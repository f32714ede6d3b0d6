"""Seeded procedural images with learnable structure: textured shapes on textured backgrounds.

Used by the embedded quickstart demo (written to disk as real PNG folders) and by tests. Each
image holds one shape whose class is its outline; texture, colour, size, position and rotation
vary, so the class is only recoverable from shape, not from a colour shortcut.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1))
    xs = np.linspace(0, cells, size)
    i = np.minimum(xs.astype(int), cells - 1)
    t = xs - i
    rows = grid[i] * (1 - t)[:, None] + grid[i + 1] * t[:, None]
    return rows[:, i] * (1 - t)[None, :] + rows[:, i + 1] * t[None, :]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "circle":
        return u**2 + v**2 <= r**2
    if shape == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if shape == "triangle":
        # equilateral triangle pointing up in the rotated frame
        return (v <= r * 0.5) & (v >= -r + np.sqrt(3) * np.abs(u))
    if shape == "cross":
        arm = r * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def make_shape_image(rng: np.random.Generator, label: int, size: int = 64, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 image (H×W×C) and its uint8 mask (0 background, label+1 inside the shape)."""
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, 2)
    mask = _shape_mask(SHAPES[label], size, cx, cy, r, rng.uniform(0, 2 * np.pi))
    background = _smooth_noise(rng, size, int(rng.integers(2, 6)))
    freq, theta = rng.uniform(0.15, 0.6), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    img = np.empty((size, size, channels))
    for ch in range(channels):
        bg_lo, bg_hi = sorted(rng.uniform(0.0, 1.0, 2))
        fg_lo, fg_hi = sorted(rng.uniform(0.0, 1.0, 2))
        bg = bg_lo + (bg_hi - bg_lo) * background
        fg = fg_lo + (fg_hi - fg_lo) * stripes
        img[..., ch] = np.where(mask, fg, bg)
    img += rng.normal(0, 0.03, img.shape)
    out = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return out, (mask * (label + 1)).astype(np.uint8)


def write_shape_folders(
    out_dir: Path,
    seed: int,
    n_per_class: int,
    size: int,
    sidecar: Callable[[str, np.random.Generator], str] | None = None,
) -> None:
    """Textured shapes as PNG class folders ``train/<shape>/`` and ``test/<shape>/`` (half as many).

    ``sidecar(shape, rng)``, when given, writes a ``.txt`` next to every image (image-text demos).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", max(4, n_per_class // 2))):
        for label, shape in enumerate(SHAPES):
            folder = out_dir / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, _ = make_shape_image(rng, label, size)
                Image.fromarray(img).save(folder / f"{shape}_{i:04d}.png")
                if sidecar is not None:
                    (folder / f"{shape}_{i:04d}.txt").write_text(sidecar(shape, rng))
