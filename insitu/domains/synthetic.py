"""Seeded procedural images with learnable structure, written to disk in real formats.

- Textured shapes on textured backgrounds (the image-text, video and downstream demos, tests): each
  image holds one shape whose class is its outline; texture, colour, size, position and rotation
  vary, so the class is only recoverable from shape, not from a colour shortcut.
- Grey tissue scans (the embedded quickstart, `write_scanner_folders`): four texture classes seen
  through seeded scanner settings that do not depend on the class (docs/quickstart.md).
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


# ---------------------------------------------------------------- the scanner-shift demo

TISSUE_CLASSES = ("speckled", "striated", "nodular", "reticular")


def scanner_settings(rng: np.random.Generator, n_scanners: int) -> list[dict[str, float]]:
    """``n_scanners`` acquisition settings: gain, offset, gamma, bias field, blur and noise.

    These are the nuisances a site's scanners add to every image; they do not depend on the class.
    """
    return [
        {
            "gain": float(rng.uniform(0.6, 1.0)),
            "offset": float(rng.uniform(0.0, 0.2)),
            "gamma": float(np.exp(rng.uniform(np.log(0.75), np.log(1.33)))),
            "bias": float(rng.uniform(0.0, 0.3)),  # amplitude of a smooth multiplicative bias field
            "blur": float(rng.uniform(0.0, 0.6)),
            "noise": float(rng.uniform(0.01, 0.04)),
        }
        for _ in range(n_scanners)
    ]


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


def make_scan_image(rng: np.random.Generator, label: int, size: int, scanner: dict[str, float]) -> np.ndarray:
    """One grey scan in [0, 1] (H×W): tissue of class ``label`` on a smooth background, seen through
    ``scanner``'s gain, offset, gamma, bias field, blur and noise (each jittered per image)."""
    background = 0.3 + 0.3 * smooth_noise(rng, size, int(rng.integers(2, 5)))
    img = np.clip(background + rng.uniform(0.15, 0.35) * tissue_texture(rng, label, size), 0, 1)
    jitter = rng.uniform(0.9, 1.1, 4)
    bias = 1 + scanner["bias"] * jitter[0] * (smooth_noise(rng, size, 2) - 0.5) * 2
    img = np.clip(img * bias, 0, 1) ** (scanner["gamma"] * jitter[1])
    img = scanner["offset"] * jitter[2] + scanner["gain"] * jitter[3] * img
    if scanner["blur"] > 0.05:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, scanner["blur"])
    img = img + rng.normal(0, scanner["noise"], img.shape)
    return np.clip(img, 0, 1)


def write_scanner_folders(out_dir: Path, seed: int, n_per_class: int, size: int, n_scanners: int = 4) -> list[dict[str, float]]:
    """Tissue scans as 16-bit grey PNG class folders ``train/<class>/`` and ``test/<class>/`` (as many each).

    Every image comes from one of ``n_scanners`` seeded scanner settings (the file name carries the
    scanner, as a site's export would); returns the settings.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    scanners = scanner_settings(rng, n_scanners)
    for split in ("train", "test"):
        for label, shape in enumerate(TISSUE_CLASSES):
            folder = out_dir / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                s = int(rng.integers(n_scanners))
                img = make_scan_image(rng, label, size, scanners[s])
                Image.fromarray((img * 65535).round().astype(np.uint16)).save(folder / f"scanner{s}_{shape}_{i:04d}.png")
    return scanners
