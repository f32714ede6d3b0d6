"""View recipes: augmented crops of one normalised C×H×W image, for any number of channels.

Augmentations are chosen to be valid on physical intensities (HU, reflectance, grey levels):
crops, flips, blur and a mild brightness/contrast change in normalised units, and optionally an
independent gain and offset per channel (``channel_jitter``: stain or white-balance differences
between sites, calibration differences between a sensor's bands). No hue rotation, no solarisation.
The ops are written once in `insitu.objectives.augment`; a recipe here draws from its own generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from insitu.errors import ConfigError
from insitu.objectives import augment as aug
from insitu.objectives.augment import ViewRecipe

MAX_CROPS = 32  # every crop is one more forward pass per image; more is a typo, not a recipe
BLUR_SIGMA = (0.1, 1.5)  # σ range of the random blur, in pixels of the resized view


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
    # build the views from whole batches on the training device (GPU batch augmentation): the loader
    # only decodes, normalises and resizes to data.image_size, and crops are cut from that image
    device: bool = False

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


class MultiCrop(ViewRecipe):
    """``n_global`` crops at ``size`` and ``n_local`` crops at ``size * local_size_ratio``."""

    def __init__(self, size: int, patch_size: int, opts: MultiCropOptions, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        self.size, self.opts = size, opts
        local = max(patch_size, int(round(size * opts.local_size_ratio / patch_size)) * patch_size)
        self.local_size = local

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        o = self.opts
        if o.device:
            raise ConfigError(
                "views.device: true builds views from whole batches on the training device, but this objective asked for "
                "them one image at a time (it wraps its views, e.g. self_distill); set views.device: false."
            )
        views = [self._view(image, self.size, o.global_scale) for _ in range(o.global_crops)]
        views += [self._view(image, self.local_size, o.local_scale) for _ in range(o.local_crops)]
        return views

    def batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The same recipe for a whole batch (B×C×H×W, on any device): one list of B×C×s×s views.

        Every random draw is per image, from this recipe's generator (on the CPU), in one order:
        crop boxes, flips, blur, intensity, channel jitter; the pixel work runs batched on the images' device."""
        o = self.opts
        views = [self._views(images, self.size, o.global_scale) for _ in range(o.global_crops)]
        views += [self._views(images, self.local_size, o.local_scale) for _ in range(o.local_crops)]
        return views

    def _views(self, images: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        o, g, n = self.opts, self.generator, images.shape[0]
        boxes = [aug.crop_box(images.shape[-2], images.shape[-1], scale, g) for _ in range(n)]
        x = aug.resized_crops(images, boxes, size)
        if o.flip:
            x, _ = aug.random_flip(x, g, batch_dims=1)
        blurred = aug.uniform(0.0, 1.0, g, (n,)) < o.blur_prob
        sigma = torch.where(blurred, aug.uniform(*BLUR_SIGMA, g, (n,)), torch.zeros(n))
        if blurred.any():
            x = aug.gaussian_blur_each(x, sigma, max(1, int(3 * BLUR_SIGMA[1])))
        if o.intensity > 0:
            x = aug.gain_offset(x, o.intensity, g, batch_dims=1)
        if o.channel_jitter > 0:
            x = aug.channel_jitter(x, o.channel_jitter, g, batch_dims=1)
        return x

    def _view(self, image: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        o, g = self.opts, self.generator
        x, _ = aug.random_resized_crop(image, size, scale, g)
        if o.flip:
            x, _ = aug.random_flip(x, g)
        x, _ = aug.random_blur(x, o.blur_prob, BLUR_SIGMA, g)
        if o.intensity > 0:
            x = aug.gain_offset(x, o.intensity, g)
        if o.channel_jitter > 0:
            x = aug.channel_jitter(x, o.channel_jitter, g)
        return x


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect in ``ratio`` (`augment.crop_box`)."""
    return aug.crop_box(height, width, scale, generator, ratio)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: resize a C×H×W image to size×size (antialiased when either side shrinks)."""
    if image.shape[-2:] == (size, size):
        return image
    down = max(image.shape[-2:]) > size
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=down)[0]
