"""Issue 35, "signatures that bind": each finding of the signing and registry audit, as an attack that must now be refused."""

import base64
import json
import os
import re
import shutil

import pytest
from cryptography.hazmat.primitives import serialization

from insitu.adapters.package import load_package
from insitu.cli import main
from insitu.errors import ConfigError, RegistryError, SignatureError
from insitu.sharing.registry import check_name, publish, pull
from insitu.sharing.signing import (
    SignatureFile,
    TrustPolicy,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    run_trust,
    sign_package,
    verify_signature,
)
from tests.conftest import tiny_package
from tests.test_signing import _flip_first_weight_byte  # one weight changed, its hash updated: what a registry can do


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny unsigned package, the same package signed as registry entry ct-dino v1 by a trusted key, and a stranger's key."""
    root = tmp_path_factory.mktemp("binds")
    _, _, pkg = tiny_package(
        root / "pkg",
        input_info={"domain": "images", "image_size": 32, "channels": 3},
        objective={"name": "dino"},
        training={"items": 24, "steps": 2},
        metrics={"knn_acc": 0.75},
    )
    private, public = generate_keypair(root / "keys", "lab-a")
    stranger, _ = generate_keypair(root / "other-keys", "stranger")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    signed = root / "signed"
    shutil.copytree(pkg, signed)
    sign_package(signed, private, entry_name="ct-dino", entry_version="1")
    return pkg, signed, private, stranger, trusted


def flat(text):
    return re.sub(r"[\s\u2500-\u257f]+", " ", text)


def _edit_index(registry, entry_name, **fields):
    index = json.loads((registry / "index.json").read_text())
    entry = next(e for e in index["packages"] if e["name"] == entry_name)
    entry.update(fields)
    (registry / "index.json").write_text(json.dumps(index))


