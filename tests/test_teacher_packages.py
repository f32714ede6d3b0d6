"""Packages carry the EMA teacher's adapters (teacher.safetensors) and export them as a package of their own."""

import hashlib
import json
import shutil
import zipfile

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from insitu.adapters.package import apply_package, export_package, load_package, write_zip
from insitu.backbones import create_backbone
from insitu.cli import main
from insitu.config import load_config
from insitu.errors import AdapterFormatError, ConfigError, SignatureError
from insitu.io import OutputExistsError
from insitu.package_format import MAX_TENSOR_BYTES, OPTIONAL_CAPS, TEACHER_FILE, vet_package
from insitu.pipelines.pretrain import PretrainModule, pretrain
from insitu.sharing.registry import publish, pull
from insitu.sharing.signing import TrustPolicy, generate_keypair, sign_package
from tests.conftest import TINY_BACKBONE, tiny_config, write_shapes


def run(root, objective):
    """A 3-step tiny pretraining run; returns (package folder, the module that trained it)."""
    built = []
    original = PretrainModule.__init__

    def spy(self, cfg):
        original(self, cfg)
        built.append(self)

    raw = tiny_config(write_shapes(root / "shapes"), root / "runs", name=objective["name"], objective=objective)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PretrainModule, "__init__", spy)
        result = pretrain(load_config(raw), quiet=True)
    return result.adapter_dir, built[0]


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    pkg, module = run(root, {"name": "dino", "options": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "views": {"local_crops": 1}}})
    teacher = {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}
    student = {k: v.detach().clone() for k, v in module.student.state_dict().items()}
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump({"backbone": TINY_BACKBONE}))
    return pkg, teacher, student, base


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dino_package_carries_the_ema_teacher(dino, capsys):
    pkg, teacher, student, _ = dino
    assert main(["--quiet", "adapter", "inspect", str(pkg)]) == 0
    assert f"carried ({len(teacher)} adapter tensors)" in capsys.readouterr().out
    assert (pkg / TEACHER_FILE).is_file()
    meta = json.loads((pkg / "insitu.json").read_text())
    assert meta["teacher"]["tensors"] == len(teacher)
    assert meta["teacher"]["content_sha256"] == hashlib.sha256((pkg / TEACHER_FILE).read_bytes()).hexdigest()
    assert "weights" not in meta  # the student's, as every package before
    assert not same(teacher, student)  # three EMA steps: the teacher lags the student
    assert same(load_package(pkg).adapter_state(), student)
    assert same(load_package(pkg, weights="teacher").adapter_state(), teacher)
    assert set(load_file(str(pkg / TEACHER_FILE))) == {f"adapter.{k}" for k in teacher}


def test_export_teacher_verifies_and_holds_the_teacher(dino, tmp_path, capsys):
    pkg, teacher, student, base = dino
    out = tmp_path / "teacher_pkg"
    assert main(["--quiet", "adapter", "export", str(pkg), "--weights", "teacher", "--out", str(out)]) == 0
    assert main(["--quiet", "adapter", "verify", str(out), "--base", str(base)]) == 0
    assert "compatible" in capsys.readouterr().out
    exported = load_package(out)
    assert exported.meta.weights == "teacher" and exported.meta.teacher is None
    assert json.loads((out / "insitu.json").read_text())["weights"] == "teacher"
    assert not (out / TEACHER_FILE).exists() and exported.head_state() == {}
    assert same(exported.adapter_state(), teacher) and not same(exported.adapter_state(), student)
    assert exported.meta.base == load_package(pkg).meta.base and exported.meta.normalizer == load_package(pkg).meta.normalizer
    model = apply_package(out, create_backbone(TINY_BACKBONE))
    assert same(model.adapters.state_dict(), teacher)
    # as a zip, and from a zip; the Python entry point the benchmarks use
    zipped = export_package(write_zip(pkg, tmp_path / "src.zip"), tmp_path / "teacher.zip", weights="teacher")
    assert same(load_package(zipped).adapter_state(), teacher)
    with pytest.raises(OutputExistsError):
        export_package(pkg, out, weights="teacher")
    with pytest.raises(ConfigError, match="student"):
        export_package(out, tmp_path / "again", weights="teacher")  # already the teacher's: nothing more to export


def test_student_export_and_zip_keep_the_teacher(dino, tmp_path):
    pkg, teacher, _, _ = dino
    zipped = write_zip(pkg, tmp_path / "p.zip")
    assert TEACHER_FILE in zipfile.ZipFile(zipped).namelist()
    assert main(["--quiet", "adapter", "export", str(zipped), "--out", str(tmp_path / "unpacked")]) == 0
    for copy in (zipped, tmp_path / "unpacked", export_package(pkg, tmp_path / "copy")):
        assert same(load_package(copy, weights="teacher").adapter_state(), teacher)


def tampered(pkg, dst, tensors=None, raw=None, rehash=True, record=True):
    """A copy of ``pkg`` whose teacher file is replaced (by ``tensors`` or ``raw`` bytes), insitu.json rehashed unless told."""
    shutil.copytree(pkg, dst)
    if tensors is not None:
        save_file(tensors, str(dst / TEACHER_FILE))
    if raw is not None:
        (dst / TEACHER_FILE).write_bytes(raw)
    meta = json.loads((dst / "insitu.json").read_text())
    if rehash:
        meta["teacher"]["content_sha256"] = hashlib.sha256((dst / TEACHER_FILE).read_bytes()).hexdigest()
    if not record:
        del meta["teacher"]
    (dst / "insitu.json").write_text(json.dumps(meta))
    return dst


