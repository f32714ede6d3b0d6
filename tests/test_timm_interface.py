"""The backbone interface checked against timm itself, on every supported ViT variant.

Every registered adapter kind runs through timm's own ``Block``/``Attention`` forward (hooks, no copy),
so a variant timm adds a branch to (the attention ``gate``) is computed exactly as timm computes it.
"""

import copy
import inspect

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from insitu.adapters import ADAPTERS, AdaptedBackbone, adapters_from_package, create_adapters, merge_lora
from insitu.adapters.package import save_package
from insitu.backbones.vit import ViTBackbone, embed_tokens

HAS_GATE = "gated" in inspect.signature(Attention.__init__).parameters


class GatedAttention(Attention):
    """timm's Attention with its sigmoid output gate switched on (no timm ViT preset enables it)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - passes timm's arguments through
        super().__init__(*args, gated=True, **kwargs)


VARIANTS = {
    "plain": {},
    "layerscale_qknorm": {"init_values": 0.5, "qk_norm": True},
    "registers_with_cls": {"reg_tokens": 2, "no_embed_class": True},
    "registers_no_cls": {"class_token": False, "reg_tokens": 2, "no_embed_class": True, "global_pool": "avg"},
    "gated": {"attn_layer": GatedAttention},
}
VARIANT_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(name == "gated" and not HAS_GATE, reason="timm without gated attention"))
    for name in VARIANTS
]


def make_backbone(variant: str) -> ViTBackbone:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True, **VARIANTS[variant]
    )
    for p in vit.parameters():  # timm zero-initialises some tensors (gate bias, reg tokens): make every path matter
        torch.nn.init.normal_(p, std=0.2)
    return ViTBackbone(vit, f"test:{variant}").eval()


def every_kind_config(kind: str) -> dict:
    return {"kind": kind, "blocks": "all", **({"rank": 4, "targets": ["qkv", "proj"]} if kind == "lora" else {"bottleneck_dim": 8})}


def perturb(adapters: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.2)


def timm_attention(bb: ViTBackbone, x: torch.Tensor, adapted: AdaptedBackbone) -> torch.Tensor:
    """The last block's probabilities as timm itself computes them (unfused path, read at attn_drop)."""
    attn = bb.vit.blocks[-1].attn
    seen = {}
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, _a, out: seen.setdefault("p", out))
    try:
        adapted.forward_tokens(x)
    finally:
        handle.remove()
        attn.fused_attn = True
    p = bb.num_prefix_tokens
    probs = seen["p"]
    return probs[:, :, 0, p:] if bb.has_class_token else probs[:, :, p:, p:].mean(2)


