"""The augmentation ops every view recipe is built from, written once on torch tensors.

Every op works on images C×H×W, clips T×C×H×W and batches N×C×H×W (or N×T×C×H×W): the last three
dimensions are channels, rows and columns. A random op makes one draw per call, shared by all
leading dimensions (so a clip's frames get the same crop, flip and gain: temporally consistent);
the pointwise ones (flip, gain/offset, channel jitter, rotation) draw once per leading index
instead when given ``batch_dims``. Kernels, grids and drawn gains are made on the input's device and
in its dtype. The ops are valid on physical intensities (HU, reflectance, grey levels): no hue
rotation, no solarisation (see `insitu.objectives.views`).

Randomness: every draw comes from the ``torch.Generator`` passed in (a CPU generator; draws are
moved to the input's device). A view recipe (`ViewRecipe`) owns one; DataLoader workers restart it
from their own seed (`worker_seed`, `reseed_views`, wired in `insitu.pipelines.data.seed_worker`),
so a run is reproducible with a given seed and no two workers repeat each other's views. Passing
``generator=None`` draws from torch's default generator (tests, benchmarks).

Why not torchvision's v2 transforms or kornia.augmentation: both draw from torch's global RNG and
take no per-call generator (kornia/kornia#4427 says so for every kornia augmentation), so a
recipe-owned, per-worker stream would mean saving and restoring global state around every call.
Downstream augmentation of image + mask uses albumentations (`insitu.pipelines.downstream_aug`),
which accepts private generators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import get_worker_info

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels
T = TypeVar("T")

RANK_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distributed ranks get far-apart seeds


# ---------------------------------------------------------------- draws


def uniform(low: float, high: float, generator: torch.Generator | None, shape: Sequence[int] = ()) -> torch.Tensor:
    """Uniform draws in [low, high) of ``shape``, float64 on the CPU."""
    return torch.empty(tuple(shape), dtype=torch.float64).uniform_(low, high, generator=generator)


def coin(p: float, generator: torch.Generator | None) -> bool:
    """True with probability ``p`` (one draw, even when p is 0 or 1)."""
    return float(uniform(0.0, 1.0, generator)) < p


def randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """A whole number in low..high, both included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def choice(options: Sequence[T], generator: torch.Generator | None) -> T:
    """One element of ``options``, uniformly."""
    return options[randint(0, len(options) - 1, generator)]


def permutation(n: int, generator: torch.Generator | None) -> list[int]:
    """0..n-1 in random order."""
    return torch.randperm(n, generator=generator).tolist()


def _lead(x: torch.Tensor, batch_dims: int) -> tuple[int, ...]:
    """Shape of one draw per leading index (``batch_dims`` leading dims), broadcastable over the rest."""
    return tuple(x.shape[:batch_dims]) + (1,) * (x.ndim - batch_dims)


def _like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------- geometry


