"""Options of the dicom domain, its CT window presets and its error type."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from insitu.domains.base import DomainOptions
from insitu.errors import DataError

# HU window presets (centre, width)
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


class DicomError(DataError):
    """A DICOM/NIfTI input cannot be used: bad geometry, a mask that does not fit its image, ..."""


class DicomOptions(DomainOptions):
    """``data.options`` of the dicom domain."""

    sample: Literal["slice", "crop3d"] = "slice"
    plane: Literal["acquisition", "axial", "coronal", "sagittal"] = "acquisition"
    context: int = Field(0, ge=0, description="2.5-D: k neighbouring slices on each side become channels")
    windows: list[str | tuple[float, float]] = Field(default_factory=list, description="CT windows, one channel each; [] keeps HU")
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    normalize: Literal["auto", "none"] = "auto"
    channels: Literal["auto", 1, 3] = "auto"
    crop_size: tuple[int, int, int] = (16, 64, 64)
    crop_spacing: tuple[float, float, float] | None = None
    labels: Literal["none", "folders"] = "none"
    mask_suffix: str = "_seg"
    manifest_paths: Literal["token", "relative"] = "token"
    cache_dir: Path | None = None
    workers: int = Field(4, ge=1)
    pool: Literal["thread", "process"] = "thread"
    salt_env: str = "INSITU_SALT"
