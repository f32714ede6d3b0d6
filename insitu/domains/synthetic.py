"""Seeded procedural images with learnable structure, written to disk in real formats.

- Textured shapes on textured backgrounds (the image-text, video and downstream demos, tests): each
  image holds one shape whose class is its outline; texture, colour, size, position and rotation
  vary, so the class is only recoverable from shape, not from a colour shortcut.
- Aerial land-cover tiles (the embedded quickstart, `write_land_cover_folders`): four classes that
  differ in colour, not texture, under per-tile illumination and haze (docs/quickstart.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((cells + 1, cells + 1))
    xs = np.linspace(0, cells, size)
    i = np.minimum(xs.astype(int), cells - 1)
    t = xs - i
    rows = grid[i] * (1 - t)[:, None] + grid[i + 1] * t[:, None]
    return rows[:, i] * (1 - t)[None, :] + rows[:, i + 1] * t[None, :]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
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
    mask = shape_mask(SHAPES[label], size, cx, cy, r, rng.uniform(0, 2 * np.pi))
    background = smooth_noise(rng, size, int(rng.integers(2, 6)))
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


def write_shape_pairs(root: Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Generated segmentation data in the Kvasir layout (``images/`` + ``masks/`` PNGs, mask 255 = shape).

    For trying segmentation heads without data of your own; read it with ``domain: video``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (Path(root) / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = make_shape_image(rng, i % len(SHAPES), size)
        Image.fromarray(img).save(Path(root) / "images" / f"shape_{i:04d}.png")
        Image.fromarray(((mask > 0) * 255).astype(np.uint8)).save(Path(root) / "masks" / f"shape_{i:04d}.png")
    return Path(root)


# ---------------------------------------------------------------- the land-cover demo

TISSUE_CLASSES = ("speckled", "striated", "nodular", "reticular")  # texture families (shared by every land-cover class)
LAND_COVER = ("water", "forest", "crops", "bare_soil")
# mean RGB reflectance-like colour per class; water/forest and crops/bare soil pair up in brightness,
# so a probe that sees brightness but not hue gets about half of them right
LAND_COLOURS = np.array([(0.12, 0.22, 0.30), (0.13, 0.26, 0.12), (0.36, 0.44, 0.18), (0.44, 0.35, 0.26)])


def tissue_texture(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A [0, 1] texture of tissue class ``label`` with random scale, orientation, density and contrast."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    name = TISSUE_CLASSES[label]
    if name == "speckled":  # isotropic fine grain
        t = smooth_noise(rng, size, int(rng.integers(size // 5, size // 3)))
    elif name == "striated":  # parallel fibres, gently wavy
        period = rng.uniform(4, 8)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (u + 2 * np.sin(v / rng.uniform(6, 12))) / period)
    elif name == "nodular":  # scattered round nodules
        t = np.zeros((size, size))
        for _ in range(int(rng.integers(6, 14))):
            cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.5, 3.5)
            t = np.maximum(t, np.clip(1 - np.hypot(xx - cx, yy - cy) / r, 0, 1) ** 0.5)
    else:  # reticular: a fine network of crossing lines
        period = rng.uniform(5, 9)
        t = np.maximum(np.abs(np.sin(np.pi * u / period)), np.abs(np.sin(np.pi * v / period))) ** 8
    return t


def land_cover_tile(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One RGB tile in [0, 1] (3×H×W) of land-cover class ``label``.

    The class sets the colour (jittered ±15 % per channel and tile); the texture is one of the four
    tissue textures drawn independently of the class, under a smooth brightness field, a per-tile
    illumination gain (0.7-1.3), haze (an offset up to 0.08) and sensor noise."""
    texture = tissue_texture(rng, int(rng.integers(len(TISSUE_CLASSES))), size)
    colour = LAND_COLOURS[label] * rng.uniform(0.85, 1.15, 3)
    field = 0.8 + 0.4 * smooth_noise(rng, size, int(rng.integers(2, 5)))
    img = colour[:, None, None] * field[None] * (0.75 + 0.5 * texture[None])
    img = img * rng.uniform(0.7, 1.3) + rng.uniform(0, 0.08)
    return np.clip(img + rng.normal(0, 0.015, img.shape), 0, 1)


def write_land_cover_folders(out_dir: Path, seed: int, n_per_class: int, size: int) -> None:
    """Land-cover tiles as 8-bit RGB PNG class folders ``train/<class>/`` and ``test/<class>/`` (as many each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for label, name in enumerate(LAND_COVER):
            folder = out_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                rgb = land_cover_tile(rng, label, size).transpose(1, 2, 0)
                Image.fromarray((rgb * 255).round().astype(np.uint8)).save(folder / f"{name}_{i:04d}.png")