def crop_box(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator | None, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Box:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect (w/h) in ``ratio``.

    Ten tries at a box that fits; then the central square.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(uniform(*scale, generator))
        aspect = math.exp(float(uniform(*log_ratio, generator)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return randint(0, height - h, generator), randint(0, width - w, generator), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def resized_crop(x: torch.Tensor, box: Box, size: int, antialias: bool | None = None) -> torch.Tensor:
    """The crop ``box`` of x (…×C×H×W) resized to size×size, bilinear; antialiased when shrinking unless told."""
    top, left, h, w = box
    crop = x[..., top : top + h, left : left + w]
    lead = crop.shape[:-2]
    shrink = h > size if antialias is None else antialias
    y = F.interpolate(crop.reshape(-1, *crop.shape[-3:]), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.reshape(*lead, size, size)


def random_resized_crop(
    x: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator | None, antialias: bool | None = None
) -> tuple[torch.Tensor, Box]:
    """A random crop (`crop_box`) resized to size×size, and its box in x's pixels."""
    box = crop_box(x.shape[-2], x.shape[-1], scale, generator)
    return resized_crop(x, box, size, antialias), box


def flip(x: torch.Tensor, flipped: torch.Tensor | bool) -> torch.Tensor:
    """Mirror left-right where ``flipped`` (a bool, or one per leading index broadcastable to x)."""
    if isinstance(flipped, bool):
        return x.flip(-1) if flipped else x
    return torch.where(flipped.to(x.device), x.flip(-1), x)


def random_flip(
    x: torch.Tensor, generator: torch.Generator | None, p: float = 0.5, batch_dims: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right with probability ``p``; returns the result and the draw(s) (bool tensor)."""
    flipped = uniform(0.0, 1.0, generator, _lead(x, batch_dims)) < p
    return (flip(x, bool(flipped)) if batch_dims == 0 else flip(x, flipped)), flipped


def rotate(x: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate about the centre (…×C×H×W), border pixels replicated (no zero fill); one angle, or one per image."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    a = torch.deg2rad(torch.as_tensor(degrees, dtype=torch.float64)).reshape(-1).expand(flat.shape[0])
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = _like(torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1), x)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    return F.grid_sample(flat, grid, padding_mode="border", align_corners=False).reshape(*lead, c, h, w)


def random_rotate(x: torch.Tensor, max_degrees: float, generator: torch.Generator | None, batch_dims: int = 0) -> torch.Tensor:
    """Rotate by an angle uniform in ±``max_degrees`` (one per call, or per leading index with ``batch_dims``)."""
    shape = tuple(x.shape[:batch_dims])
    angles = uniform(-max_degrees, max_degrees, generator, shape)
    if batch_dims:  # one angle per image: repeat it over the images' remaining leading dims
        per = x.shape[batch_dims:-3].numel()
        angles = angles.reshape(-1, 1).expand(-1, per)
    return rotate(x, angles)


def resized_crops(x: torch.Tensor, boxes: Sequence[Box], size: int) -> torch.Tensor:
    """One crop per image of a batch x (B×C×H×W), each resized to size×size, in one call on x's device.

    torchvision's ``roi_align`` (bilinear, pixel-aligned): where a box is not larger than ``size`` it
    gives `resized_crop`'s bilinear values, except that the outermost output pixels read the image
    beyond the box where `resized_crop` repeats the box's edge; a larger box averages ceil(box / size)
    samples per output pixel (an area filter, where `resized_crop` uses an antialiasing triangle filter)."""
    from torchvision.ops import roi_align

    rois = torch.tensor([[i, left, top, left + w, top + h] for i, (top, left, h, w) in enumerate(boxes)], dtype=x.dtype, device=x.device)
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ---------------------------------------------------------------- intensities


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every H×W plane of x (…×H×W), reflect-padded; the kernel follows x's device and dtype."""
    radius = max(1, int(3 * sigma))
    # on x's device: GLARE blurs whole batches on the training device, not only CPU data-loader views
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    planes = x.reshape(-1, 1, *x.shape[-2:])
    y = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(x.shape)


def gaussian_blur_each(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of each image of x (B×C×H×W) with its own σ (B; 0 = unchanged), reflect-padded, in one call."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = _like(sigma, x)[:, None]
    k = torch.exp(-0.5 * (offsets[None] / s.clamp_min(1e-6)) ** 2)
    k = torch.where(s > 0, k / k.sum(1, keepdim=True), (offsets[None] == 0).to(x.dtype))
    k = k.repeat_interleave(c, 0)  # one kernel per plane
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def random_blur(
    x: torch.Tensor, prob: float, sigma: tuple[float, float], generator: torch.Generator | None
) -> tuple[torch.Tensor, float | None]:
    """With probability ``prob``, blur with σ uniform in ``sigma``; returns the result and σ (None: not blurred)."""
    if not coin(prob, generator):
        return x, None
    s = float(uniform(*sigma, generator))
    return gaussian_blur(x, s), s


def gain_offset(x: torch.Tensor, amount: float, generator: torch.Generator | None, batch_dims: int = 0) -> torch.Tensor:
    """x·(1 + a) + b with a, b uniform in ±``amount`` (normalised units), the same for every channel."""
    shape = _lead(x, batch_dims)
    a, b = uniform(-amount, amount, generator, shape), uniform(-amount, amount, generator, shape)
    if batch_dims == 0:
        return x * (1.0 + float(a)) + float(b)
    return x * _like(1.0 + a, x) + _like(b, x)


def channel_jitter(x: torch.Tensor, amount: float, generator: torch.Generator | None, batch_dims: int = 0) -> torch.Tensor:
    """An independent gain 1 ± ``amount`` and offset ± ``amount`` per channel (stain, white balance, band calibration)."""
    shape = (*x.shape[:batch_dims], *([1] * (x.ndim - 3 - batch_dims)), x.shape[-3], 1, 1)
    gain = 1.0 + uniform(-amount, amount, generator, shape)
    shift = uniform(-amount, amount, generator, shape)
    return x * _like(gain, x) + _like(shift, x)


# ---------------------------------------------------------------- time


def window_start(length: int, span: int, generator: torch.Generator | None) -> int:
    """A uniform start for ``span`` consecutive frames in a clip of ``length``."""
    return randint(0, length - span, generator)


def temporal_window(clip: torch.Tensor, frames: int, stride: int, generator: torch.Generator | None) -> torch.Tensor:
    """``frames`` frames every ``stride`` from a random start of a T×… clip."""
    span = (frames - 1) * stride + 1
    start = window_start(clip.shape[0], span, generator)
    return clip[start : start + span : stride]


def linear_gap(max_gap: int, generator: torch.Generator | None) -> int:
    """A gap in 0..max_gap with probability proportional to ``max_gap + 1 - gap`` (near is likelier)."""
    weights = torch.arange(max_gap + 1, 0, -1, dtype=torch.float64)
    return int(torch.multinomial(weights, 1, generator=generator))


# ---------------------------------------------------------------- seeding


def worker_seed(rank: int | None = None) -> int:
    """This process's augmentation seed.

    In a DataLoader worker: ``get_worker_info().seed`` (the loader's base seed, drawn from the run's
    seeded torch RNG, plus the worker id), mixed with the distributed ``rank`` (default: Lightning's
    global rank) so that ranks do not repeat each other; elsewhere ``torch.initial_seed()`` (the run
    seed after ``seed_everything``).
    """
    info = get_worker_info()
    seed = info.seed if info is not None else torch.initial_seed()
    rank = getattr(rank_zero_only, "rank", 0) if rank is None else rank
    return (seed ^ (rank * RANK_MIX)) % 2**63


class ViewRecipe:
    """Base of the view transforms: owns the one ``torch.Generator`` all of its draws come from.

    Without a generator, one is made seeded from ``torch.initial_seed()`` (reproducible after
    ``seed_everything``); DataLoader workers restart it from their own seed (`reseed_views`).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed())

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)


def reseed_views(obj: object, seed: int) -> int:
    """Restart every generator reachable from ``obj`` at ``seed``; returns how many were found.

    Followed: ``.generator`` itself, and the attributes datasets and wrappers keep their recipe in
    (``.transform``: SampleDataset; ``.crop``: the base-pretraining stream; ``.base``: a wrapping transform).
    """
    found, seen, stack = 0, set(), [obj]
    while stack:
        o = stack.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        g = getattr(o, "generator", None)
        if isinstance(g, torch.Generator):
            g.manual_seed(seed)
            found += 1
        stack += [getattr(o, name, None) for name in ("transform", "crop", "base")]
    return found
