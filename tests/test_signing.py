"""Signed adapter packages: Ed25519 round trip, tampering, untrusted keys, the trust policy, the CLI."""

import hashlib
import json
import logging
import re
import shutil
import struct
import zipfile

import pytest
import torch
import yaml

from insitu.adapters.package import apply_package, load_package, write_zip
from insitu.cli import main
from insitu.errors import AdapterFormatError, ConfigError, SignatureError
from insitu.package_format import vet_package
from insitu.sharing.signing import TrustPolicy, generate_keypair, sign_package, verify_signature
from tests.conftest import TINY_BACKBONE, tiny_package


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny package (never modified) and two key pairs: 'lab-a' trusted, 'stranger' not."""
    root = tmp_path_factory.mktemp("signing")
    bb, _, pkg = tiny_package(root / "pkg", input_info={"domain": "images", "image_size": 32, "channels": 3})
    private, public = generate_keypair(root / "keys", "lab-a")
    stranger, _ = generate_keypair(root / "other-keys", "stranger")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    return bb, pkg, private, stranger, trusted


def flat(text):
    """A rich table's text with borders and line wraps collapsed to single spaces."""
    return re.sub(r"[\s\u2500-\u257f]+", " ", text)


def signed_copy(made, dst):
    _, pkg, private, _, _ = made
    shutil.copytree(pkg, dst)
    sign_package(dst, private)
    return dst


