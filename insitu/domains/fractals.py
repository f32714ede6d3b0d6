"""Seeded IFS fractal images, generated on the fly (after Anderson & Farrell 2021, "Improving
Fractal Pre-training"): no stored data, no licences, no people in the images.

Each fractal is an iterated function system of N = 2..4 affine maps ``x -> A_i x + b_i`` with
``A_i = R(θ_i) diag(σ1_i, σ2_i) R(φ_i) diag(d_i)`` (d_i = ±1). As in the paper, the systems are
sampled so that their σ-factor ``Σ_i (σ1_i + 2·σ2_i)`` lies in ``[(5 + N)/2, (6 + N)/2]``, which
keeps the attractors neither dust-like nor filled blobs (our sampler: draw singular values, then
rescale them onto a target σ-factor drawn uniformly from that range, keeping σ2 ≤ σ1 ≤ 1).
Images are rendered with the chaos game in torch (CPU data workers or the GPU alike), coloured
per map, on random smooth-gradient backgrounds, with 1–3 instances per image.

The ``fractals`` domain (`FractalsDomain`) streams these images to base pretraining
(``data.domain: fractals``, insitu.pipelines.base_pretrain); it has no files to scan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from insitu.domains.base import Domain, DomainOptions, Manifest, ManifestItem, Sample
from insitu.errors import ConfigError
from insitu.registry import DOMAINS


def sample_systems(n: int, generator: torch.Generator, max_maps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random IFS: (A [n, M, 2, 2], b [n, M, 2], probs [n, M]); unused maps get probability 0."""
    maps = torch.randint(2, max_maps + 1, (n,), generator=generator)
    sig = torch.rand(n, max_maps, 2, generator=generator)
    sig1 = torch.maximum(sig[..., 0], sig[..., 1])
    sig2 = torch.minimum(sig[..., 0], sig[..., 1])
    active = torch.arange(max_maps)[None] < maps[:, None]
    target = 0.5 * (5 + maps) + 0.5 * torch.rand(n, generator=generator)
    current = ((sig1 + 2 * sig2) * active).sum(1)
    scale = (target / current)[:, None]
    sig1, sig2 = (sig1 * scale).clamp(max=1.0), (sig2 * scale)
    sig2 = torch.minimum(sig2, sig1)
    theta, phi = (torch.rand(2, n, max_maps, generator=generator) * 2 * math.pi).unbind(0)
    d = torch.where(torch.rand(n, max_maps, 2, generator=generator) < 0.5, -1.0, 1.0)
    a = _rot(theta) @ torch.diag_embed(torch.stack([sig1, sig2], -1)) @ _rot(phi) @ torch.diag_embed(d)
    b = torch.rand(n, max_maps, 2, generator=generator) * 2 - 1
    det = torch.linalg.det(a).abs().clamp_min(1e-3) * active
    return a, b, det / det.sum(1, keepdim=True)


