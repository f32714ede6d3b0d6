"""Seeded writers of tiny real GeoTIFFs (real CRS and transform, written through rasterio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

UTM33 = "EPSG:32633"
ORIGIN = (404400.0, 5342400.0)


def write_scene(
    path: Path,
    *,
    bands: int = 4,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
    nodata: float | None = 0,
    border: int = 0,
    crs: str = UTM33,
    pixel: float = 10.0,
    dtype: str = "uint16",
    descriptions: list[str] | None = None,
    tiled: bool = False,
) -> Path:
    """A multi-band scene of values 100..5000 (band b offset by 1000·b), ``border`` nodata pixels on the left."""
    rng = np.random.default_rng(seed)
    data = (rng.integers(100, 5000, (bands, height, width)) + 1000 * np.arange(bands)[:, None, None]).astype(dtype)
    if border:
        data[:, :, :border] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"} if tiled else {}
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=bands, dtype=dtype, nodata=nodata,
        crs=crs, transform=from_origin(*ORIGIN, pixel, pixel), **layout,
    ) as dst:  # fmt: skip
        dst.write(data)
        if descriptions:
            dst.descriptions = tuple(descriptions)
    return path


def write_labels(
    path: Path, *, height: int = 48, width: int = 64, classes: int = 3, seed: int = 0, crs: str = UTM33, shift: float = 0.0
) -> Path:
    """A uint8 class raster (nodata 255 in the top row); ``crs``/``shift`` make it misaligned on purpose."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, (height, width)).astype(np.uint8)
    labels[0] = 255
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8", nodata=255,
        crs=crs, transform=from_origin(ORIGIN[0] + shift, ORIGIN[1], 10.0, 10.0),
    ) as dst:  # fmt: skip
        dst.write(labels, 1)
    return path


def write_band_set(
    folder: Path, prefix: str, resolutions: dict[str, int], *, size_10m: int = 24, seed: int = 0, dtype: str = "uint16"
) -> Path:
    """One single-band file per band, ``<prefix>_<BAND>.tif``, at 10/20/60 m over the same footprint."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for band, res in resolutions.items():
        n = size_10m * 10 // res
        data = rng.integers(100, 5000, (n, n)).astype(dtype)
        with rasterio.open(
            folder / f"{prefix}_{band}.tif", "w", driver="GTiff", width=n, height=n, count=1, dtype=dtype,
            crs=UTM33, transform=from_origin(*ORIGIN, res, res),
        ) as dst:  # fmt: skip
            dst.write(data, 1)
    return folder


def corrupt_block(path: Path, block_row: int, block_col: int) -> None:
    """Overwrite one compressed tile's bytes so the file opens but that block fails to decode."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{block_col}_{block_row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{block_col}_{block_row}", "TIFF", bidx=1))
    raw = bytearray(path.read_bytes())
    raw[offset : offset + size] = b"\xab" * size
    path.write_bytes(bytes(raw))
