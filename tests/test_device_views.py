"""``views.device``: multi-crop views built from whole batches on the training device (GPU batch augmentation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insitu.config import load_config
from insitu.errors import ConfigError
from insitu.objectives import augment as A
from insitu.objectives.views import MultiCrop, MultiCropOptions
from insitu.pipelines.pretrain import pretrain
from tests.conftest import tiny_config


def test_batched_crops_match_the_per_image_crop_inside_the_box_and_are_an_area_mean_at_half_size():
    x = torch.randn(3, 2, 20, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = A.resized_crops(x[:, :, :6, :6], [(0, 0, 6, 6)] * 3, 8)  # the whole image, upsampled: identical
    torch.testing.assert_close(whole, A.resized_crop(x[:, :, :6, :6], (0, 0, 6, 6), 8, antialias=False))
    boxes = [(0, 0, 8, 8), (5, 7, 6, 7), (12, 16, 8, 8)]  # (top, left, h, w), none larger than 8
    out = A.resized_crops(x, boxes, 8)
    for i, box in enumerate(boxes):  # the edge rows/columns read the image's pixels beyond the box instead of repeating the edge
        torch.testing.assert_close(out[i][..., 1:-1, 1:-1], A.resized_crop(x[i], box, 8, antialias=False)[..., 1:-1, 1:-1])
    half = A.resized_crops(x, [(2, 4, 16, 16)] * 3, 8)  # a 16 px box at 8 px: the mean of each 2×2 block
    torch.testing.assert_close(half, F.avg_pool2d(x[..., 2:18, 4:20], 2))


def test_per_image_blur_equals_the_single_image_blur_and_sigma_zero_leaves_an_image_alone():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = A.gaussian_blur_each(x, torch.tensor([1.5, 0.0]), radius=4)  # radius int(3 * 1.5) = gaussian_blur's
    torch.testing.assert_close(out[0], A.gaussian_blur(x[0], 1.5))
    torch.testing.assert_close(out[1], x[1])


def _crop(**opts) -> MultiCrop:
    return MultiCrop(32, 8, MultiCropOptions(global_crops=2, local_crops=2, blur_prob=0.5, channel_jitter=0.1, device=True, **opts))


def test_batch_views_are_seeded_follow_the_device_and_dtype_and_differ_per_image():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = _crop(), _crop()
    a.reseed(7)
    b.reseed(7)
    va, vb = a.batch(images), b.batch(images)
    assert [tuple(v.shape) for v in va] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float64 for v in va)
    for x, y in zip(va, vb, strict=True):
        torch.testing.assert_close(x, y)
    same = images[:1].expand(4, -1, -1, -1)  # one image four times: the draws differ per row
    v = a.batch(same)[0]
    assert not torch.allclose(v[0], v[1])
    meta = a.batch(images.to("meta"))  # nothing is made on another device than the images'
    assert all(m.device.type == "meta" for m in meta)


def test_device_views_refuse_per_image_use():
    with pytest.raises(ConfigError, match="views.device"):
        _crop()(torch.rand(3, 32, 32))


def test_pretrain_with_device_views_runs_and_refuses_the_view_cache(shapes_dir, tmp_path):
    views = {"local_crops": 1, "device": True}
    raw = tiny_config(
        shapes_dir,
        tmp_path / "runs",
        objective={"name": "dino", "options": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "views": views}},
    )
    result = pretrain(load_config(raw), quiet=True)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))
    again = pretrain(load_config({**raw, "out_dir": str(tmp_path / "again")}), quiet=True)
    assert again.final_loss == result.final_loss  # the views are a function of (seed, step, rank)
    cached = tiny_config(
        shapes_dir,
        tmp_path / "runs2",
        objective={"name": "simclr", "options": {"views": {"global_crops": 2, "local_crops": 0, "device": True}}},
        train={"cached_views": 2},
        adapter={"blocks": 1},
    )
    with pytest.raises(ConfigError, match="cached_views"):
        pretrain(load_config(cached), quiet=True)
