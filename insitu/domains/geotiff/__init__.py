"""Remote sensing: multispectral GeoTIFF/COG scenes and per-band file sets, read as windowed tiles.

An item is one (scene, window) pair. A scene is either one multi-band GeoTIFF or a set of
single-band files named ``<prefix>_<BAND>.tif`` (Sentinel-2 products, BigEarthNet patches) that are
resampled onto the grid of the finest band. Only the window of an item is ever read, so memory is
bounded by the tile size, not the scene size.

Validity is explicit: ``meta["valid"]`` (bool H×W, True = usable pixel) combines the file's nodata
mask and non-finite values. Invalid pixels of ``image`` are filled with that band's mean over the
tile's valid pixels (never zeros, which are a real reflectance), and when a label raster exists they
are ``IGNORE_INDEX`` in ``mask`` so that losses and metrics skip them.

Modules: ``options`` (options, band presets), ``scene`` (resolving bands, grid and labels),
``read`` (windows, reading, nodata, scaling), ``domain`` (the `GeoTiffDomain`), ``write``
(whole-scene prediction to class maps), ``demo`` (seeded demo scenes).
"""

from __future__ import annotations

from insitu.domains.geotiff.demo import DEMO_BANDS, DEMO_CLASSES
from insitu.domains.geotiff.domain import GeoTiffDomain
from insitu.domains.geotiff.options import GeoTiffError
from insitu.domains.geotiff.read import fill_invalid, grid_offsets
from insitu.domains.geotiff.scene import SceneRef, check_label_alignment

__all__ = [
    "DEMO_BANDS",
    "DEMO_CLASSES",
    "GeoTiffDomain",
    "GeoTiffError",
    "SceneRef",
    "check_label_alignment",
    "fill_invalid",
    "grid_offsets",
]
