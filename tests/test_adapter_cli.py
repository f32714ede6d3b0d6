"""`insitu adapter inspect|verify|export|apply` on real packages."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import save_package
from insitu.backbones import create_backbone
from insitu.cli import main
from tests.conftest import TINY_BACKBONE


@pytest.fixture
def setup(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": TINY_BACKBONE}))
    bb = create_backbone(TINY_BACKBONE)
    out = {}
    for kind in ("bottleneck", "lora"):
        adapters = create_adapters(bb, {"kind": kind, **({"rank": 2} if kind == "lora" else {"bottleneck_dim": 8})})
        for p in adapters.parameters():
            torch.nn.init.normal_(p, std=0.05)
        out[kind] = (save_package(tmp_path / kind, bb, adapters, input_info={"domain": "images", "image_size": 32}), adapters)
    return tmp_path, base, bb, out


def test_verify_against_right_and_wrong_base(setup, capsys):
    tmp_path, base, _, pkgs = setup
    assert main(["adapter", "verify", str(pkgs["bottleneck"][0]), "--base", str(base)]) == 0
    assert "compatible with" in capsys.readouterr().out
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"backbone": {**TINY_BACKBONE, "init_seed": 5}}))
    assert main(["adapter", "verify", str(pkgs["bottleneck"][0]), "--base", str(other)]) == 2
    assert "fingerprint: package" in capsys.readouterr().err.replace("\n", "")


def test_export_zip_unpack_and_inspect(setup, capsys):
    tmp_path, _, _, pkgs = setup
    zpath = tmp_path / "site.zip"
    assert main(["adapter", "export", str(pkgs["bottleneck"][0]), "--out", str(zpath)]) == 0
    assert main(["adapter", "inspect", str(zpath)]) == 0
    assert main(["adapter", "export", str(zpath), "--out", str(tmp_path / "unpacked")]) == 0
    assert (tmp_path / "unpacked" / "adapter.safetensors").read_bytes() == (pkgs["bottleneck"][0] / "adapter.safetensors").read_bytes()
    assert main(["adapter", "inspect", str(tmp_path / "unpacked"), "--json"]) == 0
    assert '"format": "insitu-adapter"' in capsys.readouterr().out


def test_export_merged_lora(setup):
    tmp_path, base, bb, pkgs = setup
    path, adapters = pkgs["lora"]
    assert main(["adapter", "export", str(path), "--merged", "--base", str(base), "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = create_backbone({**TINY_BACKBONE, "weights": str(tmp_path / "merged.safetensors")})
    x = torch.randn(1, 3, 32, 32)
    assert (merged.forward_tokens(x)[0] - AdaptedBackbone(bb, adapters).forward_tokens(x)[0]).abs().max() < 1e-4
    assert (
        main(["adapter", "export", str(pkgs["bottleneck"][0]), "--merged", "--base", str(base), "--out", str(tmp_path / "m2.safetensors")])
        == 2
    )


def test_apply_writes_features(setup, shapes_dir):
    tmp_path, base, _, pkgs = setup
    out = tmp_path / "feats.safetensors"
    assert main(["adapter", "apply", str(pkgs["bottleneck"][0]), "--base", str(base), "--data", str(shapes_dir), "--out", str(out)]) == 0
    feats = load_file(str(out))["features"]
    ids = json.loads(out.with_suffix(".json").read_text())["item_ids"]
    assert feats.shape == (24, 96) and len(ids) == 24 and torch.isfinite(feats).all()