def _rot(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def render(
    a: torch.Tensor,
    b: torch.Tensor,
    probs: torch.Tensor,
    size: int,
    generator: torch.Generator,
    chains: int = 256,
    steps: int = 64,
    colours: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chaos-game render of each system: (colour [n, 3, size, size] in [0, 1], coverage [n, size, size]).

    ``colours`` [n, maps, 3] fixes each map's colour; by default every map gets a random one."""
    n, m = probs.shape
    if colours is None:
        colours = torch.rand(n, m, 3, generator=generator) * 0.8 + 0.2
    x = torch.rand(n, chains, 2, generator=generator) * 2 - 1
    pts, cols = [], []
    for t in range(steps):
        idx = torch.multinomial(probs, chains, replacement=True, generator=generator)  # [n, chains]
        ai = torch.gather(a, 1, idx[..., None, None].expand(-1, -1, 2, 2))
        bi = torch.gather(b, 1, idx[..., None].expand(-1, -1, 2))
        x = (ai @ x[..., None])[..., 0] + bi
        if t >= 8:  # the first iterations have not reached the attractor yet
            pts.append(x)
            cols.append(torch.gather(colours, 1, idx[..., None].expand(-1, -1, 3)))
    p, c = torch.cat(pts, 1), torch.cat(cols, 1)
    lo = torch.quantile(p, 0.01, dim=1, keepdim=True)
    hi = torch.quantile(p, 0.99, dim=1, keepdim=True)
    p = ((p - lo) / (hi - lo).amax(-1, keepdim=True).clamp_min(1e-6)).clamp(0, 1 - 1e-6)
    pix = (p * size).long()
    flat = pix[..., 1] * size + pix[..., 0] + torch.arange(n)[:, None] * size * size
    count = torch.zeros(n * size * size).index_add_(0, flat.reshape(-1), torch.ones(flat.numel()))
    colour = torch.zeros(n * size * size, 3).index_add_(0, flat.reshape(-1), c.reshape(-1, 3))
    colour = colour / count.clamp_min(1)[:, None]
    count = count.view(n, size, size)
    return colour.view(n, size, size, 3).permute(0, 3, 1, 2), (count > 0).float()


def _background(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    grid = torch.rand(n, 3, 3, 3, generator=generator)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True) * 0.7


def fractal_images(n: int, size: int = 64, generator: torch.Generator | None = None, max_instances: int = 3) -> torch.Tensor:
    """``n`` RGB images [n, 3, size, size] in [0, 1], each with 1..max_instances fresh random fractals."""
    g = generator or torch.Generator().manual_seed(0)
    return _compose(n, size, g, max_instances, lambda: sample_systems(n, g))


class SystemBank:
    """A fixed, seeded set of IFS systems: the classes of multi-instance prediction."""

    def __init__(self, num_systems: int, seed: int = 0) -> None:
        self.a, self.b, self.probs = sample_systems(num_systems, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.probs.shape[0]


def labelled_fractal_images(
    n: int, bank: SystemBank, size: int = 64, generator: torch.Generator | None = None, max_instances: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-instance prediction data (Anderson & Farrell): images with 1..max_instances fractals drawn
    from ``bank`` and their multi-hot labels [n, len(bank)]; colours, placement and the chaos game's
    points are fresh for every instance, so only the system's shape identifies the class."""
    g = generator or torch.Generator().manual_seed(0)
    labels = torch.zeros(n, len(bank))
    k = torch.randint(1, max_instances + 1, (n,), generator=g)
    images = _compose(n, size, g, max_instances, _bank_draws(bank, g, k, labels), k)
    return images, labels


def _bank_draws(
    bank: SystemBank, g: torch.Generator, k: torch.Tensor, labels: torch.Tensor
) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A ``systems`` callable for ``_compose``: each call draws one bank system per image and marks it
    in ``labels`` for the images that show that many instances (``k``)."""
    drawn = 0

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal drawn
        idx = torch.randint(0, len(bank), (len(k),), generator=g)
        present = k > drawn
        drawn += 1
        labels[present, idx[present]] = 1.0
        return bank.a[idx], bank.b[idx], bank.probs[idx]

    return draw


def _compose(
    n: int,
    size: int,
    g: torch.Generator,
    max_instances: int,
    systems: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    k: torch.Tensor | None = None,
    background: torch.Tensor | None = None,
    colours: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    images = _background(n, size, g) if background is None else background
    k = torch.randint(1, max_instances + 1, (n,), generator=g) if k is None else k
    for inst in range(max_instances):
        a, b, probs = systems()
        colour, cover = render(a, b, probs, size, g, colours=None if colours is None else colours(inst))
        # place the instance in a random sub-box (the first one fills most of the image)
        scale = 0.9 if inst == 0 else 0.35 + 0.35 * float(torch.rand(1, generator=g))
        sub = max(8, int(size * scale))
        colour = F.interpolate(colour, size=(sub, sub), mode="nearest")
        cover = F.interpolate(cover[:, None], size=(sub, sub), mode="nearest")
        top, left = (torch.randint(0, size - sub + 1, (2,), generator=g)).tolist()
        use = (k > inst).float().view(n, 1, 1, 1) * cover
        region = images[:, :, top : top + sub, left : left + sub]
        images[:, :, top : top + sub, left : left + sub] = region * (1 - use) + colour * use
    return images


# ------------------------------------------------------------------ colour and texture labels
# The first base (``mip`` above) learned shape only: every map got a random colour on a smooth
# background, so colour and texture carried no signal and the base came out blind to both. The
# richer variant below adds two labels the ViT must also predict: the hue class of every instance
# and the texture class of the background (a family x scale grid), so colour and texture matter.

TEXTURE_FAMILIES = ("grating", "blobs", "checker", "dots")
TEXTURE_SCALES = 4  # frequency bins per family: about 2, 4, 8 and 16 cycles per image
NUM_TEXTURES = len(TEXTURE_FAMILIES) * TEXTURE_SCALES


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] (any equal shapes) to RGB with a trailing dimension of 3."""
    k = (torch.stack([torch.full_like(h, 5.0), torch.full_like(h, 3.0), torch.full_like(h, 1.0)], -1) + h[..., None] * 6) % 6
    return v[..., None] - (v * s)[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def textured_backgrounds(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` backgrounds [n, 3, size, size] in [0, 1] and their texture class [n] (family * scales + scale).

    A grating, smooth blobs, a checkerboard or a dot lattice, at one of four frequency bins (jittered
    by up to 25 %), random orientation and phase, blending two random colours."""
    cls = torch.randint(0, NUM_TEXTURES, (n,), generator=g)
    family, scale = cls // TEXTURE_SCALES, cls % TEXTURE_SCALES
    freq = (2.0 ** (scale.float() + 1)) * (0.8 + 0.45 * torch.rand(n, generator=g))  # cycles per image
    theta = torch.rand(n, generator=g) * math.pi
    phase = torch.rand(n, 2, generator=g) * 2 * math.pi
    lin = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    u = xx[None] * theta.cos()[:, None, None] + yy[None] * theta.sin()[:, None, None]
    w = -xx[None] * theta.sin()[:, None, None] + yy[None] * theta.cos()[:, None, None]
    f = 2 * math.pi * freq[:, None, None]
    su, sw = torch.sin(f * u + phase[:, :1, None]), torch.sin(f * w + phase[:, 1:, None])
    grating = 0.5 + 0.5 * su
    checker = (su * sw > 0).float()
    dots = ((su > 0.5) & (sw > 0.5)).float()
    blobs = torch.empty(n, size, size)
    for s_bin in range(TEXTURE_SCALES):  # smooth noise: a random grid of ~freq cells, upsampled
        grid = 2 ** (s_bin + 1) + 1
        noise = torch.rand(n, 1, grid, grid, generator=g)
        up = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)[:, 0]
        lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
        blobs = torch.where((scale == s_bin)[:, None, None], (up - lo) / (hi - lo).clamp_min(1e-6), blobs)
    t = torch.stack([grating, blobs, checker, dots], 1)[torch.arange(n), family]  # [n, size, size]
    c1, c2 = torch.rand(2, n, 3, 1, 1, generator=g) * 0.8
    return c1 + (c2 - c1) * t[:, None], cls


def labelled_colour_texture_images(
    n: int, bank: SystemBank, size: int, g: torch.Generator, hue_bins: int = 8, max_instances: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with 1..max_instances bank fractals on a textured background, and three labels:
    systems present (multi-hot [n, len(bank)]), hue classes present (multi-hot [n, hue_bins]; every
    instance has one hue, its maps vary around it) and the background texture class ([n], long)."""
    background, texture = textured_backgrounds(n, size, g)
    systems = torch.zeros(n, len(bank))
    hues = torch.zeros(n, hue_bins)
    k = torch.randint(1, max_instances + 1, (n,), generator=g)
    maps = bank.probs.shape[1]

    def colours(inst: int) -> torch.Tensor:
        h_cls = torch.randint(0, hue_bins, (n,), generator=g)
        hues[k > inst, h_cls[k > inst]] = 1.0
        hue = (h_cls.float() + 0.15 + 0.7 * torch.rand(n, generator=g)) / hue_bins  # stay inside the bin
        hue = (hue[:, None] + 0.02 * torch.randn(n, maps, generator=g)) % 1.0
        sat = 0.55 + 0.45 * torch.rand(n, maps, generator=g)
        val = 0.6 + 0.4 * torch.rand(n, maps, generator=g)
        return hsv_to_rgb(hue, sat, val)

    images = _compose(n, size, g, max_instances, _bank_draws(bank, g, k, systems), k, background=background, colours=colours)
    return images, systems, hues, texture


def stream_seed(seed: int, worker: int, offset: int = 0) -> int:
    """The generator seed of one worker's stream.

    ``offset`` 0 is the original stream (``seed * 1000 + worker``, the one the shipped bases were
    trained on). A continued run (``offset`` = how many runs its init chain already holds) draws
    from a different stream, so continuing a base never replays the images it was trained on.
    """
    if offset == 0:
        return seed * 1000 + worker
    return int(np.random.SeedSequence([seed, worker, offset]).generate_state(1, dtype=np.uint64)[0] % (2**63))


class FractalStream(IterableDataset):
    """An endless stream of fractal images (3×size×size in [0, 1]); each worker has its own seed.

    With a ``bank``, items are ``(image, multi-hot labels)`` for multi-instance prediction; with a
    bank and ``hue_bins > 0``, ``(image, systems, hues, texture)`` (see ``labelled_colour_texture_images``).
    ``offset`` picks a stream distinct from the ones earlier runs of a chain saw (`stream_seed`).
    """

    def __init__(
        self, size: int = 64, seed: int = 0, chunk: int = 64, bank: SystemBank | None = None, hue_bins: int = 0, offset: int = 0
    ) -> None:
        super().__init__()
        self.size, self.seed, self.chunk, self.bank, self.hue_bins, self.offset = size, seed, chunk, bank, hue_bins, offset

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        g = torch.Generator().manual_seed(stream_seed(self.seed, worker, self.offset))
        while True:
            if self.bank is None:
                yield from fractal_images(self.chunk, self.size, g)
            elif self.hue_bins:
                yield from zip(*labelled_colour_texture_images(self.chunk, self.bank, self.size, g, self.hue_bins), strict=True)
            else:
                images, labels = labelled_fractal_images(self.chunk, self.bank, self.size, g)
                yield from zip(images, labels, strict=True)


class FractalsOptions(DomainOptions):
    """The ``fractals`` domain takes no options: what the images show is the objective's choice (mip's
    system bank and hue classes, insitu.objectives.mip); the size is ``data.image_size``."""


@DOMAINS.register("fractals")
class FractalsDomain(Domain):
    """Generated IFS fractal images for base pretraining: a seeded endless stream, no files.

    An objective that learns the generator's labels (``mip``) asks for a labelled stream over its
    system bank; ``dino`` takes the plain images. ``scan`` and ``load`` refuse: there is no root.
    """

    name = "fractals"
    Options = FractalsOptions

    @classmethod
    def yields(cls, options: DomainOptions) -> tuple[str, int]:
        return "fractals", 1

    def stream(self, size: int, seed: int, bank: SystemBank | None = None, hue_bins: int = 0, offset: int = 0) -> FractalStream:
        """The run's images (``bank``: with their multi-instance labels; ``hue_bins``: and hue/texture labels;
        ``offset``: a stream distinct from earlier runs of a continued base's chain)."""
        return FractalStream(size, seed, bank=bank, hue_bins=hue_bins, offset=offset)

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        raise ConfigError(self._no_files())

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        raise ConfigError(self._no_files())

    def _no_files(self) -> str:
        return (
            "data.domain: fractals generates its images and has no files to read: it is for base pretraining "
            "(insitu base pretrain -c configs/base/fractal_vit_tiny.yaml, train.full_finetune: true, objective mip or dino). "
            "For adapters or probes, use a domain that reads your data (images, dicom, geotiff, video, pairs)."
        )

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> Any:
        raise ConfigError("data.domain: fractals has no demo data: it generates its images during base pretraining.")
