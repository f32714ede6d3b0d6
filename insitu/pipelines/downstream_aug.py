"""Augmentation for downstream training (classification, multi-label, segmentation), chosen by preset name.

Presets (``PRESETS``; the config names one, ``build_augmentation`` builds it):

- ``medical_grey``: horizontal and vertical flips, a small affine (rotation ±10°, scale ±10 %, shift
  ±6.25 %), mild brightness/contrast, gamma and gaussian noise on the intensity. The intensity ops mimic
  what changes between scanners and acquisitions (detector gain and offset, windowing, the tone curve,
  electronic noise) without changing anatomy.
- ``multispectral``: the eight flips/90° rotations (D4: overhead imagery has no "up"), shifts of whole
  pixels (no resampling) and at most a tiny additive offset per band (±0.02 of a band's std). No colour,
  brightness, contrast or gamma ops: the bands are physical reflectances and classes are told apart by
  their spectral signature (band ratios, indices such as NDVI), which a gain, a tone curve or a mix of
  bands would change into a signature no real surface has. A small additive per-band offset is the one
  change that has a physical counterpart (residual path radiance / calibration offset).
- ``endoscopy``: flips, an affine (rotation ±30°: the scope rolls freely; scale ±10 %, shift ±6.25 %)
  and colour jitter (brightness, contrast, saturation, hue), which mimics the light source, white
  balance and camera processing varying between towers. RGB only: any other band count is a ConfigError.
- ``none``: no augmentation (``build_augmentation`` returns None).

Inputs are the training dataset's tensors: an image ``C×H×W float32`` (normalised, any C) and optionally
a mask ``H×W int64`` of class ids with ``ignore_index`` (255) for nodata/unlabelled pixels. Image and
mask go through the same geometric transform; the mask is resampled nearest-neighbour only, pixels a
transform pads in get ``ignore_index`` in the mask and 0 (the normalised mean) in the image.

Two albumentations 2.0.8 behaviours shape the code. Its float32 pixel ops (RandomBrightnessContrast,
RandomGamma, GaussNoise, ColorJitter) assume values in [0, 1]: they clip to [0, 1] and gamma turns
negatives into NaN, so they run on the image mapped to [0, 1] by its own min/max and are mapped back
(clipping then acts as detector saturation/black level). And ``Compose(seed=s)`` gives every transform
its own generator seeded with the same ``s``, so two transforms with the same probability fire
together (both flips or neither); ``reseed`` gives all transforms one shared numpy and one Python
generator instead (never the global ``random`` module).

Importing albumentations asks PyPI for a newer version (a blocking request, 2 s timeout offline)
unless ``NO_ALBUMENTATIONS_UPDATE`` is set; this module sets it, since runs must not reach out.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import random  # noqa: E402  (only for private random.Random instances, never the global generator)
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from insitu.errors import ConfigError, DataError  # noqa: E402
from insitu.registry import unknown_name_message  # noqa: E402

PRESETS: dict[str, str] = {
    "none": "no augmentation",
    "medical_grey": "flips, small affine, mild brightness/contrast/gamma and gaussian noise (scanner/gain variation)",
    "multispectral": "D4 flips/rotations, whole-pixel shifts, tiny per-band offset; no colour ops (bands are reflectances)",
    "endoscopy": "flips, affine, colour jitter (light source, white balance); RGB images only",
}

Recipe = tuple[list[A.BasicTransform], list[A.BasicTransform], int | None]


class DownstreamAugment:
    """Augments an image (``C×H×W`` float32) and its optional mask (``H×W`` int64) together.

    ``joint`` transforms run on the normalised image and the mask; ``intensity`` transforms are
    albumentations pixel ops that run on the image alone, mapped to [0, 1]. ``channels``, when set, is
    the only band count the preset accepts; ``image_size``, when set, the only height and width.
    """

    def __init__(
        self,
        joint: Sequence[A.BasicTransform],
        intensity: Sequence[A.BasicTransform] = (),
        *,
        seed: int = 0,
        ignore_index: int = 255,
        image_size: int | None = None,
        channels: int | None = None,
        name: str = "custom",
    ) -> None:
        _check_fill_mask(joint, ignore_index, name)
        self.name, self.ignore_index, self.image_size, self.channels = name, ignore_index, image_size, channels
        # mask_interpolation on the Compose forces nearest on every transform that resamples the mask
        self.joint = A.Compose(list(joint), mask_interpolation=cv2.INTER_NEAREST, strict=True, seed=seed)
        self.intensity = A.Compose(list(intensity), strict=True, seed=seed) if intensity else None
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation sequence from ``seed`` (call once per DataLoader worker, e.g. run seed + worker id)."""
        numpy_rng, python_rng = np.random.default_rng(seed), random.Random(seed)
        for compose in (self.intensity, self.joint):
            if compose is not None:
                compose.set_random_state(numpy_rng, python_rng)

    def __call__(self, image: Tensor, mask: Tensor | None = None, nodata: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The augmented image and mask; ``nodata`` (``H×W`` bool) marks mask pixels to set to ``ignore_index`` first."""
        self._check(image, mask, nodata)
        array = np.ascontiguousarray(image.detach().cpu().numpy().astype(np.float32).transpose(1, 2, 0))  # H×W×C
        if self.intensity is not None:
            array = self._intensity(array)
        data: dict[str, Any] = {"image": array}
        if mask is not None:
            # float32 holds every id below 2**24 exactly and OpenCV can warp it (int64 it cannot)
            labels = mask.detach().cpu().numpy().astype(np.float32)
            if nodata is not None:
                labels[nodata.detach().cpu().numpy().astype(bool)] = self.ignore_index
            data["mask"] = labels
        out = self.joint(**data)
        height, width = out["image"].shape[:2]
        image_out = torch.from_numpy(np.ascontiguousarray(out["image"].reshape(height, width, -1).transpose(2, 0, 1), dtype=np.float32))
        mask_out = torch.from_numpy(np.rint(out["mask"]).astype(np.int64)) if mask is not None else None
        return image_out, mask_out

    def _intensity(self, array: np.ndarray) -> np.ndarray:
        """Run the pixel ops on the image mapped to [0, 1] by its min/max, then map back to normalised units."""
        low = float(array.min())
        span = max(float(array.max()) - low, 1e-6)
        unit = self.intensity(image=(array - low) / span)["image"]
        return (unit.reshape(array.shape) * span + low).astype(np.float32)

    def _check(self, image: Tensor, mask: Tensor | None, nodata: Tensor | None) -> None:
        if image.ndim != 3:
            raise DataError(f"augmentation {self.name!r} takes a C×H×W image, got shape {tuple(image.shape)}")
        bands, height, width = image.shape
        if self.channels is not None and bands != self.channels:
            raise ConfigError(
                f"augmentation preset {self.name!r} needs {self.channels}-band images but these have {bands} bands; "
                f"choose another preset for this data (e.g. 'medical_grey', 'multispectral' or 'none')"
            )
        if self.image_size is not None and (height, width) != (self.image_size, self.image_size):
            raise DataError(
                f"augmentation {self.name!r} was built for {self.image_size}×{self.image_size} images but got {height}×{width}; "
                "resize to the configured image size before augmenting"
            )
        if not bool(torch.isfinite(image).all()):
            raise DataError(f"augmentation {self.name!r} got an image with NaN/Inf values; fill nodata before augmenting")
        for label, extra in (("mask", mask), ("nodata", nodata)):
            if extra is not None and tuple(extra.shape) != (height, width):
                raise DataError(f"augmentation {self.name!r}: {label} has shape {tuple(extra.shape)}, the image is {height}×{width}")


class _BandOffset(A.ImageOnlyTransform):
    """Adds one small offset per band, drawn uniformly from ``[-limit, limit]`` (normalised units)."""

    def __init__(self, limit: float, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.limit = limit

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = params["shape"]
        bands = shape[2] if len(shape) == 3 else 1
        return {"offset": self.random_generator.uniform(-self.limit, self.limit, size=bands).astype(np.float32)}

    def apply(self, img: np.ndarray, offset: np.ndarray, **params: Any) -> np.ndarray:
        return (img.reshape(*img.shape[:2], -1) + offset).reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("limit",)


def _check_fill_mask(transforms: Sequence[A.BasicTransform], ignore_index: int, name: str) -> None:
    """Padded-in mask pixels must be ignored, never read as background."""
    for transform in transforms:
        fill_mask = getattr(transform, "fill_mask", None)
        if fill_mask is not None and not np.all(np.asarray(fill_mask) == ignore_index):
            raise ConfigError(
                f"augmentation {name!r}: {type(transform).__name__}(fill_mask={fill_mask}) would label padded pixels as a class; "
                f"set fill_mask={ignore_index} (the ignore index)"
            )


def _affine(rotate: float, scale: float, shift: float, ignore_index: int) -> A.Affine:
    # a dict draws x and y shifts independently (a tuple would draw one shift for both axes)
    return A.Affine(
        rotate=(-rotate, rotate),
        scale=(1 - scale, 1 + scale),
        keep_ratio=True,
        translate_percent={"x": (-shift, shift), "y": (-shift, shift)},
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0.0,
        fill_mask=float(ignore_index),
        p=0.7,
    )


def _medical_grey(image_size: int, ignore_index: int) -> Recipe:
    joint = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), _affine(10.0, 0.1, 0.0625, ignore_index)]
    intensity = [
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        A.RandomGamma(gamma_limit=(85, 115), p=0.5),
        A.GaussNoise(std_range=(0.005, 0.02), p=0.25),
    ]
    return joint, intensity, None


def _multispectral(image_size: int, ignore_index: int) -> Recipe:
    pixels = max(1, image_size // 16)
    shift = A.Affine(
        translate_px={"x": (-pixels, pixels), "y": (-pixels, pixels)},
        interpolation=cv2.INTER_NEAREST,  # whole-pixel shifts copy reflectances, never blend them
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0.0,
        fill_mask=float(ignore_index),
        p=0.5,
    )
    return [_BandOffset(limit=0.02, p=0.5), A.D4(p=1.0), shift], [], None


def _endoscopy(image_size: int, ignore_index: int) -> Recipe:
    joint = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), _affine(30.0, 0.1, 0.0625, ignore_index)]
    intensity = [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8)]
    return joint, intensity, 3


_RECIPES: dict[str, Callable[[int, int], Recipe]] = {
    "medical_grey": _medical_grey,
    "multispectral": _multispectral,
    "endoscopy": _endoscopy,
}


def build_augmentation(preset: str, image_size: int, seed: int, ignore_index: int = 255) -> DownstreamAugment | None:
    """The augmentation named ``preset`` (a key of ``PRESETS``) for square images of ``image_size``; None for ``"none"``."""
    if preset not in PRESETS:
        raise ConfigError(unknown_name_message("augmentation preset", preset, list(PRESETS)) + " Name one of them in the config.")
    if preset == "none":
        return None
    if image_size < 1:
        raise ConfigError(f"augmentation preset {preset!r}: image_size must be a positive number of pixels, got {image_size}")
    joint, intensity, channels = _RECIPES[preset](image_size, ignore_index)
    return DownstreamAugment(joint, intensity, seed=seed, ignore_index=ignore_index, image_size=image_size, channels=channels, name=preset)
