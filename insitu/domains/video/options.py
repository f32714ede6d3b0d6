"""Options of the video domain, the file kinds it reads, and its error type."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from insitu.domains.base import DomainOptions
from insitu.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class VideoError(DataError):
    """A video cannot be used: empty, unsupported codec, truncated, or inconsistent annotations."""


class VideoOptions(DomainOptions):
    mode: Literal["frames", "clips"] = "frames"
    fps: float = Field(1.0, gt=0)
    max_frames_per_video: int | None = Field(None, gt=0)
    clip_frames: int = Field(16, gt=0)
    stride: int = Field(1, gt=0)
    clip_step: int | None = Field(None, gt=0)
    decode_size: int = Field(128, gt=0)
    crop_fov: bool = True
    fov_threshold: int = Field(20, ge=0, le=255)
    text_boxes: list[tuple[float, float, float, float]] = Field(default_factory=list)
    labels: Literal["auto", "phases", "folders", "none"] = "auto"
    phases: list[str] | None = None
    frames_fps: float = Field(25.0, gt=0)
    source_weights: dict[str, float] | None = None
    cache_mb: int = Field(1024, ge=0)
    mask_threshold: int = Field(127, ge=0, le=255)
