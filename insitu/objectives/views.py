"""View recipes: augmented crops of one normalised C×H×W image, for any number of channels.

Augmentations are chosen to be valid on physical intensities (HU, reflectance, grey levels):
crops, flips, blur and a mild brightness/contrast change in normalised units, and optionally an
independent gain and offset per channel (``channel_jitter``: stain or white-balance differences
between sites, calibration differences between a sensor's bands). No hue rotation, no solarisation.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CROPS = 32  # every crop is one more forward pass per image; more is a typo, not a recipe


class MultiCropOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    global_crops: int = Field(2, ge=1, le=MAX_CROPS)
    local_crops: int = Field(4, ge=0, le=MAX_CROPS)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    local_size_ratio: float = Field(0.5, gt=0, le=1)
    flip: bool = True
    blur_prob: float = Field(0.2, ge=0, le=1)
    intensity: float = Field(0.2, ge=0, allow_inf_nan=False)
    channel_jitter: float = Field(0.0, ge=0, allow_inf_nan=False, description="per-channel gain 1 ± j and offset ± j, normalised units")

    @field_validator("global_crops", "local_crops", mode="before")
    @classmethod
    def _count(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number of crops <= {MAX_CROPS}, not {type(value).__name__} {value!r}")
        return value

    @field_validator("global_scale", "local_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("must be (min, max) crop area fractions with 0 < min <= max <= 1")
        return value


class MultiCrop:
    """``n_global`` crops at ``size`` and ``n_local`` crops at ``size * local_size_ratio``."""

    def __init__(self, size: int, patch_size: int, opts: MultiCropOptions) -> None:
        self.size, self.opts = size, opts
        local = max(patch_size, int(round(size * opts.local_size_ratio / patch_size)) * patch_size)
        self.local_size = local

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        o = self.opts
        views = [self._view(image, self.size, o.global_scale) for _ in range(o.global_crops)]
        views += [self._view(image, self.local_size, o.local_scale) for _ in range(o.local_crops)]
        return views

    def _view(self, image: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], scale)
        x = F.interpolate(
            image[None, :, top : top + h, left : left + w], size=(size, size), mode="bilinear", align_corners=False, antialias=h > size
        )[0]
        if self.opts.flip and random.random() < 0.5:
            x = x.flip(-1)
        if random.random() < self.opts.blur_prob:
            x = gaussian_blur(x, sigma=random.uniform(0.1, 1.5))
        if self.opts.intensity > 0:
            a = 1.0 + random.uniform(-self.opts.intensity, self.opts.intensity)
            b = random.uniform(-self.opts.intensity, self.opts.intensity)
            x = x * a + b
        if self.opts.channel_jitter > 0:
            j = self.opts.channel_jitter
            gain = torch.tensor([1.0 + random.uniform(-j, j) for _ in range(x.shape[0])], dtype=x.dtype).view(-1, 1, 1)
            shift = torch.tensor([random.uniform(-j, j) for _ in range(x.shape[0])], dtype=x.dtype).view(-1, 1, 1)
            x = x * gain + shift
        return x


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a C×H×W tensor, channel by channel (the kernel follows x's device and dtype)."""
    radius = max(1, int(3 * sigma))
    # on x's device: GLARE blurs whole batches on the training device, not only CPU data-loader views
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: resize a C×H×W image to size×size."""
    if image.shape[-2:] == (size, size):
        return image
    down = image.shape[-1] > size
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=down)[0]
