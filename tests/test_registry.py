"""The package registry: publish / list / pull round trip, filters, name clashes, corruption, signatures, the CLI."""

import hashlib
import json
import re
import shutil
import struct

import pytest
import torch

from insitu.adapters import create_adapters
from insitu.adapters.package import apply_package, load_package, save_package
from insitu.backbones import create_backbone
from insitu.cli import main
from insitu.errors import AdapterFormatError, RegistryError, SignatureError
from insitu.sharing.registry import list_packages, publish, pull, read_index
from insitu.sharing.signing import generate_keypair, sign_package
from tests.conftest import TINY_BACKBONE, tiny_package


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two tiny packages on different bases (one signed by a trusted key as registry entry ct-dino v1), and the trusted keys folder."""
    root = tmp_path_factory.mktemp("registry")
    training = {"items": 24, "quarantined": 1, "steps": 2}
    bb, _, pkg = tiny_package(
        root / "DOE_JOHN_site",
        input_info={"domain": "images", "image_size": 32, "channels": 3},
        objective={"name": "dino"},
        training=training,
        metrics={"knn_acc": 0.75, "note": "a string is not listed"},
    )
    private, public = generate_keypair(root / "keys", "lab-a")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    signed = root / "signed"
    shutil.copytree(pkg, signed)
    sign_package(signed, private, entry_name="ct-dino", entry_version="1")
    other_bb = create_backbone({**TINY_BACKBONE, "init_seed": 3})
    other = save_package(root / "other", other_bb, create_adapters(other_bb, {"bottleneck_dim": 8}), objective={"name": "simclr"})
    return bb, pkg, signed, other, other_bb, trusted, private


def flat(text):
    return re.sub(r"[\s\u2500-\u257f]+", " ", text)


def test_publish_list_pull_round_trip(made, tmp_path):
    bb, pkg, signed, other, other_bb, trusted, _ = made
    registry = tmp_path / "registry"
    entry = publish(signed, registry, name="ct-dino")
    publish(other, registry)
    assert (registry / "index.json").is_file() and (registry / "ct-dino" / "signature.json").is_file()
    assert entry.signer.name == "lab-a" and entry.domain == "images" and entry.channels == 3 and entry.objective == "dino"
    assert entry.data == "24 items (1 quarantined)" and entry.metrics == {"knn_acc": 0.75}
    assert entry.size_bytes == sum(f.stat().st_size for f in (registry / "ct-dino").iterdir())
    index_text = (registry / "index.json").read_text()
    assert "DOE_JOHN" not in index_text and str(tmp_path) not in index_text  # no local folder names
    names = [e.name for e in list_packages(registry)]
    assert names == sorted(names) and "ct-dino" in names and any(n.startswith("simclr-") for n in names)
    got, signer = pull("ct-dino", registry, tmp_path / "got", trusted_keys=trusted, require_signature=True)
    assert signer.name == "lab-a" and got.content_sha256 == entry.content_sha256
    for name in ("adapter.safetensors", "insitu.json", "README.md", "signature.json"):
        assert (tmp_path / "got" / name).read_bytes() == (signed / name).read_bytes()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(apply_package(tmp_path / "got", bb).forward_tokens(x)[0], apply_package(pkg, bb).forward_tokens(x)[0])
    with pytest.raises(RegistryError, match="not empty"):
        pull("ct-dino", registry, tmp_path / "got")


def test_base_filter(made, tmp_path):
    bb, pkg, _, other, other_bb, _, _ = made
    registry = tmp_path / "registry"
    publish(pkg, registry, name="a")
    publish(other, registry, name="b")
    assert [e.name for e in list_packages(registry, base=bb.fingerprint[:8])] == ["a"]
    assert [e.name for e in list_packages(registry, base=other_bb.fingerprint.upper())] == ["b"]
    assert list_packages(registry, base="not-a-fingerprint") == []


def test_name_clash_refused(made, tmp_path):
    _, pkg, _, other, _, _, _ = made
    registry = tmp_path / "registry"
    publish(pkg, registry, name="shared")
    with pytest.raises(RegistryError, match="already holds a package named 'shared'; pick another name"):
        publish(other, registry, name="shared")
    with pytest.raises(RegistryError, match="must be 1-64"):
        publish(other, registry, name="../escape")
    assert [e.name for e in read_index(registry).packages] == ["shared"]
    assert load_package(registry / "shared").meta.objective["name"] == "dino"  # the first one is untouched


def test_not_a_registry_refused(made, tmp_path):
    _, pkg, _, _, _, _, _ = made
    (tmp_path / "someone-elses" / "notes.txt").parent.mkdir()
    (tmp_path / "someone-elses" / "notes.txt").write_text("x")
    with pytest.raises(RegistryError, match="not an insitu registry"):
        publish(pkg, tmp_path / "someone-elses")
    registry = tmp_path / "registry"
    publish(pkg, registry, name="a")
    (registry / "index.json").write_text(json.dumps({"format": "insitu-registry", "version": 1, "packages": [{"name": "a"}]}))
    with pytest.raises(RegistryError, match="not a valid registry index"):
        list_packages(registry)


def test_corrupted_entry_refused_on_pull(made, tmp_path):
    _, pkg, _, _, _, _, _ = made
    registry = tmp_path / "registry"
    publish(pkg, registry, name="a")
    tensors = registry / "a" / "adapter.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[8 + struct.unpack("<Q", raw[:8])[0]] ^= 1
    tensors.write_bytes(bytes(raw))
    with pytest.raises(RegistryError, match="does not match the sha256 that index.json records"):
        pull("a", registry, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a tamperer who also rewrites the index's file hash is still caught by the package's own content hash
    index = json.loads((registry / "index.json").read_text())
    index["packages"][0]["files"]["adapter.safetensors"] = hashlib.sha256(bytes(raw)).hexdigest()
    (registry / "index.json").write_text(json.dumps(index))
    with pytest.raises(AdapterFormatError, match="does not match the content_sha256"):
        pull("a", registry, tmp_path / "out")
    with pytest.raises(RegistryError, match="no package named 'nope'"):
        pull("nope", registry, tmp_path / "out")


def test_pull_checks_signatures(made, tmp_path):
    _, pkg, signed, _, _, trusted, _ = made
    registry = tmp_path / "registry"
    publish(pkg, registry, name="plain")
    publish(signed, registry)  # its signature binds the name ct-dino: published under it
    with pytest.raises(SignatureError, match="is not signed"):
        pull("plain", registry, tmp_path / "a", trusted_keys=trusted, require_signature=True)
    with pytest.raises(SignatureError, match="is not signed"):  # trusted keys given: a signature is required (issue 35)
        pull("plain", registry, tmp_path / "b", trusted_keys=trusted)
    pull("plain", registry, tmp_path / "b")  # without trusted keys an unsigned package is accepted
    stranger, _ = generate_keypair(tmp_path / "k", "stranger")
    restamped = tmp_path / "restamped"
    shutil.copytree(signed, restamped)
    sign_package(restamped, stranger)
    publish(restamped, registry, name="restamped")
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        pull("restamped", registry, tmp_path / "c", trusted_keys=trusted)
    # a registry writer who swaps a signed package's metadata and fixes the index hashes: the signature catches it
    meta_path = registry / "ct-dino" / "insitu.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {"knn_acc": 0.99}
    meta_path.write_text(json.dumps(meta, indent=2))
    index = json.loads((registry / "index.json").read_text())
    entry = next(e for e in index["packages"] if e["name"] == "ct-dino")
    entry["files"]["insitu.json"] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    (registry / "index.json").write_text(json.dumps(index))
    with pytest.raises(SignatureError, match="insitu.json changed after it was signed"):
        pull("ct-dino", registry, tmp_path / "d", trusted_keys=trusted)


def test_cli_publish_list_pull(made, tmp_path, capsys):
    bb, pkg, signed, other, _, trusted, _ = made
    registry = tmp_path / "registry"
    assert main(["adapter", "publish", str(signed), str(registry), "--name", "ct-dino"]) == 0
    assert main(["adapter", "publish", str(other), str(registry), "--name", "other"]) == 0
    assert main(["adapter", "publish", str(pkg), str(registry), "--name", "ct-dino"]) == 2
    assert "pick another name" in capsys.readouterr().err.replace("\n", "")
    assert main(["adapter", "list", str(registry), "--base", bb.fingerprint[:10], "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == ["ct-dino"] and listed[0]["signer"]["name"] == "lab-a"
    assert main(["adapter", "list", str(registry)]) == 0
    out = flat(capsys.readouterr().out)
    assert "ct-dino" in out and "other" in out and "2 package(s)" in out
    args = ["adapter", "pull", "ct-dino", str(registry), "--out", str(tmp_path / "got"), "--trusted-keys", str(trusted)]
    assert main([*args, "--require-signature"]) == 0
    assert "signed by 'lab-a', trusted key lab-a" in flat(capsys.readouterr().out)
    assert main(["adapter", "verify", str(tmp_path / "got"), "--trusted-keys", str(trusted), "--require-signature"]) == 0
    assert (
        main(
            ["adapter", "pull", "other", str(registry), "--out", str(tmp_path / "x"), "--trusted-keys", str(trusted), "--require-signature"]
        )
        == 2
    )
    assert "is not signed" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "x").exists()
