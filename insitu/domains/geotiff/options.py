"""Options of the geotiff domain, the sensor band presets, the files it reads, and its error type."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import model_validator
from rasterio.enums import Resampling

from insitu.domains.base import DomainOptions
from insitu.errors import DataError

SUFFIXES = (".tif", ".tiff")
BAND_FILE = re.compile(r"^(?P<prefix>.+)_(?P<band>B\d{1,2}A?|VV|VH|HH|HV)$", re.IGNORECASE)
RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear, "cubic": Resampling.cubic, "average": Resampling.average}


class GeoTiffError(DataError):
    """A GeoTIFF scene cannot be used as configured (missing band, misaligned labels, bad read)."""


@dataclass(frozen=True)
class BandPreset:
    """Band names of a sensor product in their conventional order, and its physical scaling."""

    bands: tuple[str, ...]
    scale: float = 1.0
    offset: float = 0.0
    to_db: bool = False


_S2 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_LANDSAT_SR = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")
PRESETS: dict[str, BandPreset] = {
    # L1C/L2A digital numbers are reflectance x 10000 (products from baseline 04.00 also need offset -0.1)
    "sentinel2_l1c": BandPreset(_S2, scale=1e-4),
    "sentinel2_l2a": BandPreset(tuple(b for b in _S2 if b != "B10"), scale=1e-4),
    # Collection 2 Level-2 surface reflectance: DN * 2.75e-5 - 0.2
    "landsat8": BandPreset(_LANDSAT_SR, scale=2.75e-5, offset=-0.2),
    "landsat9": BandPreset(_LANDSAT_SR, scale=2.75e-5, offset=-0.2),
    # GRD backscatter is linear power; models see it in dB
    "sentinel1": BandPreset(("VV", "VH"), to_db=True),
    # backscatter already in dB (BigEarthNet S1 patches)
    "sentinel1_db": BandPreset(("VV", "VH")),
    "rgb": BandPreset(("red", "green", "blue")),
}


class GeoTiffOptions(DomainOptions):
    """``data.options`` of the geotiff domain (see `GeoTiffDomain`)."""

    preset: str | None = None
    band_names: list[str] | None = None
    bands: list[str] | None = None
    layout: Literal["auto", "multiband", "band_files"] = "auto"
    tile_size: int | None = 64
    overlap: int = 0
    sampling: Literal["grid", "random"] = "grid"
    tiles_per_scene: int = 16
    max_nodata_fraction: float = 0.5
    nodata: float | None = None
    scale: float | None = None
    offset: float | None = None
    to_db: bool | None = None
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    labels: Literal["auto", "none", "raster", "bigearthnet", "folders"] = "auto"
    label_suffix: str = "_label"
    label_reproject: bool = False
    tile_label: Literal["majority", "none"] = "majority"
    class_names: list[str] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> GeoTiffOptions:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.preset and self.bands:
            unknown = [b for b in self.bands if b not in PRESETS[self.preset].bands]
            if unknown:
                raise ValueError(f"bands {unknown} are not in preset {self.preset!r} ({', '.join(PRESETS[self.preset].bands)})")
        if self.tile_size is not None and self.tile_size <= 0:
            raise ValueError("tile_size must be positive (or null for one window per scene)")
        if self.tile_size is not None and not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {self.overlap}")
        if not 0.0 <= self.max_nodata_fraction < 1.0:
            raise ValueError("max_nodata_fraction must be in [0, 1): a tile needs at least one valid pixel")
        return self
