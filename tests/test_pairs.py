"""The pairs domain: manifests, sidecars, label text, section-aware sentence sampling, quarantine."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.cli import main
from insitu.domains import create_domain
from insitu.domains.pairs import PairsDomain, PairsError, report_sentences, split_sections
from insitu.errors import ConfigError
from tests.conftest import shared, write_shapes

REPORT = (
    "INDICATION: Cough, fever. Patient ID hidden.\n"
    "FINDINGS: Heart size is normal. Patchy opacity in the right lower lobe.\n"
    "IMPRESSION: Right lower lobe pneumonia."
)


def test_sections_are_split_and_only_chosen_ones_sampled() -> None:
    sections = split_sections(REPORT)
    assert set(sections) == {"indication", "findings", "impression"}
    assert report_sentences(REPORT, ["findings", "impression"]) == [
        "Heart size is normal.",
        "Patchy opacity in the right lower lobe.",
        "Right lower lobe pneumonia.",
    ]
    assert report_sentences("FINDINGS:\nIMPRESSION: No acute abnormality.", ["findings", "impression"]) == ["No acute abnormality."]
    assert report_sentences("A river crosses farmland. Clouds in the north.", ["findings"]) == [
        "A river crosses farmland.",
        "Clouds in the north.",
    ]  # no headers: a caption, used whole
    assert report_sentences("INDICATION: Cough.", ["findings", "impression"]) == []


def _write_table(root: Path) -> Path:
    """Pairs CSV over shape PNGs, with one missing image, one corrupt image and two unusable texts."""
    write_shapes(root, n_per_class=2, size=32, classes=2)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        {"image": p.relative_to(root).as_posix(), "text": REPORT, "label": p.parent.name, "group": "pt1"}
        for p in sorted(root.rglob("*_*.png"))
    ]
    rows += [
        {"image": "missing.png", "text": REPORT, "label": "circle", "group": ""},
        {"image": "broken.png", "text": REPORT, "label": "circle", "group": ""},
        {"image": rows[0]["image"], "text": "   ", "label": "circle", "group": ""},
        {"image": rows[0]["image"], "text": "INDICATION: Cough only.", "label": "circle", "group": ""},
    ]
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "pairs.csv"


def test_csv_scan_quarantines_bad_rows_and_keeps_text_out_of_the_manifest(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "data")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in table.parent.rglob("*") if p.is_file()}
    domain = create_domain("pairs")
    manifest = domain.scan(table)
    assert len(manifest.items) == 4 and manifest.class_names == ["circle", "square"]
    assert {q.reason for q in manifest.quarantine} == {"missing image", "cannot decode image", "empty text", "no usable text"}
    assert len({i.group for i in manifest.items}) == 1  # the group column keeps a patient together
    manifest.write(tmp_path / "manifest")
    written = "".join(p.read_text() for p in (tmp_path / "manifest").iterdir())
    assert "pneumonia" not in written and "Patient ID" not in written  # report text never enters the manifest
    torch.manual_seed(0)
    texts = {domain.load(manifest.items[0], manifest)["text"] for _ in range(40)}
    assert texts == set(report_sentences(REPORT, ["findings", "impression"]))  # never the indication
    sample = domain.load(manifest.items[2], manifest)
    assert sample["image"].shape == (3, 32, 32) and sample["label"] == 1
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in table.parent.rglob("*") if p.is_file()}
    assert before == after  # sources are read-only


def test_jsonl_scan_and_bad_lines(tmp_path: Path) -> None:
    write_shapes(tmp_path, n_per_class=1, size=32, classes=2)
    lines = [
        json.dumps({"image": "circle/circle_0.png", "text": "A round shape."}),
        json.dumps({"image": "square/square_0.png", "text": "A box."}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    domain = PairsDomain({"sampling": "full"})
    manifest = domain.scan(tmp_path / "pairs.jsonl")
    assert [domain.load(i, manifest)["text"] for i in manifest.items] == ["A round shape.", "A box."]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(PairsError, match="bad.jsonl line 2 is not valid JSON"):
        domain.scan(tmp_path / "bad.jsonl")
    with pytest.raises(PairsError, match="no column 'path'"):
        PairsDomain({"image_column": "path"}).scan(tmp_path / "pairs.jsonl")


def test_sidecar_folders_and_missing_sidecars(tmp_path: Path) -> None:
    root = write_shapes(tmp_path / "shapes", n_per_class=2, size=32, classes=2)
    for p in sorted(root.rglob("*_0.png")):
        p.with_suffix(".txt").write_text(f"FINDINGS: A {p.parent.name} is seen.\nIMPRESSION: {p.parent.name}.")
    domain = PairsDomain()
    manifest = domain.scan(root)
    assert len(manifest.items) == 2 and [q.reason for q in manifest.quarantine] == ["no text", "no text"]
    sample = domain.load(manifest.items[1], manifest)
    assert sample["label"] == 1 and sample["text"] in {"A square is seen.", "square."}


def test_npz_with_label_text_on_real_pneumoniamnist() -> None:
    npz = shared("medical", "pneumoniamnist", "pneumoniamnist_balanced_trainval.npz")
    label_text = {0: ["FINDINGS: Heart size is normal. Lungs are clear."], 1: ["FINDINGS: Heart size is normal. Right lower lobe opacity."]}
    domain = PairsDomain({"channels": 1, "split": "val", "label_text": label_text, "class_names": ["normal", "pneumonia"]})
    manifest = domain.scan(npz, max_items=20)
    assert len(manifest.items) == 20 and manifest.class_names == ["normal", "pneumonia"]
    torch.manual_seed(1)
    for item in manifest.items[:6]:
        sample = domain.load(item, manifest)
        assert sample["image"].shape == (1, 28, 28)
        assert sample["text"] in report_sentences(label_text[sample["label"]][0], ["findings"])
    with pytest.raises(PairsError, match="no text; set data.options.label_text"):
        PairsDomain({"channels": 1, "split": "val"}).scan(npz, max_items=4)


def test_dicom_reference_in_a_manifest(tmp_path: Path) -> None:
    ct = shared("medical", "dicom_pydicom", "CT_small.dcm")
    rows = [
        {"image": str(ct), "text": "FINDINGS: Small CT slice. IMPRESSION: Nothing acute."},
        {"image": str(tmp_path / "x.dcm"), "text": "FINDINGS: Missing."},
    ]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    domain = PairsDomain({"channels": 1})
    manifest = domain.scan(tmp_path / "pairs.csv")
    assert len(manifest.items) == 1 and manifest.quarantine[0].reason == "missing image"
    sample = domain.load(manifest.items[0], manifest)
    assert sample["image"].shape[0] == 1 and sample["image"].shape[-1] == 128
    assert np.isfinite(sample["image"].numpy()).all()


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="capture group"):
        PairsDomain({"section_pattern": "[A-Z]+:"})
    with pytest.raises(ValueError, match="not a valid regular expression"):  # re.error would be a traceback
        PairsDomain({"section_pattern": "([A-Z"})
    with pytest.raises(ValueError, match="label_text"):
        PairsDomain({"label_text": {0: []}})


def test_cli_scan_and_demo(tmp_path: Path) -> None:
    demo = PairsDomain.make_demo(tmp_path / "demo", seed=0, n_per_class=2, size=32)
    out = tmp_path / "scan"
    assert main(["-q", "scan", demo.data["root"], "--domain", "pairs", "--out", str(out), "--option", "sampling=first"]) == 0
    assert json.loads((out / "manifest.json").read_text())["items"] == 8
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(empty / "a.png")
    assert main(["-q", "scan", str(empty), "--domain", "pairs", "--out", str(tmp_path / "e")]) == 1
    assert main(["-q", "scan", str(empty), "--domain", "pairs", "--out", str(tmp_path / "e"), "--option", "sampling=sometimes"]) == 2
    assert ConfigError  # the bad option above is a ConfigError, reported with exit code 2