def test_keypair_files(made):
    _, _, private, _, _ = made
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert private.with_suffix(".pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError, match="never replaces a key"):
        generate_keypair(private.parent, "lab-a")


def test_round_trip_folder_and_zip(made, tmp_path):
    bb, _, _, _, trusted = made
    pkg = signed_copy(made, tmp_path / "pkg")
    who = verify_signature(pkg, trusted)
    assert (who.name, who.key_name) == ("lab-a", "lab-a") and len(who.fingerprint) == 64
    zpath = write_zip(pkg, tmp_path / "pkg.zip")
    assert "signature.json" in zipfile.ZipFile(zpath).namelist()
    assert verify_signature(zpath, trusted).name == "lab-a"
    policy = TrustPolicy(trusted, require_signature=True)
    assert load_package(zpath, policy).signer.name == "lab-a"
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(apply_package(pkg, bb, policy).forward_tokens(x)[0], apply_package(zpath, bb).forward_tokens(x)[0])


def test_export_carries_the_signature(made, tmp_path):
    _, _, _, _, trusted = made
    pkg = signed_copy(made, tmp_path / "pkg")
    assert main(["adapter", "export", str(pkg), "--out", str(tmp_path / "p.zip")]) == 0
    assert main(["adapter", "export", str(tmp_path / "p.zip"), "--out", str(tmp_path / "unpacked")]) == 0
    assert (tmp_path / "unpacked" / "insitu.json").read_bytes() == (pkg / "insitu.json").read_bytes()
    assert verify_signature(tmp_path / "unpacked", trusted).name == "lab-a"


def test_signing_a_zip_in_place(made, tmp_path):
    _, pkg, private, _, trusted = made
    zpath = write_zip(pkg, tmp_path / "plain.zip")
    sign_package(zpath, private, signer="site-7")
    assert verify_signature(zpath, trusted).name == "site-7"
    assert vet_package(zpath).card is not None  # the model card survives the rewrite


def _flip_first_weight_byte(pkg):
    """One byte of the first weight changed (its lowest mantissa byte), and insitu.json's hash updated to match."""
    tensors = pkg / "adapter.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[8 + struct.unpack("<Q", raw[:8])[0]] ^= 1
    tensors.write_bytes(bytes(raw))
    meta = json.loads((pkg / "insitu.json").read_text())
    meta["content_sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (pkg / "insitu.json").write_text(json.dumps(meta, indent=2))


def test_tampered_tensors_are_caught_by_the_signature_alone(made, tmp_path):
    _, _, _, _, trusted = made
    pkg = signed_copy(made, tmp_path / "pkg")
    _flip_first_weight_byte(pkg)
    vet_package(pkg)  # the package itself is consistent: only the signature can tell
    with pytest.raises(SignatureError, match="adapter.safetensors changed after it was signed by 'lab-a'"):
        verify_signature(pkg, trusted)
    zpath = write_zip(pkg, tmp_path / "tampered.zip")
    with pytest.raises(SignatureError, match="changed after it was signed"):
        load_package(zpath, TrustPolicy(trusted))


def test_one_metadata_field_changed(made, tmp_path):
    _, _, _, _, trusted = made
    pkg = signed_copy(made, tmp_path / "pkg")
    meta = json.loads((pkg / "insitu.json").read_text())
    meta["metrics"] = {"knn_acc": 0.99}
    (pkg / "insitu.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(SignatureError, match="insitu.json changed after it was signed"):
        verify_signature(pkg, trusted)


def test_reformatted_metadata_still_verifies(made, tmp_path):
    _, _, _, _, trusted = made
    pkg = signed_copy(made, tmp_path / "pkg")
    (pkg / "insitu.json").write_text(json.dumps(json.loads((pkg / "insitu.json").read_text()), indent=None))
    assert verify_signature(pkg, trusted).name == "lab-a"


def test_signature_file_edits_are_bad_signatures(made, tmp_path):
    _, _, _, _, trusted = made
    pkg = signed_copy(made, tmp_path / "pkg")
    sig = json.loads((pkg / "signature.json").read_text())
    (pkg / "signature.json").write_text(json.dumps({**sig, "signer": "someone-else"}))
    with pytest.raises(SignatureError, match="bad signature"):
        verify_signature(pkg, trusted)
    (pkg / "signature.json").write_text("{not json")
    with pytest.raises(SignatureError, match="not a valid insitu signature"):
        verify_signature(pkg, trusted)
    (pkg / "signature.json").write_bytes(b" " * (1 << 17))
    with pytest.raises(AdapterFormatError, match="signature.json is larger than insitu allows"):
        verify_signature(pkg, trusted)


def test_untrusted_key_refused(made, tmp_path):
    _, pkg, _, stranger, trusted = made
    copy = tmp_path / "pkg"
    shutil.copytree(pkg, copy)
    sign_package(copy, stranger)
    with pytest.raises(SignatureError, match="signed by 'stranger'.*not among the trusted keys"):
        verify_signature(copy, trusted)
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        load_package(copy, TrustPolicy(trusted))  # a signature that is present must be trusted, required or not


def test_unsigned_refused_whenever_keys_are_trusted(made):
    """A trust folder given means a signature is required (issue 35: no silent downgrade by stripping signature.json)."""
    bb, pkg, _, _, trusted = made
    assert load_package(pkg).signer is None
    with pytest.raises(SignatureError, match="is not signed.*trusted keys were given"):
        load_package(pkg, TrustPolicy(trusted))
    with pytest.raises(SignatureError, match="is not signed"):
        load_package(pkg, TrustPolicy(trusted, require_signature=True))
    with pytest.raises(SignatureError, match="is not signed"):
        apply_package(load_package(pkg), bb, TrustPolicy(trusted, require_signature=True))
    with pytest.raises(ConfigError, match="require_signature needs a folder"):
        TrustPolicy(None, require_signature=True)


def test_private_key_never_in_package_or_output(made, tmp_path, capsys, caplog):
    _, pkg, private, _, trusted = made
    copy = tmp_path / "pkg"
    shutil.copytree(pkg, copy)
    secret = private.read_bytes()
    body = b"".join(line for line in secret.splitlines() if not line.startswith(b"-----"))
    with caplog.at_level(logging.DEBUG):
        assert main(["adapter", "sign", str(copy), "--key", str(private)]) == 0
        assert main(["adapter", "verify", str(copy), "--trusted-keys", str(trusted)]) == 0
        assert main(["adapter", "keygen", "--out", str(tmp_path / "k"), "--name", "x"]) == 0
    captured = capsys.readouterr()
    seen = (captured.out + captured.err + caplog.text).encode()
    new_secret = (tmp_path / "k" / "x.key").read_bytes().splitlines()[1]
    assert body not in seen and new_secret not in seen
    for f in copy.iterdir():
        assert body not in f.read_bytes() and b"PRIVATE" not in f.read_bytes()
    inside = copy / "lab.key"
    shutil.copy(private, inside)
    with pytest.raises(SignatureError, match="inside the package"):
        sign_package(copy, inside)


def test_cli_sign_verify_apply(made, tmp_path, capsys, shapes_dir):
    _, pkg, private, stranger, trusted = made
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": TINY_BACKBONE}))
    copy = tmp_path / "pkg"
    shutil.copytree(pkg, copy)
    assert main(["adapter", "verify", str(copy), "--trusted-keys", str(trusted), "--require-signature"]) == 2
    assert "is not signed" in capsys.readouterr().err.replace("\n", "")
    assert main(["adapter", "sign", str(copy), "--key", str(private), "--signer", "radiology-lab"]) == 0
    assert main(["adapter", "verify", str(copy), "--trusted-keys", str(trusted), "--require-signature"]) == 0
    out = flat(capsys.readouterr().out)
    assert "signed by 'radiology-lab', trusted key lab-a" in out
    assert main(["adapter", "verify", str(copy)]) == 0
    assert "signer not checked: pass --trusted-keys" in flat(capsys.readouterr().out)
    args = ["adapter", "apply", str(copy), "--base", str(base), "--data", str(shapes_dir), "--trusted-keys", str(trusted)]
    assert main([*args, "--require-signature", "--out", str(tmp_path / "f.safetensors")]) == 0
    assert main(["adapter", "sign", str(copy), "--key", str(stranger)]) == 0
    assert main([*args, "--out", str(tmp_path / "g.safetensors")]) == 2
    assert "not among the trusted keys" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "g.safetensors").exists()
    assert main(["adapter", "verify", str(copy), "--require-signature"]) == 2
    assert "--trusted-keys" in capsys.readouterr().err


def test_run_config_trust_section_gates_probe_and_finetune(made, tmp_path):
    """A run's `trust:` section: probe/evaluate/finetune refuse unsigned packages when signatures are required."""
    from insitu.config import load_config
    from insitu.pipelines.probe import build_models
    from tests.conftest import tiny_config

    _, pkg, _, _, trusted = made
    cfg = load_config(tiny_config(tmp_path, tmp_path / "runs", trust={"keys": str(trusted), "require_signature": True}))
    with pytest.raises(SignatureError):
        build_models(cfg, [pkg])
    models = build_models(cfg, [signed_copy(made, tmp_path / "signed")])
    assert len(models) == 2
    with pytest.raises(ConfigError, match="require_signature needs keys"):
        load_config(tiny_config(tmp_path, tmp_path / "runs", trust={"require_signature": True}))
