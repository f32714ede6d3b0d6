"""Plain image folders named after patients: ``manifest_paths: token`` keeps every name out of what insitu writes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from insitu.cli import main
from insitu.domains import create_domain
from insitu.domains.base import stable_id
from insitu.privacy import private_run
from tests.conftest import tiny_config

PATIENTS = ("patient_DOE_123", "patient_ROE_456")


def write_patient_folders(root: Path, masks: Path | None = None, n: int = 4) -> Path:
    """One class folder per patient, files named after them, one undecodable file (quarantined)."""
    rng = np.random.default_rng(0)
    for patient in PATIENTS:
        (root / patient).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / patient / f"DOE_JOHN_scan_{i}.png")
            if masks is not None and i:  # scan 0 has no mask: quarantined with a message about it
                (masks / patient).mkdir(parents=True, exist_ok=True)
                Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(masks / patient / f"DOE_JOHN_scan_{i}.png")
    (root / PATIENTS[0] / "DOE_JOHN_broken.png").write_bytes(b"not a png")
    return root


def files_holding(folder: Path, text: str) -> list[str]:
    """Files under ``folder`` whose bytes contain ``text``. Binary files (checkpoints, tensorboard events) are
    searched for ``text`` + '_' too: three random bytes match a 100 KB file by chance ~1 time in 160."""
    hits = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
            # embedded plots (report.html's base64 PNGs) are random letters: "DOE" turns up in them by chance
            data = re.sub(rb"base64,[A-Za-z0-9+/=]+", b"base64,", data)
            needle = text.encode()
        except UnicodeDecodeError:
            needle = (text + "_").encode()
        if needle in data or b"patient_" in data:
            hits.append(str(path.relative_to(folder)))
    return hits


def test_token_mode_scan_and_pretrain_write_no_patient_name(tmp_path, capsys):
    root = write_patient_folders(tmp_path / "export_DOE", masks=tmp_path / "masks_DOE")
    scan = tmp_path / "scan"
    argv = ["scan", str(root), "--domain", "images", "--out", str(scan), "--option", "manifest_paths=token"]
    assert main([*argv, "--option", f"masks={tmp_path / 'masks_DOE'}"]) == 0
    shown = capsys.readouterr()
    assert "quarantined file-" in shown.out and "DOE" not in shown.out  # the terminal (a scheduler's log) too
    assert sorted(p.name for p in scan.iterdir()) == [".insitu-owned.json", "manifest.csv", "manifest.json", "near_duplicates.csv", "quarantine.csv"]
    with open(scan / "quarantine.csv", newline="") as f:
        reasons = sorted(r["reason"] for r in csv.DictReader(f))
    assert reasons == ["cannot decode image", "no mask", "no mask"]  # the messages that quoted the files were scrubbed
    with open(scan / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["path"].startswith("file-") and json.loads(r["extra"])["mask"].startswith("file-") for r in rows)
    assert all(n.startswith("class-") for n in json.loads((scan / "manifest.json").read_text())["class_names"])

    raw = tiny_config(root, tmp_path / "runs", train={"max_steps": 2, "batch_size": 4, "checkpoint_every": 1})
    raw["data"]["options"] = {"manifest_paths": "token"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["-q", "pretrain", "-c", str(tmp_path / "run.yaml")]) == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert files_holding(scan, "DOE") == []
    assert files_holding(run, "DOE") == []
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == "<local path>"


def test_relative_mode_is_unchanged_and_names_the_files(tmp_path):
    root = write_patient_folders(tmp_path / "export", n=2)
    manifest = create_domain("images", {}).scan(root)
    assert manifest.path_salt is None and manifest.class_names == list(PATIENTS)
    item = manifest.items[0]
    rel = Path(item.path).relative_to(root).as_posix()
    assert item.item_id == stable_id(rel) and item.group == stable_id(rel)  # ids as before this option existed
    manifest.write(tmp_path / "m")
    assert "patient_DOE_123/DOE_JOHN_scan_0.png" in (tmp_path / "m" / "manifest.csv").read_text()

    raw = tiny_config(root, tmp_path / "runs", train={"max_steps": 1, "batch_size": 4})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["-q", "pretrain", "-c", str(tmp_path / "run.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "config.yaml").read_text())["data"]["root"] == str(root)  # re-runnable


def test_token_ids_groups_and_paths_depend_on_the_salt(tmp_path, monkeypatch):
    root = write_patient_folders(tmp_path / "export", n=2)
    seen = []
    for salt in ("site-a", "site-b", "site-a"):
        monkeypatch.setenv("INSITU_SALT", salt)
        manifest = create_domain("images", {"manifest_paths": "token", "group_pattern": r"(DOE_JOHN)"}).scan(root)
        manifest.write(tmp_path / salt)
        with open(tmp_path / salt / "manifest.csv", newline="") as f:
            seen.append([(r["item_id"], r["group"], r["path"]) for r in csv.DictReader(f)])
    assert seen[0] == seen[2]  # the same salt gives the same ids on every machine
    assert all(a[k] != b[k] for a, b in zip(seen[0], seen[1], strict=True) for k in range(3))
    rel = "patient_DOE_123/DOE_JOHN_scan_0.png"
    assert stable_id(rel) not in {i for row in seen for i, _, _ in row}  # a guessed name cannot be confirmed
    assert stable_id("DOE_JOHN") not in {g for row in seen for _, g, _ in row}  # nor a guessed case id


def test_class_names_follow_the_option(tmp_path):
    root = write_patient_folders(tmp_path / "export", n=1)
    shown = {
        opts: create_domain("images", dict(opts)).scan(root).class_names
        for opts in (
            (("manifest_paths", "token"),),
            (("manifest_paths", "token"), ("class_names", "folders")),
            (("class_names", "token"),),
        )
    }
    token_auto, token_folders, relative_token = shown.values()
    assert all(n.startswith("class-") and "DOE" not in n for n in token_auto + relative_token)
    assert token_folders == list(PATIENTS)  # labels the user chose to show (benign/malignant)


def test_private_run_redacts_dicom_and_token_runs_only():
    assert private_run({"data": {"domain": "dicom", "root": "/x", "options": {"manifest_paths": "token"}}})
    assert private_run({"data": {"domain": "images", "options": {}}, "probe": {"test": {"domain": "images", "options": {"manifest_paths": "token"}}}})
    assert not private_run({"data": {"domain": "images", "root": "/x", "options": {"manifest_paths": "relative"}}})
