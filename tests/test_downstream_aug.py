"""Downstream augmentation presets: image and mask move together, nodata stays ignored, seeds reproduce.

Fixtures are tiny seeded tensors (32 px). A "marker" band carries a mask property through the image's
geometric transform, so the augmented image says where each mask value should have gone.
"""

from __future__ import annotations

import pickle

import albumentations as A
import pytest
import torch

from insitu.errors import ConfigError, DataError
from insitu.pipelines.downstream_aug import PRESETS, DownstreamAugment, build_augmentation

SIZE = 32
IGNORE = 255
SEEDS = range(30)
# the band counts each preset accepts, as tested
BANDS = {"medical_grey": (1, 4, 13), "multispectral": (1, 4, 13), "endoscopy": (3,)}


def square(bands: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Band 0 is 3.0 on an off-centre 12×14 rectangle (mask 1) and 0 elsewhere (mask 0); other bands small noise."""
    image = 0.1 * torch.randn(bands, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(SIZE, SIZE, dtype=torch.int64)
    mask[8:20, 10:24] = 1
    image[0] = 3.0 * mask
    return image, mask


def geometry_only(preset: str, seed: int) -> DownstreamAugment:
    """The preset's image+mask transforms without its intensity ops, so band values stay linear mixes of the input."""
    aug = build_augmentation(preset, SIZE, seed)
    return DownstreamAugment(aug.joint.transforms, seed=seed, ignore_index=IGNORE, name=preset)


def on_edge(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3×3 neighbourhood holds both label 1 and another value."""
    ones = (mask == 1).float()[None, None]
    any_one = torch.nn.functional.max_pool2d(ones, 3, 1, 1)[0, 0] > 0
    all_one = -torch.nn.functional.max_pool2d(-ones, 3, 1, 1)[0, 0] > 0
    return any_one & ~all_one


# ---------------------------------------------------------------- 1. image and mask move together


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_mask_follows_image_exactly_under_each_presets_geometry(preset: str) -> None:
    # band 0 is 1 inside the rectangle, 0 outside: bilinear resampling makes a pixel a weighted mix of its
    # 2×2 source pixels, and nearest resampling (the mask's) takes the largest weight, which is the bright
    # one whenever the mix is above 0.75 and a dark one whenever it is below 0.25. Thresholds 0.8/0.2 leave
    # room for the multispectral band offset (±0.02), so this check has no tolerance at all.
    for bands in BANDS[preset]:
        image, mask = square(bands)
        image[0] = mask.float()
        for seed in SEEDS:
            out_image, out_mask = geometry_only(preset, seed)(image, mask)
            assert torch.all(out_mask[out_image[0] > 0.8] == 1), (preset, bands, seed)
            assert not torch.any(out_mask[out_image[0] < 0.2] == 1), (preset, bands, seed)


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_mask_follows_image_under_the_full_preset(preset: str) -> None:
    # with the intensity ops the bright/dark levels move, so a fixed threshold (1.5, halfway between the
    # input levels) can disagree with the nearest-neighbour mask only where resampling blends the two
    # levels: on the rectangle's edge (worst over these seeds: 7 for medical_grey, 15 for endoscopy, 0 for
    # multispectral). A mask moved by one pixel against the image disagrees along two whole sides (at least
    # 24 pixels over these seeds, measured), more than the 20 edge pixels allowed here.
    worst = 0
    for bands in BANDS[preset]:
        image, mask = square(bands)
        aug = build_augmentation(preset, SIZE, seed=1)
        for seed in SEEDS:
            aug.reseed(seed)
            out_image, out_mask = aug(image, mask)
            wrong = ((out_image[0] > 1.5) != (out_mask == 1)) & (out_mask != IGNORE)
            assert torch.all(on_edge(out_mask)[wrong]), (preset, bands, seed)
            worst = max(worst, int(wrong.sum()))
    assert worst <= 20, (preset, worst)


def test_known_shift_moves_mask_and_image_by_exactly_that_many_pixels() -> None:
    image, mask = square(4)
    shift = A.Affine(translate_px={"x": 3, "y": -2}, fill=0.0, fill_mask=IGNORE, p=1.0)  # 3 right, 2 up
    out_image, out_mask = DownstreamAugment([shift], seed=0)(image, mask)
    expected_mask = torch.full_like(mask, IGNORE)
    expected_mask[: SIZE - 2, 3:] = mask[2:, : SIZE - 3]
    expected_image = torch.zeros_like(image)
    expected_image[:, : SIZE - 2, 3:] = image[:, 2:, : SIZE - 3]
    assert torch.equal(out_mask, expected_mask)
    assert torch.equal(out_image, expected_image)


# ---------------------------------------------------------------- 2. nodata stays ignored, padding is ignored


def nodata_fixture(bands: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random class ids 0-2 with a nodata stripe and a nodata blob (255), and a ``nodata`` flag on a second blob.

    The last band is the marker: 1 where the mask is (or will be) ignored, 0 elsewhere.
    """
    generator = torch.Generator().manual_seed(3)
    mask = torch.randint(0, 3, (SIZE, SIZE), generator=generator)
    mask[:5] = IGNORE
    mask[14:19, 6:12] = IGNORE
    nodata = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    nodata[20:26, 18:27] = True
    image = 0.1 * torch.randn(bands, SIZE, SIZE, generator=generator)
    image[-1] = ((mask == IGNORE) | nodata).float()
    return image, mask, nodata


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_nodata_pixels_stay_ignored_wherever_they_move(preset: str) -> None:
    bands = max(BANDS[preset]) if preset != "endoscopy" else 3
    image, mask, nodata = nodata_fixture(bands)
    for seed in SEEDS:
        out_image, out_mask = geometry_only(preset, seed)(image, mask, nodata)
        # the 0.75 argument of the alignment test: a pixel mostly made of former nodata took its label from one
        former_nodata = out_image[-1] > 0.8
        assert former_nodata.any()
        assert torch.all(out_mask[former_nodata] == IGNORE), (preset, seed)


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_padded_borders_are_ignored_never_background(preset: str) -> None:
    # all-background mask and a constant band: where that band fell to 0 the pixel came from outside the image
    bands = 3 if preset == "endoscopy" else 4
    image = torch.ones(bands, SIZE, SIZE)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.int64)
    padded_runs = 0
    for seed in SEEDS:
        out_image, out_mask = geometry_only(preset, seed)(image, mask)
        padded = out_image[0] < 0.2
        padded_runs += bool(padded.any())
        assert torch.all(out_mask[padded] == IGNORE), (preset, seed)
        assert torch.all(out_mask[out_image[0] > 0.8] == 0), (preset, seed)
    assert padded_runs >= 5, f"{preset}: too few seeds padded anything for the check to mean much"


def test_nodata_count_under_a_known_shift_loses_only_what_leaves_the_frame() -> None:
    image, mask, nodata = nodata_fixture()
    shift = A.Affine(translate_px={"x": 3, "y": -2}, fill=0.0, fill_mask=IGNORE, p=1.0)  # 3 right, 2 up
    out_image, out_mask = DownstreamAugment([shift], seed=0)(image, mask, nodata)
    labelled = torch.where(nodata, IGNORE, mask)  # nodata turns into the ignore index before the shift
    expected = torch.full_like(mask, IGNORE)  # the padded-in column strip and row strip stay ignored
    expected[: SIZE - 2, 3:] = labelled[2:, : SIZE - 3]
    kept = int((labelled[2:, : SIZE - 3] == IGNORE).sum())  # ignored pixels that stay in the frame
    padded = SIZE * SIZE - (SIZE - 2) * (SIZE - 3)
    assert int((out_mask == IGNORE).sum()) == kept + padded
    assert torch.equal(out_mask, expected)
    assert torch.all(out_mask[out_image[-1] == 1] == IGNORE)  # the marker band moved with the ignored pixels


def test_nodata_without_a_mask_invents_none() -> None:
    image, _, nodata = nodata_fixture()
    out_image, out_mask = build_augmentation("multispectral", SIZE, seed=0)(image, None, nodata)
    assert out_mask is None
    assert out_image.shape == image.shape


# ---------------------------------------------------------------- 3. seeds reproduce


def run(aug: DownstreamAugment, image: torch.Tensor, mask: torch.Tensor, calls: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [aug(image, mask) for _ in range(calls)]


def same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_same_seed_same_sequence_other_seed_other_sequence(preset: str) -> None:
    image, mask = square(BANDS[preset][0])
    first = run(build_augmentation(preset, SIZE, seed=5), image, mask)
    assert same(first, run(build_augmentation(preset, SIZE, seed=5), image, mask))
    assert not same(first, run(build_augmentation(preset, SIZE, seed=6), image, mask))
    reseeded = build_augmentation(preset, SIZE, seed=0)
    reseeded(image, mask)
    reseeded.reseed(5)
    assert same(first, run(reseeded, image, mask))
    assert same(first, run(pickle.loads(pickle.dumps(build_augmentation(preset, SIZE, seed=5))), image, mask))


def test_transforms_draw_from_one_stream_not_one_seed_each() -> None:
    # Compose(seed=s) alone seeds each transform's own generator with s, so two p=0.5 flips fire together
    aug = DownstreamAugment([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], seed=0)
    image = torch.arange(4.0).reshape(1, 2, 2)  # [[0, 1], [2, 3]]: the top-left value names the flips
    corners = {float(aug(image)[0][0, 0, 0]) for _ in range(40)}
    assert corners == {0.0, 1.0, 2.0, 3.0}


# ---------------------------------------------------------------- 4. dtypes, shapes, finiteness, errors


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_each_preset_keeps_dtype_shape_and_finiteness(preset: str) -> None:
    for bands in BANDS[preset]:
        image, mask = square(bands, seed=bands)
        image = image - 2.0  # normalised images are mostly negative somewhere; gamma must not turn them into NaN
        aug = build_augmentation(preset, SIZE, seed=0)
        for _ in range(10):
            out_image, out_mask = aug(image, mask)
            assert out_image.dtype == torch.float32 and out_image.shape == (bands, SIZE, SIZE)
            assert out_mask.dtype == torch.int64 and out_mask.shape == (SIZE, SIZE)
            assert torch.isfinite(out_image).all()
        out_image, out_mask = aug(image)
        assert out_mask is None and out_image.shape == (bands, SIZE, SIZE)


def test_none_builds_nothing_and_presets_are_listed() -> None:
    assert build_augmentation("none", SIZE, seed=0) is None
    assert set(PRESETS) == set(BANDS) | {"none"}


def test_endoscopy_refuses_four_bands() -> None:
    aug = build_augmentation("endoscopy", SIZE, seed=0)
    image, mask = square(4)
    with pytest.raises(ConfigError, match=r"'endoscopy' needs 3-band images but these have 4 bands"):
        aug(image, mask)


def test_unknown_preset_names_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"'medcal_grey'.*Did you mean 'medical_grey'\?.*multispectral"):
        build_augmentation("medcal_grey", SIZE, seed=0)


def test_a_fill_mask_other_than_the_ignore_index_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fill_mask=255"):
        DownstreamAugment([A.Affine(rotate=10, fill_mask=0, p=1.0)], seed=0)


def test_an_image_of_another_size_is_refused() -> None:
    image, mask = square(1)
    with pytest.raises(DataError, match=r"built for 64×64 images but got 32×32"):
        build_augmentation("medical_grey", 64, seed=0)(image, mask)


# ---------------------------------------------------------------- 5. no blended labels


@pytest.mark.parametrize("preset", sorted(BANDS))
def test_mask_values_stay_in_the_original_set(preset: str) -> None:
    generator = torch.Generator().manual_seed(1)
    values = torch.tensor([0, 3, 7, IGNORE])
    mask = values[torch.randint(0, 4, (SIZE, SIZE), generator=generator)]
    image = torch.randn(BANDS[preset][0], SIZE, SIZE, generator=generator)
    aug = build_augmentation(preset, SIZE, seed=0)
    for _ in SEEDS:
        _, out_mask = aug(image, mask)
        assert set(out_mask.unique().tolist()) <= {0, 3, 7, IGNORE}
