"""Atomic writes (insitu.io): an interrupted write never leaves a half file or a half adapter package."""

import json

import pytest
import torch

import insitu.package_format as package_format
from insitu.adapters.package import load_package, save_package, write_zip
from insitu.errors import AdapterFormatError
from insitu.io import atomic_path, atomic_write_text, csv_text, replace_folder, write_csv, write_json
from tests.conftest import tiny_package


class Interrupted(RuntimeError):
    pass


def _interrupt_at(monkeypatch, name: str) -> list[str]:
    """Make the package writer raise when it reaches the file ``name``; returns the names written before."""
    written: list[str] = []
    real = package_format.atomic_write_bytes

    def write(path, data):
        if path.name == name:
            raise Interrupted(f"killed while writing {name}")
        real(path, data)
        written.append(path.name)

    monkeypatch.setattr(package_format, "atomic_write_bytes", write)
    return written


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_interrupted_package_write_keeps_the_previous_package(tmp_path, monkeypatch):
    bb, adapters, path = tiny_package(tmp_path / "pkg")
    before = load_package(path).meta.content_sha256
    (path / "notes.txt").write_text("mine")
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(1.0)
    written = _interrupt_at(monkeypatch, package_format.META_FILE)
    with pytest.raises(Interrupted):
        save_package(path, bb, adapters)
    assert written == [package_format.TENSORS_FILE, package_format.CARD_FILE]  # mid-write: tensors were already out
    assert load_package(path).meta.content_sha256 == before  # the earlier package, whole
    assert (path / "notes.txt").read_text() == "mine"
    assert _siblings(path) == []  # no temporary folder left behind
    monkeypatch.undo()
    save_package(path, bb, adapters)  # the same write, uninterrupted, replaces it
    assert load_package(path).meta.content_sha256 != before
    assert (path / "notes.txt").read_text() == "mine"  # what a person put beside the package stays


def test_interrupted_first_write_leaves_no_package(tmp_path, monkeypatch):
    bb, adapters, _ = tiny_package(tmp_path / "first")
    _interrupt_at(monkeypatch, package_format.META_FILE)
    target = tmp_path / "runs" / "adapter"
    with pytest.raises(Interrupted):
        save_package(target, bb, adapters)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with pytest.raises(AdapterFormatError):
        load_package(target)


def test_rewritten_package_drops_the_old_signature(tmp_path):
    bb, adapters, path = tiny_package(tmp_path / "pkg")
    (path / package_format.SIGNATURE_FILE).write_text("{}")  # stands for a signature of the earlier bytes
    save_package(path, bb, adapters)
    assert not (path / package_format.SIGNATURE_FILE).exists()
    load_package(path)


def test_interrupted_zip_leaves_no_zip(tmp_path, monkeypatch):
    _, _, path = tiny_package(tmp_path / "pkg")
    zpath = tmp_path / "pkg.zip"
    monkeypatch.setattr("zipfile.ZipFile.write", lambda *a, **k: (_ for _ in ()).throw(Interrupted("killed")))
    with pytest.raises(Interrupted):
        write_zip(path, zpath)
    assert not zpath.exists() and _siblings(zpath) == ["pkg"]


def test_atomic_path_and_helpers(tmp_path):
    target = tmp_path / "out" / "a.json"
    write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    with pytest.raises(Interrupted), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise Interrupted
    assert json.loads(target.read_text()) == {"x": 1} and _siblings(target) == []
    atomic_write_text(target, "whole")
    assert target.read_text() == "whole"
    write_json(target, [1], indent=None, sync=False)  # caches skip the fsync, not the rename
    assert target.read_text() == "[1]" and _siblings(target) == []
    with pytest.raises(Interrupted), atomic_path(target, sync=False) as tmp:
        tmp.write_text("half")
        raise Interrupted
    assert target.read_text() == "[1]" and _siblings(target) == []
    rows = [[1, "a,b"], {"n": 2, "s": "c", "extra": "ignored"}]
    assert csv_text(["n", "s"], rows) == 'n,s\r\n1,"a,b"\r\n2,c\r\n'
    assert write_csv(tmp_path / "t.csv", ["n", "s"], rows).read_bytes() == csv_text(["n", "s"], rows).encode()


def test_replace_folder_is_all_or_nothing(tmp_path):
    folder = tmp_path / "f"
    with replace_folder(folder, ["a"]) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(Interrupted), replace_folder(folder, ["a"]) as tmp:
        (tmp / "a").write_text("2")
        raise Interrupted
    assert (folder / "a").read_text() == "1" and _siblings(folder) == []
