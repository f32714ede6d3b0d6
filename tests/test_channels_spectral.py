"""Channel adaptation for multispectral inputs: the fixed choices (mean, repeat, rgb_map, rgb_nearest) and the trainable
``spectral`` adapters, on a tiny ViT and a constructed 13-band Sentinel-2 tensor."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import apply_package, load_package, save_package
from insitu.backbones import create_backbone
from insitu.backbones.channels import METHODS, adapt_patch_embed, rgb_sources
from insitu.config import load_config
from insitu.errors import ConfigError
from tests.conftest import TINY_BACKBONE, tiny_config

S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]  # EuroSAT MS file order


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    path = tmp_path_factory.mktemp("w") / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit.patch_embed.proj.weight.detach().clone()


def backbone(path, method, bands=S2):
    return create_backbone({**TINY_BACKBONE, "weights": str(path), "in_chans": len(S2), "channel_init": method, "bands": bands})


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_13_filters_and_runs(rgb_weights, method):
    path, src = rgb_weights
    bb = backbone(path, method)
    w = bb.vit.patch_embed.proj.weight
    assert w.shape == (src.shape[0], 13, 8, 8)
    # every output filter keeps the source filter's norm (activation variance for unit-variance bands)
    assert torch.allclose(w.flatten(1).norm(dim=1), src.flatten(1).norm(dim=1), rtol=1e-4)
    cls, patches, grid = bb.forward_tokens(torch.randn(2, 13, 32, 32))
    assert cls.shape == (2, 48) and patches.shape == (2, 16, 48) and grid == (4, 4)


def _proportional(a, b):
    """a = s · b for one positive scalar per output filter."""
    s = a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    return torch.allclose(a, b * s.view(-1, 1, 1), atol=1e-6)


def test_rgb_map_puts_b04_b03_b02_on_the_rgb_filters(rgb_weights):
    _, src = rgb_weights
    new = adapt_patch_embed(src, 13, "rgb_map", S2)
    scale = (new[:, 3].flatten(1).norm(dim=1) / src[:, 0].flatten(1).norm(dim=1)).view(-1, 1, 1)  # one rescale per output filter
    for band, rgb in (("B04", 0), ("B03", 1), ("B02", 2)):
        assert torch.allclose(new[:, S2.index(band)], src[:, rgb] * scale, atol=1e-6), band
    mean = src.mean(dim=1)
    for band in ("B01", "B08", "B11", "B8A"):  # the rest: the mean filter
        assert torch.allclose(new[:, S2.index(band)], mean * scale, atol=1e-6), band
    assert not torch.allclose(new[:, S2.index("B04")], new[:, S2.index("B02")])


def test_rgb_nearest_takes_the_closest_rgb_band_by_wavelength(rgb_weights):
    _, src = rgb_weights
    assert rgb_sources(3, 13, S2, nearest=True) == [2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # B01 (443 nm) is nearest blue
    new = adapt_patch_embed(src, 13, "rgb_nearest", S2)
    assert _proportional(new[:, S2.index("B8A")], src[:, 0]) and _proportional(new[:, S2.index("B01")], src[:, 2])
    assert _proportional(new[:, S2.index("B03")], src[:, 1])


def test_repeat_cycles_the_source_filters(rgb_weights):
    _, src = rgb_weights
    new = adapt_patch_embed(src, 13, "repeat")
    assert _proportional(new[:, 3], src[:, 0]) and _proportional(new[:, 12], src[:, 0]) and _proportional(new[:, 4], src[:, 1])


def test_unknown_method_and_missing_band_names_are_config_errors(rgb_weights, tmp_path):
    path, src = rgb_weights
    with pytest.raises(ConfigError, match="backbone.channel_init 'spectral_magic'"):
        adapt_patch_embed(src, 13, "spectral_magic", S2)
    with pytest.raises(ConfigError, match="backbone.bands"):
        backbone(path, "rgb_map", bands=None)
    with pytest.raises(ConfigError, match="backbone.bands"):
        backbone(path, "rgb_nearest", bands=S2[:-1])
    with pytest.raises(ConfigError, match="'VV' has no known central wavelength"):
        adapt_patch_embed(src, 13, "rgb_nearest", ["VV", *S2[1:]])
    with pytest.raises(ConfigError, match="names no red/green/blue"):
        adapt_patch_embed(src, 2, "rgb_map", ["VV", "VH"])
    with pytest.raises(ConfigError, match="backbone.channel_init"):  # in a config: refused when it is validated, naming the key
        load_config(tiny_config(tmp_path, tmp_path / "runs", backbone={"channel_init": "spectral_magic"}))


def test_spectral_adapters_train_per_band_filters_and_nothing_else(rgb_weights, tmp_path):
    path, _ = rgb_weights
    bb = backbone(path, "mean")
    adapters = create_adapters(bb, {"name": "spectral", "options": {"blocks": "all", "bottleneck_dim": 8}})
    assert adapters.delta.shape == (48, 13, 8, 8) and "delta" in adapters.state_dict()
    model = AdaptedBackbone(bb, adapters)
    x = torch.randn(2, 13, 32, 32)
    assert torch.equal(model.forward_tokens(x)[0], bb.forward_tokens(x)[0])  # untrained: bit-identical
    model.forward_tokens(x)[0].pow(2).sum().backward()
    assert adapters.delta.grad is not None and adapters.delta.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())  # the base stays frozen
    # with mean, every band has one filter: swapping two bands changes nothing; a trained delta tells them apart
    swapped = x[:, [1, 0, *range(2, 13)]]
    assert torch.allclose(bb.forward_tokens(x)[0], bb.forward_tokens(swapped)[0], atol=1e-5)
    with torch.no_grad():
        adapters.delta.normal_(std=0.05)
    assert not torch.allclose(model.forward_tokens(x)[0], model.forward_tokens(swapped)[0], atol=1e-3)
    # the delta travels in the package and is applied again
    save_package(tmp_path / "pkg", bb, adapters, normalizer={"mean": [0.0] * 13, "std": [1.0] * 13})
    again = apply_package(load_package(tmp_path / "pkg"), bb)
    assert torch.allclose(again.forward_tokens(x)[0], model.forward_tokens(x)[0], atol=1e-6)


def test_random_delta_control_keeps_the_adapters_and_the_norm_and_changes_the_directions(rgb_weights, tmp_path):
    from benchmarks.bench_channels import random_delta_job

    path, _ = rgb_weights
    spec = {**TINY_BACKBONE, "weights": str(path), "in_chans": len(S2), "channel_init": "rgb_nearest", "bands": S2}
    bb = create_backbone(spec)
    adapters = create_adapters(bb, {"name": "spectral", "options": {"blocks": "all", "bottleneck_dim": 8}})
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    save_package(tmp_path / "trained", bb, adapters, normalizer={"mean": [0.0] * 13, "std": [1.0] * 13}, config={"backbone": spec})
    out = random_delta_job(str(tmp_path / "trained"), str(tmp_path / "control"), seed=0, backbone=spec)
    trained, control = load_package(tmp_path / "trained").adapter_state(), load_package(out["adapter"]).adapter_state()
    assert control.keys() == trained.keys()
    assert all(torch.equal(control[k], trained[k]) for k in trained if k != "delta")  # the bottleneck adapters are kept
    assert control["delta"].norm() == pytest.approx(float(trained["delta"].norm()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(control["delta"].flatten(), trained["delta"].flatten(), dim=0)
    assert abs(float(cos)) < 0.1  # a new direction
    assert out["delta_norm"] == pytest.approx(float(trained["delta"].norm()), rel=1e-5)
