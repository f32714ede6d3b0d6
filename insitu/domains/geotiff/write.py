"""GeoTIFF writing: tiled whole-scene prediction back to georeferenced class maps.

Prediction walks the scene in tile rows and keeps only a rolling buffer one tile high and one scene
wide, so memory is bounded by ``tile_size × scene width × classes``, not by the scene. Overlapping
tiles are blended with tent weights (high in the tile centre, low at its edges) to hide seams.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.windows import Window

from insitu.domains.base import IGNORE_INDEX
from insitu.domains.geotiff.read import fill_invalid, grid_offsets
from insitu.domains.geotiff.scene import Scene, SceneRef
from insitu.io import atomic_path

if TYPE_CHECKING:  # the domain calls this module (GeoTiffDomain.write_predictions)
    from insitu.domains.base import Predictor as Model
    from insitu.domains.geotiff.domain import GeoTiffDomain

Predictor = Callable[[torch.Tensor], torch.Tensor]


def write_scene_predictions(domain: GeoTiffDomain, model: Model, inputs: Path, out_dir: Path) -> list[Path]:
    """Whole scenes (``inputs``: a scene file or a folder of them) to georeferenced uint8 class maps, ``<stem>_classes.tif``.

    Tiles are the domain's ``tile_size`` when its options set one, else the model's input size, overlapping by a quarter.
    """
    model.require_segmentation("GeoTIFF prediction")
    tile = int((domain.options.tile_size if "tile_size" in domain.options.model_fields_set else None) or model.image_size)
    refs, _ = domain.discover(inputs) if inputs.is_dir() else ([str(inputs)], [])
    written = []
    for ref in refs:
        stem = Path(getattr(ref, "path", ref) or "scene").stem
        dst = out_dir / f"{stem}_classes.tif"
        predict_scene(domain, ref, lambda t: model.predict([t])[0], dst, model.num_classes, tile_size=tile, overlap=tile // 4)
        written.append(dst)
    return written


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
    """Move the written raster into place atomically, as a COG when asked (the COG driver cannot write windows)."""
    with atomic_path(out) as dst:
        if cog:
            rasterio.shutil.copy(str(tmp), str(dst), driver="COG", compress="deflate")
        else:
            tmp.replace(dst)
