import pytest
import torch
from safetensors.torch import save_file

from insitu.adapters import AdaptedBackbone, create_adapters, resolve_blocks
from insitu.backbones import create_backbone
from insitu.errors import ConfigError
from tests.conftest import TINY_BACKBONE


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone(TINY_BACKBONE)


def test_forward_tokens_contract(backbone):
    x = torch.randn(2, 3, 32, 32)
    cls, patches, grid = backbone.forward_tokens(x)
    assert cls.shape == (2, 48) and patches.shape == (2, 16, 48) and grid == (4, 4)
    cls, patches, grid = backbone.forward_tokens(torch.randn(1, 3, 48, 64))  # any size divisible by the patch
    assert patches.shape == (1, 48, 48) and grid == (6, 8)
    assert backbone.embed_dim == 48 and backbone.patch_size == 8 and backbone.in_chans == 3
    assert all(not p.requires_grad for p in backbone.parameters())


def test_zero_initialised_adapters_are_bit_identical(backbone):
    adapters = create_adapters(backbone, {"blocks": "all", "bottleneck_dim": 8})
    x = torch.randn(3, 3, 32, 32)
    ref = backbone.forward_tokens(x)
    out = AdaptedBackbone(backbone, adapters).forward_tokens(x)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    # and not identical once the adapter's up-projection is non-zero
    torch.nn.init.normal_(adapters.layers["1"].up.weight)
    assert not torch.equal(ref[0], AdaptedBackbone(backbone, adapters).forward_tokens(x)[0])


def test_frozen_prefix_keeps_no_graph(backbone):
    adapters = create_adapters(backbone, {"blocks": 1})
    assert adapters.blocks == [1]
    seen = {}
    handle = backbone.vit.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    cls, _, _ = backbone.forward_tokens(torch.randn(2, 3, 32, 32), adapters)
    handle.remove()
    assert seen["out"].grad_fn is None  # block 0 ran under no_grad
    assert cls.grad_fn is not None
    cls.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in adapters.parameters())


def test_resolve_blocks():
    assert resolve_blocks("all", 4) == [0, 1, 2, 3]
    assert resolve_blocks(2, 4) == [2, 3]
    assert resolve_blocks([0, -1], 4) == [0, 3]
    with pytest.raises(ConfigError, match="more blocks than the backbone has"):
        resolve_blocks(5, 4)
    with pytest.raises(ConfigError, match="outside 0..3"):
        resolve_blocks([7], 4)


def test_fingerprint_tracks_weights(tmp_path, backbone):
    torch.manual_seed(123)  # the global RNG does not matter: init_seed decides random weights
    assert create_backbone(TINY_BACKBONE).fingerprint == backbone.fingerprint
    assert create_backbone({**TINY_BACKBONE, "init_seed": 1}).fingerprint != backbone.fingerprint
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.vit.state_dict().items()}, str(path))
    loaded = create_backbone({**TINY_BACKBONE, "weights": str(path)})
    assert loaded.fingerprint == backbone.fingerprint
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.forward_tokens(x)[0], backbone.forward_tokens(x)[0])


def test_local_weights_errors(tmp_path, backbone):
    (tmp_path / "w.pt").write_bytes(b"not really")
    with pytest.raises(ConfigError, match=r"cannot be read with weights_only=True"):
        create_backbone({**TINY_BACKBONE, "weights": str(tmp_path / "w.pt")})
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.vit.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="does not fit the configured architecture"):
        create_backbone({**TINY_BACKBONE, "kwargs": {"depth": 3, "embed_dim": 48, "num_heads": 2}, "weights": str(path)})


def test_unknown_timm_model():
    with pytest.raises(ConfigError, match="is not a timm model"):
        create_backbone({"name": "vit_nonexistent_patch3"})


def test_single_channel_backbone():
    bb = create_backbone({**TINY_BACKBONE, "in_chans": 1})
    assert bb.forward_tokens(torch.randn(2, 1, 32, 32))[0].shape == (2, 48)
