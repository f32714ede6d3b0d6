"""Reading windows: the tile grid, band reads resampled onto the scene grid, nodata validity, physical scaling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window, from_bounds
from rasterio.windows import bounds as window_bounds

from insitu.domains.base import IGNORE_INDEX, stable_id
from insitu.domains.geotiff.options import PRESETS, RESAMPLING, BandPreset, GeoTiffOptions
from insitu.domains.geotiff.scene import Scene


def scene_windows(scene: Scene, rel: str, options: GeoTiffOptions) -> Iterator[Window]:
    """Grid windows (with overlap, the last row/column flush with the edge) or seeded random ones."""
    size = options.tile_size
    if size is None:
        yield Window(0, 0, scene.width, scene.height)
        return
    th, tw = min(size, scene.height), min(size, scene.width)
    if options.sampling == "random":
        seed = int(stable_id(rel, salt=str(options.seed)), 16) % 2**32
        rng = np.random.default_rng(seed)
        for _ in range(options.tiles_per_scene):
            row = int(rng.integers(0, scene.height - th + 1))
            col = int(rng.integers(0, scene.width - tw + 1))
            yield Window(col, row, tw, th)
        return
    stride = size - options.overlap
    for row in grid_offsets(scene.height, th, stride):
        for col in grid_offsets(scene.width, tw, stride):
            yield Window(col, row, tw, th)


def read_window(scene: Scene, win: Window, options: GeoTiffOptions) -> tuple[np.ndarray, np.ndarray]:
    """(float32 C×h×w in physical units, bool h×w valid) for one window; reads only that window."""
    out_shape = (int(win.height), int(win.width))
    bands, valid = [], np.ones(out_shape, dtype=bool)
    for path, indexes in _group_sources(scene.sources):
        with rasterio.open(path) as src:
            data, ok = _read_source(src, scene, win, indexes, out_shape, options)
        bands.append(data)
        valid &= ok
    image = np.concatenate(bands, axis=0)
    image, ok = _scale(image, options)
    return image, valid & ok & np.isfinite(image).all(axis=0)


def _read_source(
    src: Any, scene: Scene, win: Window, indexes: list[int], out_shape: tuple[int, int], options: GeoTiffOptions
) -> tuple[np.ndarray, np.ndarray]:
    same_grid = src.transform == scene.transform and src.shape == (scene.height, scene.width)
    src_win = win if same_grid else from_bounds(*window_bounds(win, scene.transform), transform=src.transform)
    resampling = RESAMPLING[options.resampling]
    data = src.read(indexes, window=src_win, out_shape=(len(indexes), *out_shape), resampling=resampling).astype(np.float32)
    valid = np.ones(out_shape, dtype=bool)
    if options.nodata is not None and src.nodata is None:
        valid &= (data != options.nodata).all(axis=0)
    elif src.nodata is not None or any({MaskFlags.per_dataset, MaskFlags.alpha} & set(f) for f in src.mask_flag_enums):
        # GDAL masks are 255 = valid, 0 = nodata (numpy masked arrays use the opposite sense)
        masks = src.read_masks(indexes, window=src_win, out_shape=(len(indexes), *out_shape), resampling=Resampling.nearest)
        valid &= (masks > 0).all(axis=0)
    return data, valid


def _scale(image: np.ndarray, options: GeoTiffOptions) -> tuple[np.ndarray, np.ndarray]:
    """``raw * scale + offset``, then 10·log10 for SAR (non-positive power becomes invalid, not -inf)."""
    preset = PRESETS[options.preset] if options.preset else BandPreset(())
    scale = preset.scale if options.scale is None else options.scale
    offset = preset.offset if options.offset is None else options.offset
    to_db = uses_db(options)
    image = image * np.float32(scale) + np.float32(offset) if (scale != 1.0 or offset != 0.0) else image
    valid = np.ones(image.shape[1:], dtype=bool)
    if to_db:
        positive = image > 0
        valid = positive.all(axis=0)
        image = np.where(positive, 10.0 * np.log10(np.where(positive, image, 1.0)), np.nan).astype(np.float32)
    return image, valid


def uses_db(options: GeoTiffOptions) -> bool:
    """Whether values are converted to dB (SAR power), from the options or the preset."""
    preset = PRESETS[options.preset] if options.preset else BandPreset(())
    return preset.to_db if options.to_db is None else options.to_db


def read_labels(scene: Scene, win: Window, options: GeoTiffOptions) -> np.ndarray:
    """uint8 class ids of the window (label nodata -> IGNORE_INDEX), reprojected if configured."""
    assert scene.label_path is not None
    with rasterio.open(scene.label_path) as src:
        if options.label_reproject:
            with WarpedVRT(
                src, crs=scene.crs, transform=scene.transform, width=scene.width, height=scene.height,
                resampling=Resampling.nearest, nodata=IGNORE_INDEX,
            ) as vrt:  # fmt: skip
                return _labels(vrt.read(1, window=win), vrt.nodata)
        return _labels(src.read(1, window=win), src.nodata)


def fill_invalid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by each band's mean over the valid ones (a neutral value, not a fake zero)."""
    if valid.all():
        return np.ascontiguousarray(image, dtype=np.float32)
    if not valid.any():
        raise ValueError("fill_invalid: the tile has no valid pixel to take band means from")
    means = image[:, valid].mean(axis=1)
    out = np.where(valid[None], image, means[:, None, None])
    return np.ascontiguousarray(out, dtype=np.float32)


def grid_offsets(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``length`` with tiles of ``tile`` every ``stride``; the last is flush with the end."""
    if length <= tile:
        return [0]
    offsets = list(range(0, length - tile + 1, stride))
    if offsets[-1] != length - tile:
        offsets.append(length - tile)
    return offsets


def _labels(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    out = arr.astype(np.uint8)
    if nodata is not None:
        out[arr == nodata] = IGNORE_INDEX
    return out


def _group_sources(sources: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """Consecutive bands of one file are read in one call."""
    groups: list[tuple[str, list[int]]] = []
    for path, index in sources:
        if groups and groups[-1][0] == path:
            groups[-1][1].append(index)
        else:
            groups.append((path, [index]))
    return groups


def window_list(win: Window) -> list[int]:
    return [int(win.row_off), int(win.col_off), int(win.height), int(win.width)]


def window_from_list(values: list[int]) -> tuple[int, int, int, int]:
    row, col, height, width = values
    return col, row, width, height


def window_text(win: Window) -> str:
    return f"(row {int(win.row_off)}, col {int(win.col_off)}, {int(win.height)}x{int(win.width)})"
