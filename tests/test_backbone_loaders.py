"""Each weight format loads through insitu and matches its own library's forward (no network)."""

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from insitu.backbones import create_backbone
from insitu.backbones.channels import adapt_patch_embed
from insitu.errors import ConfigError
from tests.conftest import TINY_BACKBONE

ARCH = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def timm_tiny(in_chans=3, img_size=32):
    torch.manual_seed(7)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size, patch_size=8, **ARCH
    ).eval()


def spec(**kw):
    return {**TINY_BACKBONE, **kw}


def test_timm_safetensors_matches_timm_forward(tmp_path):
    ref = timm_tiny()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = create_backbone(spec(weights=str(tmp_path / "w.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    want = ref.forward_features(x)
    cls, patches, _ = bb.forward_tokens(x)
    assert (cls - want[:, 0]).abs().max() < 1e-4 and (patches - want[:, 1:]).abs().max() < 1e-4
    assert bb.native_size == 32


def test_pytorch_checkpoint_weights_only(tmp_path, caplog):
    ref = timm_tiny()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3}, tmp_path / "w.pth")
    bb = create_backbone(spec(weights=str(tmp_path / "w.pth")))
    x = torch.randn(1, 3, 32, 32)
    assert (bb.forward_tokens(x)[0] - ref.forward_features(x)[:, 0]).abs().max() < 1e-4
    assert "pickle-based checkpoint" in caplog.text


def test_malicious_checkpoint_is_not_executed(tmp_path):
    class Canary:
        def __reduce__(self):
            return (open, (str(tmp_path / "CANARY"), "w"))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Canary()}))
    with pytest.raises(ConfigError, match="weights_only=True"):
        create_backbone(spec(weights=str(tmp_path / "evil.pth")))
    assert not (tmp_path / "CANARY").exists()


def test_hf_dinov2_folder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=8, image_size=32, num_channels=3
    )
    torch.manual_seed(3)
    model = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():  # non-trivial layer scales so the mapping of ls1/ls2 is tested
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.5, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "rad-dino-like")
    bb = create_backbone({"weights": str(tmp_path / "rad-dino-like"), "img_size": 32, "in_chans": 3})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
    cls, patches, grid = bb.forward_tokens(x)
    assert grid == (4, 4)
    assert (cls - want[:, 0]).abs().max() < 1e-4
    assert (patches - want[:, 1:]).abs().max() < 1e-4
    assert bb.source.startswith("hf-dinov2@") and bb.embed_dim == 48


def test_channel_adaptation_grey_and_sentinel2(tmp_path):
    ref = timm_tiny()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    grey = create_backbone(spec(weights=str(tmp_path / "w.safetensors"), in_chans=1))
    assert grey.forward_tokens(torch.randn(2, 1, 32, 32))[0].shape == (2, 48)
    s2_bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]
    s2 = create_backbone(spec(weights=str(tmp_path / "w.safetensors"), in_chans=12, channel_init="rgb_map", bands=s2_bands))
    w_src = ref.patch_embed.proj.weight
    w_new = s2.vit.patch_embed.proj.weight
    assert w_new.shape[1] == 12
    # filter norms preserved; B04 carries the red filter's direction, B02 the blue's
    assert torch.allclose(w_new.flatten(1).norm(dim=1), w_src.flatten(1).norm(dim=1), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity
    assert cos(w_new[:, 3].flatten(), w_src[:, 0].flatten(), dim=0) > 0.99
    assert cos(w_new[:, 1].flatten(), w_src[:, 2].flatten(), dim=0) > 0.99
    assert s2.forward_tokens(torch.randn(1, 12, 32, 32))[0].shape == (1, 48)


def test_channel_adaptation_keeps_activation_variance():
    torch.manual_seed(0)
    w = torch.randn(64, 3, 8, 8) * 0.02
    x3, x13 = torch.randn(256, 3, 8, 8), torch.randn(256, 13, 8, 8)
    var3 = torch.nn.functional.conv2d(x3, w).var()
    for method in ("mean", "repeat"):
        var13 = torch.nn.functional.conv2d(x13, adapt_patch_embed(w, 13, method)).var()
        assert 0.8 < float(var13 / var3) < 1.25, method
    with pytest.raises(ConfigError, match="needs backbone.bands"):
        adapt_patch_embed(w, 13, "rgb_map", None)
    with pytest.raises(ConfigError, match="names no red/green/blue"):
        adapt_patch_embed(w, 2, "rgb_map", ["VV", "VH"])


def test_position_embeddings_resampled_to_any_size(tmp_path):
    ref = timm_tiny(img_size=32)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bb = create_backbone(spec(weights=str(tmp_path / "w.safetensors"), img_size=64))
    assert bb.native_size == 32 and bb.img_size == 64
    assert bb.forward_tokens(torch.randn(1, 3, 64, 64))[1].shape == (1, 64, 48)
    assert bb.forward_tokens(torch.randn(1, 3, 40, 24))[2] == (5, 3)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        bb.forward_tokens(torch.randn(1, 3, 30, 32))


def test_forward_intermediates():
    bb = create_backbone(TINY_BACKBONE)
    maps = bb.forward_intermediates(torch.randn(2, 3, 32, 32), indices=2)
    assert [tuple(m.shape) for m in maps] == [(2, 48, 4, 4)] * 2
    last = bb.forward_tokens(torch.randn(1, 3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(bb.forward_intermediates(x, [-1])[0].flatten(2).transpose(1, 2), bb.forward_tokens(x)[1])
    assert last[1].shape == (1, 16, 48)


def test_cls_attention_matches_timm_attention_probabilities():
    bb = create_backbone(TINY_BACKBONE)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    last = bb.vit.blocks[-1]
    last.attn.fused_attn = False  # let timm compute explicit probabilities we can capture
    handle = last.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("p", o))
    cls, patches, grid, attn = bb.forward_with_attention(x)
    handle.remove()
    assert attn.shape == (2, 2, 16)
    assert torch.allclose(attn, seen["p"][:, :, 0, 1:], atol=1e-6)
    assert torch.allclose(cls, bb.forward_tokens(x)[0], atol=1e-6)
