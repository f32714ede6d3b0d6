"""Hostile adapter packages: every crafted case ends in a typed error naming the field, exit 2.

A seeded corpus built from one real package: each case mutates its JSON, its tensors or its zip,
and `insitu adapter inspect` / `verify` must refuse it (never a traceback, never a crash of the
terminal, never memory far above the package's size). Labs exchange these files; this is the
audit's list of what a hostile one tried.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from insitu.adapters import create_adapters
from insitu.adapters.package import save_package
from insitu.backbones import create_backbone
from insitu.cli import main
from tests.conftest import REPO, TINY_BACKBONE, tiny_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    _, _, path = tiny_package(root / "good", input_info={"domain": "images", "image_size": 32, "channels": 3})
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": TINY_BACKBONE}))
    return path, base


def copy_package(src, dst, meta_edit=None, tensors=None, rehash=True):
    """A copy of ``src`` with insitu.json edited and/or tensors replaced (hash kept consistent)."""
    dst.mkdir()
    raw = (src / "adapter.safetensors").read_bytes()
    if tensors is not None:
        save_file(tensors, str(dst / "adapter.safetensors"))
        raw = (dst / "adapter.safetensors").read_bytes()
    else:
        (dst / "adapter.safetensors").write_bytes(raw)
    meta = json.loads((src / "insitu.json").read_text())
    if rehash:
        meta["content_sha256"] = hashlib.sha256(raw).hexdigest()
    if meta_edit:
        meta_edit(meta)
    (dst / "insitu.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    (dst / "README.md").write_text("card")
    return dst


def refused(capsys, path, *match, base=None):
    for cmd in (["adapter", "inspect", str(path)], ["adapter", "verify", str(path), *(["--base", str(base)] if base else [])]):
        assert main(["--quiet", *cmd]) == 2, cmd
        err = capsys.readouterr().err
        assert "AdapterFormatError" in err or "AdapterMismatchError" in err, err
        for m in match:
            assert m in err, (m, err)


def good_tensors(package):
    return load_file(str(package[0] / "adapter.safetensors"))


def set_in(meta, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        meta = meta[k]
    if value is KeyError:
        del meta[keys[-1]]
    else:
        meta[keys[-1]] = value


# this process's own peak RSS (ru_maxrss would carry the forking parent's high-water mark over exec)
PEAK = "def peak_kib():\n    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"

FIELD_CASES = {
    "bottleneck_dim_1e9": ("adapter.options.bottleneck_dim", 10**9, "adapter.options.bottleneck_dim"),
    "bottleneck_dim_float": ("adapter.options.bottleneck_dim", 1e9, "adapter.options.bottleneck_dim"),
    "negative_bottleneck": ("adapter.options.bottleneck_dim", -4, "adapter.options.bottleneck_dim"),
    "missing_dim": ("adapter.dim", KeyError, "adapter.dim"),
    "wrong_dim": ("adapter.dim", 64, "adapter.dim"),
    "empty_blocks": ("adapter.options.blocks", [], "adapter.options.blocks"),
    "block_99": ("adapter.options.blocks", [0, 99], "adapter.options.blocks"),
    "scale_nan_string": ("adapter.options.scale", "NaN", "adapter.options.scale"),
    "unknown_kind": ("adapter.kind", "evil", "adapter.kind"),
    "image_size_20000": ("input.image_size", 20000, "input.image_size"),
    "zero_std": ("normalizer.std", [1.0, 0.0, 1.0], "normalizer"),
    "one_channel_normalizer": ("normalizer", {"mean": [0.0], "std": [1.0]}, "normalizer has 1 channels"),
    "bad_fingerprint": ("base.fingerprint", "x" * 64, "base.fingerprint"),
    "huge_embed_dim": ("base.embed_dim", 10**7, "base.embed_dim"),
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_bad_fields_are_typed_errors(package, tmp_path, capsys, case):
    field, value, message = FIELD_CASES[case]
    path = copy_package(package[0], tmp_path / case, lambda m: set_in(m, field, value))
    refused(capsys, path, message)


def test_json_tokens_nesting_and_size(package, tmp_path, capsys):
    text = (package[0] / "insitu.json").read_text()
    nan = copy_package(package[0], tmp_path / "nan", None)
    (nan / "insitu.json").write_text(text.replace('"trainable_params": ', '"trainable_params": NaN, "x": '))
    refused(capsys, nan, "not valid JSON")
    deep = copy_package(package[0], tmp_path / "deep")
    (deep / "insitu.json").write_text('{"metrics": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(capsys, deep, "insitu.json")
    big = copy_package(package[0], tmp_path / "big", lambda m: set_in(m, "license", "x" * (2 << 20)))
    refused(capsys, big, "larger than insitu allows")


def test_zip_bomb_and_duplicate_members(package, tmp_path, capsys):
    src = package[0]
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter.safetensors", (src / "adapter.safetensors").read_bytes())
        zf.writestr("insitu.json", b" " * (64 << 20) + (src / "insitu.json").read_bytes())
    assert bomb.stat().st_size < 1 << 20  # a small file that inflates to 64 MiB
    refused(capsys, bomb, "inflates past")
    dup = tmp_path / "dup.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(dup, "w") as zf:
        for name in ("adapter.safetensors", "insitu.json", "insitu.json"):
            zf.writestr(name, (src / name).read_bytes())
    refused(capsys, dup, "more than once")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e38])
def test_non_finite_and_absurd_weights(package, tmp_path, capsys, value):
    tensors = good_tensors(package)
    name = sorted(k for k in tensors if k.startswith("adapter."))[0]
    tensors[name] = tensors[name].clone().fill_(value)
    path = copy_package(package[0], tmp_path / "w", tensors=tensors)
    refused(capsys, path, name)


def test_tampered_weights_fail_the_content_hash(package, tmp_path, capsys):
    path = copy_package(package[0], tmp_path / "t", rehash=False)
    raw = bytearray((path / "adapter.safetensors").read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header_len + 5] ^= 0x01  # one bit of one weight; shapes unchanged
    (path / "adapter.safetensors").write_bytes(bytes(raw))
    refused(capsys, path, "content_sha256")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.update({"backbone.blocks.0.weight": torch.zeros(2)}), "not adapters or objective heads"),
        (lambda t: t.update({"head.evil": torch.zeros(2)}), "not adapters or objective heads"),
        (lambda t: t.update({k: v.half() for k, v in t.items() if k.startswith("adapter.")}), "F16"),
        (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if k.startswith("adapter.")}), "I32"),
        (lambda t: t.update({k: v > 0 for k, v in t.items() if k.startswith("adapter.")}), "BOOL"),
    ],
)
def test_foreign_tensors_and_dtypes(package, tmp_path, capsys, change, message):
    tensors = good_tensors(package)
    change(tensors)

    def counts(meta):
        meta["tensors"] = {"adapter": sum(k.startswith("adapter.") for k in tensors), "head": sum(k.startswith("head.") for k in tensors)}

    path = copy_package(package[0], tmp_path / "f", counts, tensors=tensors)
    refused(capsys, path, message)


def test_terminal_escapes_and_markup_are_neutralised(package, tmp_path, capsys):
    evil = "\x1b]0;pwned\x07\x1b[2J[link=https://example.invalid]click[/link][/bogus]\x9b31m"

    def edit(meta):
        meta["base"]["source"] = evil
        meta["objective"]["name"] = evil

    path = copy_package(package[0], tmp_path / "e", edit)
    assert main(["adapter", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    flat = "".join(line.strip(" │") for line in out.splitlines())  # undo the table's folding
    assert "[/bogus]" in flat and "[link=" in flat  # printed literally, not parsed as markup


def test_apply_refuses_to_write_non_finite_features(package, tmp_path, shapes_dir, capsys):
    # a normaliser within the schema (std > 0) whose output overflows float32 in the first LayerNorm
    path = copy_package(package[0], tmp_path / "o", lambda m: set_in(m, "normalizer.std", [1e-30] * 3))
    out = tmp_path / "feats.safetensors"
    code = main(["--quiet", "adapter", "apply", str(path), "--base", str(package[1]), "--data", str(shapes_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite features" in err and not out.exists()


def test_good_package_passes_and_inspect_stays_light(package, capsys):
    assert main(["--quiet", "adapter", "verify", str(package[0]), "--base", str(package[1])]) == 0
    assert "content hash ok" in capsys.readouterr().out
    code = (
        PEAK + "import sys\nfrom insitu.cli import main\n"
        "rc = main(['--quiet', 'adapter', 'inspect', sys.argv[1]])\n"
        "print(rc, 'torch' in sys.modules, peak_kib())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(package[0])],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    rc, torch_loaded, rss_kb = out.stdout.split()[-3:]
    assert rc == "0" and torch_loaded == "False", out.stderr
    assert int(rss_kb) < 300 * 1024  # vetting needs the JSON and the header, not the ML stack


def test_inspect_memory_is_bounded_on_a_bomb(package, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter.safetensors", np.zeros(8, np.uint8).tobytes())
        zf.writestr("insitu.json", b"[" * (512 << 20))
    code = (
        PEAK + "import sys\nfrom insitu.cli import main\nrc = main(['--quiet', 'adapter', 'inspect', sys.argv[1]])\nprint(rc, peak_kib())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120
    )
    rc, rss_kb = out.stdout.split()[-2:]
    assert rc == "2" and "inflates past" in out.stderr
    assert int(rss_kb) < 300 * 1024  # KiB: far below the 512 MiB the member inflates to


def test_a_diverged_run_is_never_packaged(tmp_path):
    from insitu.errors import NonFiniteLossError

    bb = create_backbone(TINY_BACKBONE)
    adapters = create_adapters(bb, {"blocks": "all", "bottleneck_dim": 4})
    next(iter(adapters.parameters())).data.fill_(1e30)
    with pytest.raises(NonFiniteLossError, match="refusing to write the package"):
        save_package(tmp_path / "p", bb, adapters)
    assert not (tmp_path / "p" / "insitu.json").exists()
