"""Demo data: seeded 6-band UTM scenes of four land-cover classes with aligned label rasters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin

from insitu.domains.base import IGNORE_INDEX

DEMO_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
DEMO_CLASSES = ("water", "forest", "cropland", "urban")

# surface reflectance of B02, B03, B04, B08, B11, B12 per class (typical library spectra, rounded)
DEMO_SPECTRA = np.array(
    [
        [0.060, 0.050, 0.030, 0.020, 0.010, 0.005],  # water
        [0.030, 0.050, 0.030, 0.350, 0.150, 0.070],  # forest
        [0.050, 0.080, 0.070, 0.280, 0.220, 0.120],  # cropland
        [0.100, 0.110, 0.120, 0.180, 0.220, 0.200],  # urban
    ],
    dtype=np.float32,
)


def write_demo_scene(path: Path, seed: int, n_tiles: int, size: int) -> Path:
    """A seeded 6-band uint16 scene (reflectance × 10000, nodata 0) with an aligned label raster.

    The scene is a grid of ``size`` blocks; each block is mostly one class (its tile label) with a
    smaller patch of another class, textured and noisy; blocks past ``n_tiles`` are nodata.
    """
    rng = np.random.default_rng(seed)
    cols = math.ceil(math.sqrt(n_tiles))
    rows = math.ceil(n_tiles / cols)
    classes = rng.permutation(np.arange(n_tiles) % len(DEMO_CLASSES))
    image = np.zeros((len(DEMO_BANDS), rows * size, cols * size), dtype=np.uint16)
    labels = np.full((rows * size, cols * size), IGNORE_INDEX, dtype=np.uint8)
    for t, cls in enumerate(classes):
        r, c = divmod(t, cols)
        block, lab = _demo_block(rng, int(cls), size)
        image[:, r * size : (r + 1) * size, c * size : (c + 1) * size] = block
        labels[r * size : (r + 1) * size, c * size : (c + 1) * size] = lab
    crs, transform = CRS.from_epsg(32633), from_origin(404400.0, 5342400.0, 10.0, 10.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    common = {"driver": "GTiff", "width": cols * size, "height": rows * size, "crs": crs, "transform": transform, "compress": "deflate"}
    with rasterio.open(path, "w", count=len(DEMO_BANDS), dtype="uint16", nodata=0, **common) as dst:
        dst.write(image)
        dst.descriptions = DEMO_BANDS
    with rasterio.open(path.with_name(f"{path.stem}_label.tif"), "w", count=1, dtype="uint8", nodata=IGNORE_INDEX, **common) as dst:
        dst.write(labels, 1)
    return path


def _demo_block(rng: np.random.Generator, cls: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One block: main class with a rectangular patch (< 40 % of the area) of another class."""
    lab = np.full((size, size), cls, dtype=np.uint8)
    other = int(rng.integers(len(DEMO_CLASSES) - 1))
    other += other >= cls
    ph, pw = (int(rng.integers(size // 5, size // 2)) for _ in range(2))
    top, left = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
    lab[top : top + ph, left : left + pw] = other
    texture = _smooth(rng, size)
    brightness = rng.uniform(0.8, 1.2)
    refl = DEMO_SPECTRA[lab].transpose(2, 0, 1) * brightness * (0.85 + 0.3 * texture)[None]
    refl += rng.normal(0.0, 0.004, refl.shape)
    return np.clip(refl * 10000, 1, 65535).astype(np.uint16), lab


def _smooth(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """Low-frequency texture in [0, 1] (a coarse random grid, bilinearly upsampled)."""
    grid = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    up = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
    return up[0, 0].numpy()
