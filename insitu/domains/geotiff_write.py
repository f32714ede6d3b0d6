"""GeoTIFF writing: tiled whole-scene prediction back to georeferenced class maps, and the demo scenes.

Prediction walks the scene in tile rows and keeps only a rolling buffer one tile high and one scene
wide, so memory is bounded by ``tile_size × scene width × classes``, not by the scene. Overlapping
tiles are blended with tent weights (high in the tile centre, low at its edges) to hide seams.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from insitu.domains.base import IGNORE_INDEX
from insitu.domains.geotiff import DEMO_BANDS, DEMO_CLASSES, GeoTiffDomain, Scene, SceneRef, fill_invalid, grid_offsets

Predictor = Callable[[torch.Tensor], torch.Tensor]


def predict_scene(
    domain: GeoTiffDomain,
    scene: SceneRef | str | Path,
    predict: Predictor,
    out_path: Path,
    num_classes: int,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    probabilities_path: Path | None = None,
    cog: bool = False,
) -> Path:
    """Predict a whole scene tile by tile and write a uint8 class map with the scene's CRS and transform.

    ``predict`` maps one tile (float32 C×h×w in the domain's physical units, nodata filled with the
    band mean) to K×h×w class probabilities (or any scores that may be averaged). Pixels that are
    nodata in the source are ``IGNORE_INDEX`` (255, the class map's nodata value); the optional
    probability raster stores NaN there. ``cog=True`` writes Cloud-Optimized GeoTIFFs.
    """
    ref = scene if isinstance(scene, SceneRef) else SceneRef(str(scene))
    resolved = domain.open_scene(ref)
    size = tile_size or domain.options.tile_size or 256
    step = size - (domain.options.overlap if overlap is None else overlap)
    if not 0 < step <= size:
        raise ValueError(f"overlap must be in [0, tile_size), got tile_size={size}, overlap={size - step}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        class_tmp = Path(tmp) / "classes.tif"
        prob_tmp = Path(tmp) / "probabilities.tif" if probabilities_path else None
        _blend_and_write(domain, resolved, predict, num_classes, size, step, class_tmp, prob_tmp)
        _finish(class_tmp, out_path, cog)
        if prob_tmp is not None and probabilities_path is not None:
            _finish(prob_tmp, Path(probabilities_path), cog)
    return out_path


def _blend_and_write(
    domain: GeoTiffDomain, scene: Scene, predict: Predictor, k: int, size: int, step: int, class_path: Path, prob_path: Path | None
) -> None:
    th, tw = min(size, scene.height), min(size, scene.width)
    acc = np.zeros((k, th, scene.width), dtype=np.float32)
    wsum = np.zeros((th, scene.width), dtype=np.float32)
    valid = np.zeros((th, scene.width), dtype=bool)
    weight = tent_weights(th, tw)
    y0 = 0
    with _open_outputs(scene, k, class_path, prob_path) as (cls_dst, prob_dst):
        for row in grid_offsets(scene.height, th, step):
            if row > y0:  # rows above this tile row are final: write them and roll the buffer
                _flush(acc, wsum, valid, y0, row - y0, cls_dst, prob_dst)
                for buf in (acc, wsum, valid):
                    _roll_up(buf, row - y0)
                y0 = row
            for col in grid_offsets(scene.width, tw, step):
                image, ok = domain.read_window(scene, Window(col, row, tw, th))
                if not ok.any():
                    continue
                scores = _predict_tile(predict, fill_invalid(image, ok), k)
                acc[:, :, col : col + tw] += scores * weight
                wsum[:, col : col + tw] += weight
                valid[:, col : col + tw] |= ok
        _flush(acc, wsum, valid, y0, th, cls_dst, prob_dst)


def _predict_tile(predict: Predictor, image: np.ndarray, k: int) -> np.ndarray:
    with torch.no_grad():
        scores = predict(torch.from_numpy(image))
    scores = scores.detach().float().cpu().numpy()
    if scores.shape != (k, *image.shape[1:]):
        raise ValueError(f"predict returned shape {scores.shape}; expected {(k, *image.shape[1:])} (K×h×w scores)")
    return scores


def tent_weights(height: int, width: int) -> np.ndarray:
    """Blending weights, largest in the tile centre and positive everywhere."""

    def ramp(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        return np.minimum(i + 1, n - i) / math.ceil(n / 2)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


def _roll_up(buf: np.ndarray, rows: int) -> None:
    """Shift the buffer up by ``rows`` (axis -2) and clear the freed bottom rows."""
    buf[..., :-rows, :] = buf[..., rows:, :].copy()
    buf[..., -rows:, :] = 0


def _flush(acc: np.ndarray, wsum: np.ndarray, valid: np.ndarray, y0: int, n: int, cls_dst, prob_dst) -> None:
    n = min(n, cls_dst.height - y0)
    probs = acc[:, :n] / np.maximum(wsum[:n], 1e-12)
    ok = valid[:n] & (wsum[:n] > 0)
    classes = probs.argmax(axis=0).astype(np.uint8)
    classes[~ok] = IGNORE_INDEX
    win = Window(0, y0, cls_dst.width, n)
    cls_dst.write(classes, 1, window=win)
    if prob_dst is not None:
        prob_dst.write(np.where(ok[None], probs, np.nan).astype(np.float32), window=win)


class _open_outputs:
    """Both output rasters on the scene's grid (GTiff, tiled, deflate); closes them together."""

    def __init__(self, scene: Scene, k: int, class_path: Path, prob_path: Path | None) -> None:
        self.args = scene, k, class_path, prob_path
        self.dsts: list = []

    def __enter__(self):
        scene, k, class_path, prob_path = self.args
        profile = {
            "driver": "GTiff",
            "width": scene.width,
            "height": scene.height,
            "crs": scene.crs,
            "transform": scene.transform,
            "compress": "deflate",
        }
        cls_dst = rasterio.open(class_path, "w", count=1, dtype="uint8", nodata=IGNORE_INDEX, **profile)
        self.dsts.append(cls_dst)
        cls_dst.set_band_description(1, "class")
        prob_dst = None
        if prob_path is not None:
            prob_dst = rasterio.open(prob_path, "w", count=k, dtype="float32", nodata=float("nan"), **profile)
            self.dsts.append(prob_dst)
        return cls_dst, prob_dst

    def __exit__(self, *exc: object) -> None:
        for dst in self.dsts:
            dst.close()


def _finish(tmp: Path, out: Path, cog: bool) -> None:
    """Move the written raster into place, as a COG when asked (the COG driver cannot write windows)."""
    if cog:
        rasterio.shutil.copy(str(tmp), str(out), driver="COG", compress="deflate")
    else:
        tmp.replace(out)


# ------------------------------------------------------------------ demo scenes

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