def test_stripped_signature_is_refused_when_keys_are_given(made, tmp_path, capsys):
    """High: signature.json removed, weights changed, content_sha256 and index.json rehashed; `pull --trusted-keys` exited 0."""
    _, signed, _, _, trusted = made
    stripped = tmp_path / "stripped"
    shutil.copytree(signed, stripped)
    (stripped / "signature.json").unlink()
    _flip_first_weight_byte(stripped)
    registry = tmp_path / "registry"
    publish(stripped, registry, name="ct-dino")  # a hostile registry: every hash in the index is consistent
    out = tmp_path / "got"
    assert main(["adapter", "pull", "ct-dino", str(registry), "--out", str(out), "--trusted-keys", str(trusted)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "is not signed" in err and "trusted keys were given" in err
    assert not out.exists()
    assert main(["adapter", "verify", str(stripped), "--trusted-keys", str(trusted)]) == 2
    with pytest.raises(SignatureError, match="is not signed"):
        load_package(stripped, TrustPolicy(trusted))  # what apply/probe/finetune use
    pull("ct-dino", registry, tmp_path / "untrusting")  # without trusted keys nothing is trusted, and it is said so
    assert main(["adapter", "pull", "ct-dino", str(registry), "--out", str(tmp_path / "again")]) == 0
    assert "unsigned (accepted because no --trusted-keys were given)" in flat(capsys.readouterr().out)


def test_rollback_under_a_new_name_is_refused(made, tmp_path):
    """An old signed package republished as a new entry passed --require-signature: the signature now binds name and version."""
    _, signed, _, _, trusted = made
    registry = tmp_path / "registry"
    with pytest.raises(SignatureError, match="signed for the registry name 'ct-dino', not 'ct-dino-v2'"):
        publish(signed, registry, name="ct-dino-v2")
    entry = publish(signed, registry)  # the bound name is the default
    assert (entry.name, entry.version) == ("ct-dino", "1") and entry.signed_at
    got, signer = pull("ct-dino", registry, tmp_path / "ok", trusted_keys=trusted, require_signature=True, version="1")
    assert (signer.entry_name, signer.entry_version, signer.key_name) == ("ct-dino", "1", "lab-a")
    with pytest.raises(SignatureError, match="signed as version '1' of 'ct-dino', not '2'"):
        pull("ct-dino", registry, tmp_path / "v2", trusted_keys=trusted, version="2")
    # the registry renames the old entry (folder and index) to look like a new release
    (registry / "ct-dino").rename(registry / "ct-dino-v2")
    _edit_index(registry, "ct-dino", name="ct-dino-v2")
    for trust in ({}, {"trusted_keys": trusted, "require_signature": True}):
        with pytest.raises(SignatureError, match="rollback"):
            pull("ct-dino-v2", registry, tmp_path / "rolled", **trust)
    assert not (tmp_path / "rolled").exists()


def _v1_signature(pkg, private):
    """signature.json as insitu before issue 35 wrote it (version 1: no card, name, version or time)."""
    from insitu.package_format import vet_package
    from insitu.sharing.signing import digests_of

    key = load_private_key(private)
    digests, fingerprint = digests_of(vet_package(pkg)), key_fingerprint(key.public_key())
    fields = {"format": "insitu-signature", "version": 1, "signer": "lab-a", "key_fingerprint": fingerprint}
    fields |= {"tensors_sha256": digests.tensors_sha256, "meta_sha256": digests.meta_sha256}
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()  # the version-1 payload, verbatim
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = {**fields, "algorithm": "ed25519", "public_key": base64.b64encode(raw_public).decode()}
    doc["signature"] = base64.b64encode(key.sign(payload)).decode()
    assert SignatureFile.model_validate(doc).payload() == payload
    (pkg / "signature.json").write_text(json.dumps(doc, indent=2))


def test_version_1_signatures_still_verify_but_bind_no_name(made, tmp_path):
    pkg, _, private, _, trusted = made
    old = tmp_path / "old"
    shutil.copytree(pkg, old)
    _v1_signature(old, private)
    who = verify_signature(old, trusted)
    assert who.name == "lab-a" and who.binding() == "not bound to a registry name (version-1 signature)"
    assert load_package(old, TrustPolicy(trusted, require_signature=True)).signer.entry_name is None
    registry = tmp_path / "registry"
    publish(old, registry, name="anything")
    with pytest.raises(SignatureError, match="not bound to a registry name.*sign it again with"):
        pull("anything", registry, tmp_path / "a", trusted_keys=trusted)
    pull("anything", registry, tmp_path / "b")  # without trusted keys: accepted, nothing was trusted
    (old / "README.md").write_text("# edited card\n")  # version 1 never covered the card
    assert verify_signature(old, trusted).name == "lab-a"


def test_index_claims_are_checked_against_the_package(made, tmp_path):
    """index.json's signer, base, metrics and item counts were shown by list and never checked by pull."""
    pkg, signed, _, _, trusted = made
    for field, value in [
        ("metrics", {"knn_acc": 0.99}),
        ("data", "1000000 items"),
        ("base_source", "vit_large_patch16_224"),
        ("signer", {"name": "hospital-a", "fingerprint": "0" * 64}),
        ("objective", "glare"),
    ]:
        registry = tmp_path / field
        publish(signed, registry)
        _edit_index(registry, "ct-dino", **{field: value})
        with pytest.raises(RegistryError, match=rf"claims \['{field}'\] that differ from the package"):
            pull("ct-dino", registry, tmp_path / f"{field}-out", trusted_keys=trusted)
        assert not (tmp_path / f"{field}-out").exists()
    registry = tmp_path / "unsigned"
    publish(pkg, registry, name="plain")
    _edit_index(registry, "plain", signer={"name": "lab-a", "fingerprint": "1" * 64})  # an unsigned package listed as signed
    with pytest.raises(RegistryError, match=r"claims \['signer'\]"):
        pull("plain", registry, tmp_path / "plain-out")


def test_list_shows_key_fingerprint_and_trust(made, tmp_path, capsys, monkeypatch):
    """An untrusted key signing as 'hospital-a' was listed as hospital-a."""
    from insitu.cli.common import console

    monkeypatch.setattr(console, "_width", 300)  # one table row per line, as on a wide terminal
    pkg, signed, _, stranger, trusted = made
    impostor = tmp_path / "impostor"
    shutil.copytree(pkg, impostor)
    sign_package(impostor, stranger, signer="hospital-a", entry_name="impostor")
    registry = tmp_path / "registry"
    publish(signed, registry)
    publish(impostor, registry)
    stranger_fp = key_fingerprint(load_private_key(stranger).public_key())
    assert main(["adapter", "list", str(registry), "--trusted-keys", str(trusted)]) == 0
    out = flat(capsys.readouterr().out)
    assert f"hospital-a, key {stranger_fp[:16]}, NOT trusted" in out
    assert re.search(r"lab-a, key [0-9a-f]{16}, trusted \(lab-a\)", out)
    assert main(["adapter", "list", str(registry)]) == 0
    assert f"hospital-a, key {stranger_fp[:16]}, trust not checked" in flat(capsys.readouterr().out)
    assert main(["adapter", "list", str(registry), "--json", "--trusted-keys", str(trusted)]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["impostor"]["trusted_key"] is None and listed["ct-dino"]["trusted_key"] == "lab-a"
    assert listed["impostor"]["signer"]["fingerprint"] == stranger_fp


def test_present_but_invalid_signature_refused_without_trust(made, tmp_path, capsys, shapes_dir):
    """Without trust settings, apply/probe/finetune accepted a package whose signature.json no longer matched."""
    import yaml

    from insitu.config import load_config
    from insitu.pipelines.probe import build_models
    from tests.conftest import TINY_BACKBONE, tiny_config

    _, signed, _, _, _ = made
    broken = tmp_path / "broken"
    shutil.copytree(signed, broken)
    _flip_first_weight_byte(broken)
    with pytest.raises(SignatureError, match="changed after it was signed"):
        load_package(broken)
    with pytest.raises(SignatureError, match="changed after it was signed"):
        build_models(load_config(tiny_config(shapes_dir, tmp_path / "runs")), [broken])  # probe, evaluate, finetune
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": TINY_BACKBONE}))
    out = tmp_path / "f.safetensors"
    assert main(["adapter", "apply", str(broken), "--base", str(base), "--data", str(shapes_dir), "--out", str(out)]) == 2
    assert "changed after it was signed" in capsys.readouterr().err.replace("\n", "")
    assert not out.exists()


def test_self_distill_loads_through_the_run_trust_policy(made, tmp_path, shapes_dir):
    """self_distill loaded its package with no trust check even when the run required signatures."""
    from insitu.config import load_config
    from insitu.objectives import create_objective
    from insitu.pipelines.pretrain import pretrain
    from tests.conftest import tiny_config

    pkg, signed, _, _, trusted = made
    small = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "views": {"local_crops": 1}}

    def build(adapter):
        return create_objective("self_distill", 48, 8, 32, {"base": "dino", "base_options": small, "adapter": str(adapter)}, 10)

    with run_trust(TrustPolicy(trusted, require_signature=True)):
        with pytest.raises(SignatureError, match="is not signed"):
            build(pkg)
        assert build(signed).package.signer.name == "lab-a"
    options = {"base": "dino", "base_options": small, "adapter": str(pkg)}
    cfg = tiny_config(shapes_dir, tmp_path / "run", objective={"name": "self_distill", "options": options}, trust={"keys": str(trusted)})
    with pytest.raises(SignatureError, match="is not signed"):
        pretrain(load_config(cfg, ["train.max_steps=1"]), quiet=True)


def test_names_with_a_trailing_newline_are_refused(made, tmp_path):
    pkg, _, private, _, _ = made
    with pytest.raises(RegistryError, match="must be 1-64"):
        check_name("ct-dino\n")
    registry = tmp_path / "registry"
    with pytest.raises(RegistryError, match="must be 1-64"):
        publish(pkg, registry, name="ct-dino\n")
    assert not any(p.name.startswith("ct-dino") for p in registry.iterdir()) if registry.exists() else True
    copy = tmp_path / "copy"
    shutil.copytree(pkg, copy)
    with pytest.raises(ConfigError, match="must be 1-64"):
        sign_package(copy, private, entry_name="ct-dino\n")
    with pytest.raises(ConfigError, match="must be 1-64"):
        sign_package(copy, private, signer="lab-a\n")


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and O_NOFOLLOW are POSIX")
def test_lock_and_entry_files_are_not_followed_through_links(made, tmp_path):
    pkg, _, _, _, _ = made
    registry = tmp_path / "registry"
    publish(pkg, registry, name="a")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (registry / ".index.lock").unlink()
    (registry / ".index.lock").symlink_to(victim)
    with pytest.raises(RegistryError, match="index.lock is a symbolic link"):
        publish(pkg, registry, name="b")
    assert victim.read_text() == "keep me"
    (registry / ".index.lock").unlink()
    card = registry / "a" / "README.md"
    elsewhere = tmp_path / "card.md"
    shutil.move(card, elsewhere)
    card.symlink_to(elsewhere)  # same bytes, so only the link itself can be refused
    with pytest.raises(RegistryError, match="README.md is a symbolic link"):
        pull("a", registry, tmp_path / "out")
    card.unlink()
    shutil.move(elsewhere, card)
    shutil.move(registry / "a", tmp_path / "a-real")
    (registry / "a").symlink_to(tmp_path / "a-real")
    with pytest.raises(RegistryError, match="is a symbolic link; a registry entry is a plain folder"):
        pull("a", registry, tmp_path / "out")
    (registry / "a").unlink()
    (registry / "b").symlink_to(tmp_path / "nowhere")  # a dangling link is not a free name
    with pytest.raises(RegistryError, match="already holds a package named 'b'"):
        publish(pkg, registry, name="b")


def test_the_card_is_signed(made, tmp_path):
    _, signed, _, _, trusted = made
    copy = tmp_path / "pkg"
    shutil.copytree(signed, copy)
    assert verify_signature(copy, trusted).card_bound
    (copy / "README.md").write_text("# Validated on 10,000 patients\n")
    with pytest.raises(SignatureError, match="README.md changed after it was signed"):
        verify_signature(copy, trusted)
    (copy / "README.md").unlink()
    with pytest.raises(SignatureError, match="README.md was removed after it was signed"):
        load_package(copy)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_private_keys_are_private(made, tmp_path, monkeypatch):
    pkg, _, _, _, _ = made
    private, _ = generate_keypair(tmp_path / "keys", "k")
    assert private.stat().st_mode & 0o777 == 0o600
    copy = tmp_path / "pkg"
    shutil.copytree(pkg, copy)
    private.chmod(0o644)
    with pytest.raises(SignatureError, match=r"can be read or written by other users \(mode 644\).*chmod 600"):
        sign_package(copy, private)
    assert not (copy / "signature.json").exists()
    private.chmod(0o600)
    sign_package(copy, private)
    locked, _ = generate_keypair(tmp_path / "keys", "locked", passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in locked.read_bytes()
    monkeypatch.delenv("INSITU_KEY_PASSPHRASE", raising=False)
    with pytest.raises(SignatureError, match="is encrypted; set INSITU_KEY_PASSPHRASE"):
        sign_package(copy, locked)
    with pytest.raises(SignatureError, match="passphrase is wrong"):
        sign_package(copy, locked, passphrase=b"wrong")
    monkeypatch.setenv("INSITU_KEY_PASSPHRASE", "correct horse")
    assert sign_package(copy, locked, signer="locked").name == "locked"