def test_the_gated_variant_is_gated():
    assert HAS_GATE, "the installed timm has no gated attention: drop the 'gated' variant only if timm removed it"
    assert all(b.attn.gate is not None for b in make_backbone("gated").vit.blocks)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_tokens_and_intermediates_match_timm(variant):
    """The one private timm call (``_pos_embed`` in `embed_tokens`) still gives timm's own forward."""
    bb = make_backbone(variant)
    x = torch.randn(2, 3, 32, 40)
    want = bb.vit.forward_features(x)
    cls, patches, grid = bb.forward_tokens(x)
    p = bb.num_prefix_tokens
    assert grid == (4, 5) and embed_tokens(bb.vit, x).shape == (2, 20 + p, 48)
    assert_close(patches, want[:, p:])
    assert_close(cls, want[:, 0] if bb.has_class_token else want[:, p:].mean(1))
    maps = bb.vit.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
    assert_close(bb.forward_intermediates(x, 2), maps)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_every_adapter_kind_is_the_identity_at_zero_init_and_acts_once_perturbed(variant, kind):
    bb = make_backbone(variant)
    adapted = AdaptedBackbone(bb, create_adapters(bb, every_kind_config(kind)))
    bare = AdaptedBackbone(bb, None)
    x = torch.randn(2, 3, 32, 32)
    assert_close(adapted.forward_tokens(x), bare.forward_tokens(x), rtol=0, atol=0)
    assert_close(adapted.forward_with_attention(x), bare.forward_with_attention(x), rtol=0, atol=0)
    assert_close(adapted.forward_intermediates(x, 2), bare.forward_intermediates(x, 2), rtol=0, atol=0)
    perturb(adapted.adapters)
    cls, patches, _ = adapted.forward_tokens(x)
    ref_cls, ref_patches, _ = bare.forward_tokens(x)
    assert not torch.allclose(cls, ref_cls, atol=1e-4) and not torch.allclose(patches, ref_patches, atol=1e-4)
    cls.sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapted.adapters.parameters())


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
def test_lora_equals_its_merged_weights(variant):
    """LoRA hooks on timm's qkv/proj compute exactly a model whose weights hold the delta (gate included)."""
    bb = make_backbone(variant)
    adapters = create_adapters(bb, every_kind_config("lora"))
    perturb(adapters)
    merged = copy.deepcopy(bb.vit)
    merged.load_state_dict(merge_lora(bb.vit, adapters))
    x = torch.randn(2, 3, 32, 32)
    assert_close(AdaptedBackbone(bb, adapters).forward_tokens(x), ViTBackbone(merged, "merged").forward_tokens(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
@pytest.mark.parametrize("kind", [None, *ADAPTERS.names()])
def test_attention_maps_match_timms_attention(variant, kind):
    bb = make_backbone(variant)
    adapters = create_adapters(bb, every_kind_config(kind)) if kind else None
    if adapters is not None:
        perturb(adapters)
    adapted = AdaptedBackbone(bb, adapters)
    x = torch.randn(2, 3, 32, 32)
    cls, patches, grid, attn = adapted.forward_with_attention(x)
    assert attn.shape == (2, 2, 16)
    assert_close(attn, timm_attention(bb, x, adapted), atol=1e-6, rtol=1e-5)
    assert_close((cls, patches, grid), adapted.forward_tokens(x))


def test_old_lora_packages_keep_their_tensor_names(tmp_path):
    """LoRA tensors are stored as qkv.<block>.A/B and proj.<block>.A/B: a dict in that format still loads."""
    bb = make_backbone("plain")
    config = {"kind": "lora", "blocks": [0, 1], "rank": 2, "alpha": 4.0, "targets": ["qkv", "proj"], "dim": 48}
    torch.manual_seed(2)
    old = {
        f"{t}.{i}.{m}": torch.randn(shape) * 0.1
        for t, out in (("qkv", 144), ("proj", 48))
        for i in (0, 1)
        for m, shape in (("A", (2, 48)), ("B", (out, 2)))
    }
    adapters = adapters_from_package(config)  # the flat layout packages stored before issue 18
    adapters.load_state_dict(old, strict=True)
    # an independent reference: the LoRA formula W + (alpha / r) B A folded into the weights by hand
    state = {k: v.clone() for k, v in bb.vit.state_dict().items()}
    for t in ("qkv", "proj"):
        for i in (0, 1):
            state[f"blocks.{i}.attn.{t}.weight"] += (4.0 / 2) * old[f"{t}.{i}.B"] @ old[f"{t}.{i}.A"]
    ref = copy.deepcopy(bb.vit)
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    assert_close(AdaptedBackbone(bb, adapters).forward_tokens(x), ViTBackbone(ref, "ref").forward_tokens(x), atol=1e-5, rtol=1e-4)
    save_package(tmp_path / "pkg", bb, adapters)
    assert set(load_file(str(tmp_path / "pkg" / "adapter.safetensors"))) == {f"adapter.{k}" for k in old}


def test_attention_maps_refuse_other_attention_modules():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0, attn_layer="diff")
    with pytest.raises(TypeError, match="attention maps need timm's Attention"):
        ViTBackbone(vit, "diff").forward_with_attention(torch.randn(1, 3, 32, 32))
