"""Cached views (``train.cached_views``), the SimCLR objective and the quickstart's land-cover demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.adapters import create_adapters
from insitu.backbones import create_backbone
from insitu.config import validate_config
from insitu.domains.synthetic import LAND_COLOURS, LAND_COVER, write_land_cover_folders
from insitu.errors import ConfigError
from insitu.heads.stats import GAIN, LOSS, UNRESOLVED
from insitu.objectives import create_objective
from insitu.pipelines import view_cache
from insitu.pipelines.data import SampleDataset, ScannedData, fit_normalizer
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import ProbeRow
from insitu.pipelines.probe_plan import ProbeResult
from insitu.pipelines.quickstart import verdict_text
from tests.conftest import TINY_BACKBONE, tiny_config


def _seeded(adapters):
    torch.manual_seed(1)
    for p in adapters.parameters():
        p.data.normal_(0, 0.1)
    return adapters


@pytest.mark.parametrize("kind", ["bottleneck", "sequential", "lora"])
def test_cached_prefix_tokens_give_the_full_forward(kind):
    bb = create_backbone(TINY_BACKBONE)
    adapters = _seeded(create_adapters(bb, {"kind": kind, "blocks": 1, **({"rank": 2} if kind == "lora" else {"bottleneck_dim": 8})}))
    x = torch.randn(3, 3, 32, 32)
    cls, patches, grid = bb.forward_tokens(x, adapters)
    cached = bb.prefix_tokens(x, adapters.first_block)
    cls_c, patches_c, grid_c = bb.forward_tokens(cached, adapters)
    assert grid_c == grid == (4, 4)
    torch.testing.assert_close(cls_c, cls)
    torch.testing.assert_close(patches_c, patches)
    assert not cached.requires_grad
    # gradients reach the adapters through the cached path
    cls_c.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())


def test_cached_tokens_without_a_frozen_prefix_are_refused():
    bb = create_backbone(TINY_BACKBONE)
    every = create_adapters(bb, {"blocks": "all", "bottleneck_dim": 8})
    tokens = bb.prefix_tokens(torch.randn(1, 3, 32, 32), 1)
    with pytest.raises(ValueError, match="start after block 0"):
        bb.forward_tokens(tokens, every)
    with pytest.raises(ValueError, match="not prefix tokens"):
        bb.forward_tokens(tokens[:, :-1], create_adapters(bb, {"blocks": 1, "bottleneck_dim": 8}))


def _dataset(root, objective):
    data = ScannedData.scan(validate_config(tiny_config(root, root.parent / "runs"), "t").data)
    items = data.manifest.items
    return SampleDataset(data, items, fit_normalizer(data, items), objective.view_transform(), 32)


def test_build_view_cache_shapes_and_draws(shapes_dir):
    bb = create_backbone(TINY_BACKBONE)
    objective = create_objective("simclr", bb.embed_dim, 8, 32, {"hidden_dim": 16, "out_dim": 8}, 10)
    source = _dataset(shapes_dir, objective)
    cache = view_cache.build_view_cache(source, bb, first_block=1, k=3)
    n = len(source)
    assert len(cache) == n and len(cache.tokens) == 2  # two view positions
    assert all(t.shape == (n, 3, 17, bb.embed_dim) for t in cache.tokens)  # 4×4 patches + CLS
    # each cached view is the prefix output of some view of that image: distinct draws differ
    assert not torch.equal(cache.tokens[0][0, 0], cache.tokens[0][0, 1])
    item = cache[0]
    assert item["item_id"] == source.items[0].item_id and [v.shape for v in item["views"]] == [(17, bb.embed_dim)] * 2


def test_view_cache_memory_limit_is_a_typed_error(shapes_dir, monkeypatch):
    bb = create_backbone(TINY_BACKBONE)
    objective = create_objective("simclr", bb.embed_dim, 8, 32, {"hidden_dim": 16, "out_dim": 8}, 10)
    monkeypatch.setattr(view_cache, "MAX_CACHE_BYTES", 1000)
    with pytest.raises(ConfigError, match="lower train.cached_views"):
        view_cache.build_view_cache(_dataset(shapes_dir, objective), bb, first_block=1, k=2)


def test_view_cache_refuses_pixel_changing_objectives_and_no_prefix():
    bb = create_backbone(TINY_BACKBONE)
    glare = create_objective("glare", bb.embed_dim, 8, 32, {"out_dim": 32}, 10)
    with pytest.raises(ConfigError, match="objective 'glare'"):
        view_cache.check_cacheable(glare, bb, 1, False)
    dino = create_objective("dino", bb.embed_dim, 8, 32, {"out_dim": 32}, 10)
    with pytest.raises(ConfigError, match="frozen prefix"):
        view_cache.check_cacheable(dino, bb, 0, False)
    with pytest.raises(ConfigError, match="frozen prefix"):
        view_cache.check_cacheable(dino, bb, 1, True)


def test_pretrain_with_cached_views_trains_the_adapters(shapes_dir, tmp_path):
    raw = tiny_config(
        shapes_dir,
        tmp_path / "runs",
        adapter={"blocks": 1},
        objective={"name": "simclr", "options": {"hidden_dim": 16, "out_dim": 8}},
        train={"max_steps": 4, "cached_views": 2, "lr": 1e-2},
    )
    result = pretrain(validate_config(raw, "t"), quiet=True)
    assert result.steps == 4 and np.isfinite(result.final_loss)
    from safetensors.torch import load_file

    tensors = load_file(result.adapter_dir / "adapter.safetensors")
    ups = [v for k, v in tensors.items() if k.endswith("up.weight")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # zero-initialised, so training moved them
    assert any(".simclr." in k or k.startswith("simclr.") for k in tensors)  # the projector travels with the package
    assert json.loads((result.adapter_dir / "insitu.json").read_text())["objective"]["name"] == "simclr"
    health = json.loads((result.run_dir / "summary.json").read_text())["health"]
    assert "rankme" in health  # the health monitor measures cached (token) views too


def test_simclr_refuses_more_than_two_views():
    with pytest.raises(ValueError, match="exactly two views"):
        create_objective("simclr", 48, 8, 32, {"views": {"global_crops": 2, "local_crops": 2}}, 10)


def test_land_cover_demo_writes_rgb_class_folders_that_differ_in_colour(tmp_path):
    write_land_cover_folders(tmp_path, seed=3, n_per_class=6, size=32)
    means = []
    for name in LAND_COVER:
        files = sorted((tmp_path / "train" / name).glob("*.png"))
        assert len(files) == 6 and len(list((tmp_path / "test" / name).glob("*.png"))) == 6
        with Image.open(files[0]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
        rgb = np.stack([np.asarray(Image.open(f), dtype=np.float64) / 255 for f in files])
        means.append(rgb.mean((0, 1, 2)))
    # each class's mean colour is nearest to its own reference colour (hue carries the class)
    chroma = lambda c: c / c.sum(-1, keepdims=True)  # noqa: E731
    nearest = np.abs(chroma(np.array(means))[:, None] - chroma(LAND_COLOURS)[None]).sum(-1).argmin(1)
    assert nearest.tolist() == list(range(len(LAND_COVER)))
    # seeded: the same seed writes the same pixels
    again = tmp_path / "again"
    write_land_cover_folders(again, seed=3, n_per_class=6, size=32)
    first = sorted((tmp_path / "train").rglob("*.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again / first.relative_to(tmp_path))))


def _row(name, results):
    return ProbeRow(name, 0.0, 0.0, 0, 10, 10, results=results)


def _result(model, delta=None, low=None, high=None, verdict=""):
    return ProbeResult(model, "linear", 0.1, "accuracy", 0.8, 0.05, 5, 16, 160, delta, low, high, verdict)


@pytest.mark.parametrize(
    ("low", "high", "verdict", "words"),
    [
        (0.01, 0.05, GAIN, "Adaptation helped"),
        (-0.05, -0.01, LOSS, "Adaptation hurt"),
        (-0.02, 0.05, UNRESOLVED, "did not change the probes by more than they vary"),
    ],
)
def test_verdict_text_says_what_the_probe_resolved(low, high, verdict, words):
    rows = [_row("frozen backbone", [_result("frozen backbone")]), _row("adapted", [_result("adapted", 0.02, low, high, verdict)])]
    text = verdict_text(rows)
    assert words in text and f"[{low:+.3f}, {high:+.3f}]" in text and "16 images" in text


def test_channel_jitter_changes_channels_independently():
    import random

    from insitu.objectives.views import MultiCrop, MultiCropOptions

    image = torch.ones(3, 16, 16)
    plain = MultiCrop(16, 8, MultiCropOptions(global_crops=4, local_crops=0, blur_prob=0, intensity=0))
    jitter = MultiCrop(16, 8, MultiCropOptions(global_crops=4, local_crops=0, blur_prob=0, intensity=0, channel_jitter=0.3))
    random.seed(0)
    assert all(torch.allclose(v, image) for v in plain(image))
    views = jitter(image)
    for v in views:
        means = v.mean((1, 2))
        assert float(means.max() - means.min()) > 1e-3 and float((means - 1).abs().max()) <= 0.6 + 1e-6
