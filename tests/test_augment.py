"""The shared augmentation ops against hand computations, seeded reproducibility, and device following."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from insitu.objectives import augment as A
from insitu.objectives.convirt import ConVIRTImageView
from insitu.objectives.convirt import PairViewOptions as ConVIRTViewOptions
from insitu.objectives.graph_matching import BoxedCropPair, PairViewOptions
from insitu.objectives.temporal import ClipViewOptions, CVRLOptions, CVRLViews, RSPOptions, RSPViews
from insitu.objectives.views import MultiCrop, MultiCropOptions
from insitu.pipelines.data import seed_worker

PACKAGE = Path(__file__).resolve().parents[1] / "insitu"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- each op against a hand computation


def test_crop_box_fits_and_falls_back_to_the_central_square():
    for seed in range(20):
        top, left, h, w = A.crop_box(20, 30, (0.2, 0.6), gen(seed))
        assert 0 <= top <= 20 - h and 0 <= left <= 30 - w
        assert 0.2 * 600 - 30 <= h * w <= 0.6 * 600 + 30  # the target area, up to rounding of each side
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    assert A.crop_box(8, 8, (1.0, 1.0), gen(), ratio=(1.0, 1.0)) == (0, 0, 8, 8)
    # a whole-area square never fits a 4×100 strip: ten tries fail, then the central 4×4 square
    assert A.crop_box(4, 100, (1.0, 1.0), gen(), ratio=(1.0, 1.0)) == (0, 48, 4, 4)


def test_resized_crop_at_its_own_size_is_the_slice_for_images_and_clips():
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 6)
    assert torch.equal(A.resized_crop(image, (1, 2, 3, 3), 3), image[:, 1:4, 2:5])
    clip = torch.stack([image, image + 100])  # T×C×H×W
    out = A.resized_crop(clip, (0, 0, 4, 4), 2)
    assert out.shape == (2, 2, 2, 2)
    # bilinear halving without antialias averages the 2×2 block centred between pixels: rows 0-1, cols 0-1 etc.
    plain = A.resized_crop(clip, (0, 0, 4, 4), 2, antialias=False)
    assert plain[0, 0, 0, 0] == pytest.approx((0 + 1 + 6 + 7) / 4)
    assert plain[1, 0, 0, 0] == pytest.approx(100 + (0 + 1 + 6 + 7) / 4)


def test_flip_mirrors_columns_and_per_sample_flags():
    x = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert torch.equal(A.flip(x, True), torch.tensor([[[3.0, 2.0, 1.0]]]))
    assert torch.equal(A.flip(x, False), x)
    batch = torch.stack([x, x])
    out = A.flip(batch, torch.tensor([True, False]).view(2, 1, 1, 1))
    assert torch.equal(out[0], A.flip(x, True)) and torch.equal(out[1], x)
    seen = {bool(A.random_flip(x, g)[1]) for g in [gen(s) for s in range(16)]}
    assert seen == {True, False}
    assert not A.random_flip(x, gen(), p=0.0)[1].any()


def test_gaussian_blur_of_an_impulse_is_the_outer_product_of_the_kernel():
    x = torch.zeros(1, 9, 9, dtype=torch.float64)
    x[0, 4, 4] = 1.0
    sigma = 1.0
    radius = 3
    k = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    k = [v / sum(k) for v in k]
    y = A.gaussian_blur(x, sigma)
    for r in range(9):
        for c in range(9):
            dr, dc = r - 4 + radius, c - 4 + radius
            want = k[dr] * k[dc] if 0 <= dr <= 2 * radius and 0 <= dc <= 2 * radius else 0.0
            assert float(y[0, r, c]) == pytest.approx(want, abs=1e-12)
    flat = torch.full((2, 3, 7, 7), 2.5)  # reflect padding keeps a constant image constant, any leading dims
    torch.testing.assert_close(A.gaussian_blur(flat, 1.0), flat)


def test_gain_offset_is_one_gain_and_offset_for_all_channels_and_frames():
    amount = 0.3
    clip = torch.stack([torch.zeros(2, 1, 1), torch.ones(2, 1, 1)])  # frame 0 zeros, frame 1 ones
    out = A.gain_offset(clip, amount, gen(3))
    b = out[0, 0, 0, 0]  # 0·(1+a) + b
    a = out[1, 0, 0, 0] - 1 - b  # 1·(1+a) + b
    assert abs(float(a)) <= amount and abs(float(b)) <= amount and float(a) != 0
    assert torch.equal(out[:, 0], out[:, 1])  # the same for both channels
    per_sample = A.gain_offset(torch.ones(4, 2, 1, 1), amount, gen(3), batch_dims=1)
    assert len(set(per_sample[:, 0, 0, 0].tolist())) == 4 and torch.equal(per_sample[:, 0], per_sample[:, 1])


def test_channel_jitter_draws_one_gain_and_offset_per_channel_shared_over_frames():
    amount = 0.2
    clip = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    out = A.channel_jitter(clip, amount, gen(5))
    shift, gain = out[0, :, 0, 0], out[1, :, 0, 0] - out[0, :, 0, 0]
    assert ((gain - 1).abs() <= amount).all() and (shift.abs() <= amount).all()
    assert len(set(gain.tolist())) == 3  # independent per channel
    assert torch.equal(out[:, :, 0, 0], out[:, :, 1, 1])  # constant within a channel
    batch = A.channel_jitter(torch.ones(2, 3, 2, 2), amount, gen(5), batch_dims=1)
    assert not torch.equal(batch[0], batch[1])


def test_rotate_by_right_angles_permutes_pixels():
    x = torch.arange(9.0).view(1, 3, 3)
    torch.testing.assert_close(A.rotate(x, 0.0), x)
    torch.testing.assert_close(A.rotate(x, 90.0), torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(A.rotate(x, 180.0), x.flip(-1).flip(-2), atol=1e-5, rtol=0)
    batch = torch.stack([x, x])
    out = A.rotate(batch, torch.tensor([0.0, 90.0]))
    torch.testing.assert_close(out[0], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)


def test_temporal_window_gap_and_small_draws():
    clip = torch.arange(10.0)
    for seed in range(10):
        w = A.temporal_window(clip, 3, 2, gen(seed))
        assert w.diff().tolist() == [2.0, 2.0] and 0 <= w[0] <= 5
        assert 0 <= A.window_start(10, 4, gen(seed)) <= 6
        assert A.choice([7, 8, 9], gen(seed)) in (7, 8, 9)
        assert sorted(A.permutation(4, gen(seed))) == [0, 1, 2, 3]
    assert A.linear_gap(0, gen()) == 0
    g = gen(1)
    counts = [0] * 4
    for _ in range(2000):
        counts[A.linear_gap(3, g)] += 1
    assert counts[0] / counts[3] == pytest.approx(4, rel=0.3)  # weights 4:3:2:1


# ---------------------------------------------------------------- seeded reproducibility


def _recipes(generator: torch.Generator | None) -> dict[str, object]:
    plain_clip = ClipViewOptions(frames=3)
    return {
        "multicrop": MultiCrop(16, 8, MultiCropOptions(blur_prob=0.5, channel_jitter=0.1), generator),
        "graph_matching": BoxedCropPair(16, PairViewOptions(blur_prob=0.5), generator),
        "convirt": ConVIRTImageView(16, ConVIRTViewOptions(), generator),
        "rsp": RSPViews(8, RSPOptions(views=plain_clip), generator),
        "cvrl": CVRLViews(8, CVRLOptions(views=plain_clip), generator),
    }


def _flat(out: object) -> list[torch.Tensor]:
    if isinstance(out, tuple):
        return [*out[0], out[1].float()]
    return list(out)


@pytest.mark.parametrize("name", ["multicrop", "graph_matching", "convirt", "rsp", "cvrl"])
def test_same_seed_same_views_other_seed_other_views(name):
    x = torch.rand(8, 3, 24, 24) if name in ("rsp", "cvrl") else torch.rand(3, 24, 24)
    a, b, c = (_recipes(g)[name] for g in (gen(1), gen(1), gen(2)))
    va, vb, vc = _flat(a(x)), _flat(b(x)), _flat(c(x))
    assert all(torch.equal(p, q) for p, q in zip(va, vb, strict=True))
    assert not all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(va, vc, strict=True))
    a.reseed(1)  # restarting the generator replays the stream
    assert all(torch.equal(p, q) for p, q in zip(_flat(a(x)), va, strict=True))


def test_recipes_default_to_the_run_seed():
    torch.manual_seed(11)
    first = MultiCrop(16, 8, MultiCropOptions())(torch.rand(3, 24, 24))
    torch.manual_seed(11)
    again = MultiCrop(16, 8, MultiCropOptions())(torch.rand(3, 24, 24))
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))


def test_reseed_views_reaches_recipes_inside_datasets_and_wrappers():
    recipe = MultiCrop(16, 8, MultiCropOptions())

    class Wrapper:  # like self_distill's clean-view transform: the recipe is .base
        base = recipe

    class Holder:  # like SampleDataset: the transform is .transform
        transform = Wrapper()

    assert A.reseed_views(Holder(), 5) == 1
    assert recipe.generator.initial_seed() == 5


class _OneImage(Dataset):
    def __init__(self) -> None:
        self.image = torch.rand(3, 24, 24, generator=gen(0))
        self.transform = MultiCrop(16, 8, MultiCropOptions(global_crops=1, local_crops=0), gen(0))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image)[0]


def _worker_views(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # the run seed: the loader draws its base seed from it
    loader = DataLoader(_OneImage(), batch_size=2, num_workers=2, worker_init_fn=seed_worker)
    return list(loader)  # batch i comes from worker i % 2


def test_workers_get_their_own_reproducible_streams():  # two forked workers: under a second, so in the fast tier
    first, again, other = _worker_views(0), _worker_views(0), _worker_views(1)
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # worker 0 and worker 1 do not repeat each other
    assert not torch.equal(first[0], other[0])


# ---------------------------------------------------------------- no Python random, no global numpy RNG


def test_no_python_random_or_global_numpy_rng_in_insitu():
    allowed_numpy = {"default_rng", "Generator", "SeedSequence"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            # a private random.Random(seed) instance is allowed (albumentations takes one); the global generator is not
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random" and node.attr != "Random":
                offenders.append(f"{path}:{node.lineno}: random.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module == "random" and node.level == 0:
                offenders.append(f"{path}:{node.lineno}: from random import ...")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "random"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id in ("np", "numpy")
                and node.attr not in allowed_numpy
            ):
                offenders.append(f"{path}:{node.lineno}: np.random.{node.attr}")
    assert not offenders, "augmentation and sampling draw from a torch.Generator:\n" + "\n".join(offenders)


# ---------------------------------------------------------------- device following


@pytest.mark.parametrize(
    "op",
    [
        lambda x: A.random_resized_crop(x, 8, (0.3, 1.0), gen())[0],
        lambda x: A.random_flip(x, gen(), batch_dims=1)[0],
        lambda x: A.random_rotate(x, 20.0, gen(), batch_dims=1),
        lambda x: A.gaussian_blur(x, 1.0),
        lambda x: A.gain_offset(x, 0.2, gen(), batch_dims=1),
        lambda x: A.channel_jitter(x, 0.2, gen()),
    ],
    ids=["crop", "flip", "rotate", "blur", "gain_offset", "channel_jitter"],
)
@pytest.mark.parametrize("device,dtype", [("meta", torch.float32), ("cpu", torch.float64)])
def test_ops_follow_their_input_device_and_dtype(op, device, dtype):
    x = torch.ones(2, 3, 16, 16, device=device, dtype=dtype)
    y = op(x)
    assert y.device.type == device and y.dtype == dtype


def test_recipes_keep_a_float64_image_in_float64():
    views = MultiCrop(16, 8, MultiCropOptions(blur_prob=1.0, channel_jitter=0.1), gen())(torch.rand(3, 24, 24, dtype=torch.float64))
    assert all(v.dtype == torch.float64 for v in views)
    (view,) = ConVIRTImageView(16, ConVIRTViewOptions(blur_prob=1.0), gen())(torch.rand(3, 24, 24, dtype=torch.float64))
    assert view.dtype == torch.float64
