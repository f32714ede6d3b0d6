import hashlib
import json
import pickle

import pytest
import torch

from insitu.adapters.package import apply_package, load_package, save_package, write_zip
from insitu.backbones import create_backbone
from insitu.errors import AdapterFormatError, AdapterMismatchError
from tests.conftest import TINY_BACKBONE, tiny_package


@pytest.fixture
def trained(tmp_path):
    return tiny_package(tmp_path / "pkg", config={"data": {"root": "/hospital/patients/DOE_JOHN"}, "out_dir": "/runs"})


def test_round_trip_gives_identical_outputs(trained):
    bb, adapters, path = trained
    x = torch.randn(2, 3, 32, 32)
    expected = bb.forward_tokens(x, adapters)[0]
    model = apply_package(path, bb)
    assert torch.equal(model.forward_tokens(x)[0], expected)
    pkg = load_package(path)
    assert pkg.meta.base.fingerprint == bb.fingerprint
    assert set(pkg.head_state()) == {"dino.w"}
    assert pkg.meta.trainable_params == sum(p.numel() for p in adapters.parameters())
    assert "DOE_JOHN" not in (path / "insitu.json").read_text()  # local paths are redacted
    assert (path / "README.md").read_text().startswith("# insitu adapter package")


def test_zip_round_trip(trained, tmp_path):
    bb, adapters, path = trained
    zpath = write_zip(path, tmp_path / "pkg.zip")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(apply_package(zpath, bb).forward_tokens(x)[0], bb.forward_tokens(x, adapters)[0])


def test_refused_on_a_different_base(trained):
    _, _, path = trained
    other = create_backbone({**TINY_BACKBONE, "init_seed": 1})
    with pytest.raises(AdapterMismatchError, match="fingerprint: package") as exc:
        apply_package(path, other)
    assert set(exc.value.fields) == {"fingerprint"}
    wider = create_backbone({**TINY_BACKBONE, "kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2}})
    with pytest.raises(AdapterMismatchError) as exc:
        apply_package(path, wider)
    assert {"fingerprint", "embed_dim"} <= set(exc.value.fields)


def test_pickle_is_never_loaded(tmp_path, trained):
    class Canary:
        def __reduce__(self):
            return (open, (str(tmp_path / "CANARY"), "w"))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(Canary()))
    with pytest.raises(AdapterFormatError, match="never unpickles"):
        load_package(bad)
    _, _, path = trained
    (path / "extra.ckpt").write_bytes(pickle.dumps(Canary()))
    with pytest.raises(AdapterFormatError, match="pickle-based file inside the package"):
        load_package(path)
    assert not (tmp_path / "CANARY").exists()


def test_truncated_and_tampered_files(trained):
    bb, _, path = trained
    tensors = path / "adapter.safetensors"
    raw = tensors.read_bytes()
    tensors.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterFormatError, match="not a valid safetensors file|impossible header"):
        load_package(path)
    tensors.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    with pytest.raises(AdapterFormatError, match="impossible header length"):
        load_package(path)
    tensors.write_bytes(raw)
    meta = json.loads((path / "insitu.json").read_text())
    del meta["base"]
    (path / "insitu.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="fails the schema"):
        load_package(path)


def test_missing_tensor_is_an_error(trained, tmp_path):
    bb, adapters, _ = trained
    from safetensors.torch import save_file

    path = save_package(tmp_path / "p2", bb, adapters)
    tensors = {k: v for k, v in load_package(path).tensors.items() if not k.endswith("up.bias")}
    save_file(tensors, str(path / "adapter.safetensors"))
    meta = json.loads((path / "insitu.json").read_text())  # a consistent package that lacks a tensor
    meta["content_sha256"] = hashlib.sha256((path / "adapter.safetensors").read_bytes()).hexdigest()
    meta["tensors"]["adapter"] -= 1
    (path / "insitu.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="missing"):
        apply_package(path, bb)
