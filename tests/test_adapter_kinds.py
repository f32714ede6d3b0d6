"""Sequential and LoRA adapters, several packages on one backbone, LoRA merge."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from insitu.adapters import AdaptedBackbone, MultiAdapterBackbone, create_adapters, merge_lora
from insitu.adapters.package import apply_package, load_package, save_package
from insitu.backbones import create_backbone
from tests.conftest import TINY_BACKBONE


@pytest.fixture
def bb():
    return create_backbone(TINY_BACKBONE)


@pytest.mark.parametrize(
    "cfg",
    [{"kind": "sequential", "bottleneck_dim": 8}, {"kind": "lora", "rank": 4}, {"kind": "lora", "rank": 2, "targets": ["qkv", "proj"]}],
)
def test_zero_init_is_bit_identical_and_training_changes_it(bb, cfg):
    adapters = create_adapters(bb, cfg)
    x = torch.randn(2, 3, 32, 32)
    ref = bb.forward_tokens(x)[0]
    assert torch.equal(AdaptedBackbone(bb, adapters).forward_tokens(x)[0], ref)
    loss = AdaptedBackbone(bb, adapters).forward_tokens(x)[0].pow(2).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert all(p.grad is None for p in bb.parameters())


def test_lora_merge_matches_adapted_forward(bb, tmp_path):
    adapters = create_adapters(bb, {"kind": "lora", "rank": 4, "targets": ["qkv", "proj"], "blocks": 1})
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    want = AdaptedBackbone(bb, adapters).forward_tokens(x)[0]
    save_file(merge_lora(bb.vit, adapters), str(tmp_path / "merged.safetensors"))
    merged = create_backbone({**TINY_BACKBONE, "weights": str(tmp_path / "merged.safetensors")})
    assert (merged.forward_tokens(x)[0] - want).abs().max() < 1e-4
    assert merged.fingerprint != bb.fingerprint
    assert set(load_file(str(tmp_path / "merged.safetensors"))) == set(bb.vit.state_dict())


def test_packages_of_every_kind_round_trip(bb, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    for kind in ("bottleneck", "sequential", "lora"):
        adapters = create_adapters(bb, {"kind": kind, **({"rank": 2} if kind == "lora" else {"bottleneck_dim": 8})})
        for p in adapters.parameters():
            torch.nn.init.normal_(p, std=0.05)
        path = save_package(tmp_path / kind, bb, adapters)
        assert torch.equal(apply_package(path, bb).forward_tokens(x)[0], bb.forward_tokens(x, adapters)[0]), kind


def test_several_packages_switched_by_name(bb, tmp_path):
    multi = MultiAdapterBackbone(bb)
    x = torch.randn(1, 3, 32, 32)
    outs = {}
    for site, seed in (("site_a", 1), ("site_b", 2)):
        torch.manual_seed(seed)
        adapters = create_adapters(bb, {"bottleneck_dim": 8})
        for p in adapters.parameters():
            torch.nn.init.normal_(p, std=0.05)
        pkg = load_package(save_package(tmp_path / site, bb, adapters))
        multi.add(site, apply_package(pkg, bb).adapters)
        outs[site] = bb.forward_tokens(x, adapters)[0]
    assert torch.equal(multi.use("site_b").forward_tokens(x)[0], outs["site_b"])
    assert torch.equal(multi.use("site_a").forward_tokens(x)[0], outs["site_a"])
    assert torch.equal(multi.use(None).forward_tokens(x)[0], bb.forward_tokens(x)[0])
    with pytest.raises(KeyError, match="loaded: \\['site_a', 'site_b'\\]"):
        multi.use("site_c")