def test_tampered_teacher_files_are_refused(dino, tmp_path, capsys):
    pkg = dino[0]
    good = load_file(str(pkg / TEACHER_FILE))
    first = sorted(good)[0]
    flipped = bytearray((pkg / TEACHER_FILE).read_bytes())
    flipped[-1] ^= 0x40
    cases = {
        "changed_bytes": (tampered(pkg, tmp_path / "a", raw=bytes(flipped), rehash=False), "teacher.content_sha256"),
        "nan": (tampered(pkg, tmp_path / "b", tensors={**good, first: torch.full_like(good[first], float("nan"))}), "NaN"),
        "huge": (tampered(pkg, tmp_path / "c", tensors={**good, first: torch.full_like(good[first], 1e9)}), "above"),
        "float16": (tampered(pkg, tmp_path / "d", tensors={**good, first: good[first].half()}), "F16"),
        "head_smuggled": (tampered(pkg, tmp_path / "e", tensors={**good, "head.dino.w": torch.ones(2)}), "head.dino.w"),
        "foreign_name": (tampered(pkg, tmp_path / "f", tensors={**good, "backbone.x": torch.ones(2)}), "backbone.x"),
        "wrong_shape": (tampered(pkg, tmp_path / "g", tensors={**good, first: torch.zeros(3)}), first),
        "missing_tensor": (tampered(pkg, tmp_path / "h", tensors={k: v for k, v in good.items() if k != first}), first),
        "unrecorded": (tampered(pkg, tmp_path / "i", rehash=False, record=False), "not recorded"),
        "truncated": (tampered(pkg, tmp_path / "j", raw=b"\x10\x00"), "truncated"),
    }
    lacking = tampered(pkg, tmp_path / "k")
    (lacking / TEACHER_FILE).unlink()
    cases["recorded_but_missing"] = (lacking, "lacks")
    big = tampered(pkg, tmp_path / "l", rehash=False)
    with open(big / TEACHER_FILE, "r+b") as f:  # sparse: no disk used
        f.truncate(MAX_TENSOR_BYTES + 1)
    cases["over_the_cap"] = (big, "larger than insitu allows")
    for name, (path, message) in cases.items():
        with pytest.raises(AdapterFormatError, match=message if name != "float16" else "F16"):
            vet_package(path)
        for cmd in ("inspect", "verify"):
            assert main(["--quiet", "adapter", cmd, str(path)]) == 2, (name, cmd)
            err = capsys.readouterr().err
            assert "AdapterFormatError" in err and (name == "over_the_cap" or "teacher" in err), (name, err)
        with pytest.raises(AdapterFormatError):
            load_package(path, weights="teacher")


def test_a_zip_member_teacher_is_read_under_its_cap(dino, tmp_path, monkeypatch):
    zipped = write_zip(dino[0], tmp_path / "p.zip")
    vet_package(zipped)
    size = len((dino[0] / TEACHER_FILE).read_bytes())
    monkeypatch.setitem(OPTIONAL_CAPS, TEACHER_FILE, size - 1)  # the cap the zip reader applies to this member
    with pytest.raises(AdapterFormatError, match="teacher.safetensors inflates past"):
        vet_package(zipped)


def test_the_signature_covers_the_teacher(dino, tmp_path):
    pkg = dino[0]
    private, public = generate_keypair(tmp_path / "keys", "lab-a")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(public, trusted / public.name)
    signed = tmp_path / "signed"
    shutil.copytree(pkg, signed)
    sign_package(signed, private)
    policy = TrustPolicy(trusted, require_signature=True)
    assert same(load_package(signed, policy, weights="teacher").adapter_state(), dino[1])
    # another teacher, insitu.json rehashed to match it: the file checks pass, the signature does not
    good = load_file(str(pkg / TEACHER_FILE))
    swapped = tampered(signed, tmp_path / "swapped", tensors={k: torch.zeros_like(v) for k, v in good.items()})
    vet_package(swapped)
    with pytest.raises(SignatureError, match="insitu.json changed after it was signed"):
        load_package(swapped, policy, weights="teacher")
    assert main(["--quiet", "adapter", "verify", str(swapped), "--trusted-keys", str(trusted), "--require-signature"]) == 2
    # signing a zip rewrites it with the teacher file kept
    zipped = write_zip(pkg, tmp_path / "p.zip")
    sign_package(zipped, private)
    assert TEACHER_FILE in zipfile.ZipFile(zipped).namelist()
    assert same(load_package(zipped, policy, weights="teacher").adapter_state(), dino[1])


def test_registry_keeps_the_teacher(dino, tmp_path):
    publish(dino[0], tmp_path / "registry", name="dino-site")
    pull("dino-site", tmp_path / "registry", tmp_path / "pulled")
    assert same(load_package(tmp_path / "pulled", weights="teacher").adapter_state(), dino[1])


def test_teacherless_objective_has_no_teacher_file(tmp_path, capsys):
    pkg, _ = run(tmp_path, {"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    assert not (pkg / TEACHER_FILE).exists() and "teacher" not in json.loads((pkg / "insitu.json").read_text())
    assert load_package(pkg).meta.teacher is None
    out = tmp_path / "out"
    assert main(["--quiet", "adapter", "export", str(pkg), "--weights", "teacher", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "simclr" in err and "--weights student" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="no teacher adapters"):
        export_package(pkg, out, weights="teacher")
    with pytest.raises(ConfigError, match="student' or 'teacher"):
        load_package(pkg, weights="ema")
