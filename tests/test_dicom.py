"""The dicom domain on seeded real DICOM files: series assembly, intensities, codecs, bad input, caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from insitu.domains import create_domain
from insitu.domains.dicom import DicomDomain, DicomError
from insitu.domains.dicom_seg import read_seg, write_seg
from insitu.errors import EmptyDatasetError
from tests.conftest import shared
from tests.data.dicom_fixtures import ct_volume, write_bad_files, write_series, write_sr


def _domain(tmp_path: Path, **options) -> DicomDomain:
    return create_domain("dicom", {"cache_dir": str(tmp_path / "cache"), "workers": 2, **options})


def _sha(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_series_ordered_by_position_with_hu(tmp_path):
    vol = ct_volume(0)
    write_series(tmp_path / "data" / "s1", vol)
    d = _domain(tmp_path)
    m = d.scan(tmp_path / "data")
    assert len(m.items) == 6 and m.counts()["groups"] == 1
    unit = d.units[m.items[0].extra["unit"]]
    v = d.volume(unit)
    # order comes from positions (InstanceNumber and file names are scrambled by the fixture)
    np.testing.assert_allclose(v.array[:, 0], vol.astype(np.float32))
    assert np.all(np.diff(v.positions) > 0) and v.spacing == pytest.approx((0.8, 0.8, 2.5))
    sample = d.load(m.items[3], m)
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["image"][0, 0, 0] == pytest.approx(-1000, abs=6)  # air in HU


def test_windows_context_and_monochrome1(tmp_path):
    vol = ct_volume(1)
    write_series(tmp_path / "data" / "s1", vol)
    d = _domain(tmp_path, windows=["lung", "bone", [40, 400]], context=1)
    m = d.scan(tmp_path / "data")
    img = d.load(m.items[0], m)["image"]
    assert img.shape == (9, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert float(img[0, 16, 16]) == pytest.approx((40 + 600 + 750) / 1500, abs=0.01)  # lung window of soft tissue
    with pytest.raises(DicomError, match="unknown CT window"):
        _domain(tmp_path, windows=["liver-ish"]).load(m.items[0], m)
    mono1 = tmp_path / "mono1"
    write_series(mono1 / "s", vol[:2], modality="MR", photometric="MONOCHROME1")
    d1 = _domain(tmp_path / "c1")
    m1 = d1.scan(mono1)
    img1 = d1.load(m1.items[0], m1)["image"][0]
    assert float(img1[0, 0]) > float(img1[16, 16])  # air is stored bright in MONOCHROME1: shown dark after inversion


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_compressed_series_decode_losslessly(tmp_path, syntax):
    vol = ct_volume(2, (3, 32, 32))
    write_series(tmp_path / "data" / "s", vol, transfer_syntax=syntax)
    d = _domain(tmp_path)
    m = d.scan(tmp_path / "data")
    assert not m.quarantine
    np.testing.assert_allclose(d.volume(d.units[m.items[0].extra["unit"]]).array[:, 0], vol)


def test_pydicom_corpus_big_endian_deflate_colour(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm", "MR_truncated.dcm", "no_meta.dcm", "JPEG-lossy.dcm"):
        (root / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    for name in ("examples_ybr_color.dcm", "examples_palette.dcm", "examples_rgb_color.dcm"):
        (root / name).write_bytes(shared("medical", "dicom_pydicom", name).read_bytes())
    d = _domain(tmp_path, manifest_paths="relative")
    m = d.scan(root)
    reasons = {q.path: q.reason for q in m.quarantine}
    assert set(reasons) == {"MR_truncated.dcm", "no_meta.dcm", "JPEG-lossy.dcm"}
    assert reasons["MR_truncated.dcm"] == "pixel data cannot be decoded (Explicit VR Little Endian)"
    assert reasons["JPEG-lossy.dcm"].startswith("pixel data cannot be decoded (JPEG Extended")
    for item in m.items:
        img = d.load(item, m)["image"]
        assert torch.isfinite(img).all() and img.shape[0] in (1, 3)
    colour = [d.load(i, m)["image"] for i in m.items if d.units[i.extra["unit"]].records[0]["samples"] == 3]
    assert colour and all(0 <= float(c.min()) and float(c.max()) <= 1 for c in colour)


def test_bad_inputs_quarantined_and_sources_untouched(tmp_path):
    root = tmp_path / "data"
    write_series(root / "good", ct_volume(3))
    bad = write_bad_files(root / "bad", root / "good")
    write_sr(root / "reports" / "sr.dcm")
    tilted = write_series(root / "tilted", ct_volume(4, (3, 32, 32)), patient_id="P2", seed=4)
    ds = pydicom.dcmread(tilted[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(tilted[0])
    write_series(root / "gappy", ct_volume(5, (4, 32, 32)), patient_id="P3", gaps=[2.5, 2.5, 7.0], seed=5)
    (root / "README.txt").write_text("export notes")
    before = _sha(root)
    m = _domain(tmp_path, manifest_paths="relative").scan(root)
    by_path = {q.path: q for q in m.quarantine}
    assert len(m.items) == 6
    assert by_path["bad/truncated.dcm"].reason == "pixel data cannot be decoded (Explicit VR Little Endian)"
    assert by_path["bad/truncated.dcm"].message  # the library's own words
    assert by_path["bad/empty.dcm"].reason == "empty file"
    assert by_path["bad/random.dcm"].reason == "not a DICOM file" and "InvalidDicomError" in by_path["bad/random.dcm"].message
    assert by_path["bad/photo.dcm"].reason == "not a DICOM file"
    assert by_path["bad/nopixels.dcm"].reason == "missing pixel data"
    assert {q.reason for p, q in by_path.items() if p.startswith("tilted/")} == {"inconsistent orientation in series"}
    assert {q.reason for p, q in by_path.items() if p.startswith("gappy/")} == {"inconsistent slice spacing in series"}
    skipped = {q.path: q.reason for q in m.skipped}
    assert "Basic Text SR" in skipped["reports/sr.dcm"] and "README.txt" in skipped
    assert _sha(root) == before and set(bad.values()) <= {Path(p) for p in before}


def test_scan_is_resumable_and_arrays_cached(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_series(root / "a", ct_volume(6))
    d = _domain(tmp_path)
    m = d.scan(root)
    d.load(m.items[0], m)
    calls = []
    import insitu.domains.dicom.domain as dicom_mod

    monkeypatch.setattr(dicom_mod, "read_record", lambda *a: calls.append(a) or {})
    write_series(root / "b", ct_volume(7), patient_id="P9", seed=9)
    monkeypatch.undo()
    d2 = _domain(tmp_path)
    m2 = d2.scan(root)
    assert len(m2.items) == 12 and calls == []
    records = list((tmp_path / "cache" / "records").glob("*.json"))
    assert len(records) == 12
    # a fresh reader loads the first series from the array cache without opening a DICOM file
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
    item = next(i for i in m2.items if i.extra["unit"] == m.items[0].extra["unit"])
    assert d2.load(item, m2)["image"].shape == (1, 32, 32)


def test_reslice_planes_and_square_pixels(tmp_path):
    vol = ct_volume(8, (6, 32, 40))
    write_series(tmp_path / "data" / "s", vol)
    for plane, n, shape in (("axial", 6, (32, 40)), ("coronal", 32, (19, 40)), ("sagittal", 40, (19, 32))):
        d = _domain(tmp_path, plane=plane)
        m = d.scan(tmp_path / "data")
        assert len(m.items) == n, plane
        img = d.load(m.items[n // 2], m)["image"]
        assert tuple(img.shape[1:]) == shape, plane  # 6 slices of 2.5 mm resampled to 0.8 mm pixels: 19 rows
    d = _domain(tmp_path, plane="coronal")
    m = d.scan(tmp_path / "data")
    img = d.load(m.items[16], m)["image"][0]
    # coronal view: superior at the top, so the last acquired (highest z) slice is the first row
    np.testing.assert_allclose(img[0, 0].item(), vol[-1, 16, 0], atol=1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reslice_matches_monai_orientation_for_every_axis_aligned_direction():
    """insitu reslices with array views (O(slice) per item); MONAI's Orientation is the reference."""
    import itertools

    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from insitu.domains.dicom.geometry import Volume, reslice

    codes = {"axial": "SPL", "coronal": "PIL", "sagittal": "LIP"}  # slice, down, right; radiological view
    rng = np.random.default_rng(0)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            direction[list(perm), [0, 1, 2]] = signs
            vol = Volume(rng.normal(size=(5, 2, 6, 7)).astype(np.float32), direction, (0.7, 0.8, 2.5))
            affine = np.eye(4)
            affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction * np.asarray(vol.spacing)  # LPS -> RAS
            x = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol.array.transpose(1, 3, 2, 0))), affine=torch.as_tensor(affine))
            for plane, axcodes in codes.items():
                expected = torch.as_tensor(Orientation(axcodes=axcodes)(x)).permute(1, 0, 2, 3).numpy()
                np.testing.assert_array_equal(reslice(vol, plane)[0], expected, err_msg=f"{perm} {signs} {plane}")


def test_groups_keep_patients_apart(tmp_path):
    from insitu.domains import split_by_group

    root = tmp_path / "data"
    for p in range(4):
        write_series(root / f"p{p}" / "s1", ct_volume(p, (2, 16, 16)), patient_id=f"PAT{p}", seed=10 * p)
        write_series(root / f"p{p}" / "s2", ct_volume(p, (2, 16, 16)), patient_id=f"PAT{p}", seed=10 * p + 1)
    m = _domain(tmp_path, pool="process").scan(root)  # the process pool gives the same records as threads
    assert len(m.items) == 16 and m.counts()["groups"] == 4
    parts = split_by_group(m.items, {"train": 0.5, "test": 0.5})
    assert not {i.group for i in parts["train"]} & {i.group for i in parts["test"]}


def test_seg_round_trip(tmp_path):
    vol = ct_volume(11, (4, 32, 32))
    files = [str(p) for p in write_series(tmp_path / "data" / "s", vol)]
    d = _domain(tmp_path)
    m = d.scan(tmp_path / "data")
    unit = d.units[m.items[0].extra["unit"]]
    mask = np.zeros((4, 32, 32), np.int64)
    mask[1:3, 10:20, 12:22] = 1
    mask[2, 2:5, 2:5] = 2
    out = write_seg(mask, unit.files, tmp_path / "pred" / "seg.dcm", ["lesion", "marker"])
    np.testing.assert_array_equal(read_seg(str(out), unit.files), mask)
    seg = pydicom.dcmread(out)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    # a SEG inside the tree becomes the mask of its series
    (tmp_path / "data" / "s" / "seg.dcm").write_bytes(out.read_bytes())
    d2 = _domain(tmp_path)
    m2 = d2.scan(tmp_path / "data")
    assert len(m2.items) == 4 and all(i.extra["has_mask"] for i in m2.items)
    s = d2.load(m2.items[2], m2)
    np.testing.assert_array_equal(s["mask"].numpy(), mask[2])
    other = write_series(tmp_path / "other", ct_volume(12, (4, 32, 32)), patient_id="X", seed=3)
    with pytest.raises(DicomError, match="references none"):
        read_seg(str(out), [str(p) for p in other])


def test_empty_root_is_a_typed_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.dcm").write_bytes(b"nope")
    with pytest.raises(EmptyDatasetError, match="No usable DICOM"):
        _domain(tmp_path).scan(tmp_path / "data")


def test_cli_scan_exit_codes(tmp_path, capsys):
    from insitu.cli import main

    root = tmp_path / "data"
    write_series(root / "s", ct_volume(13, (3, 16, 16)))
    (root / "broken.dcm").write_bytes(b"\x00" * 10)
    out = tmp_path / "scan"
    assert main(["scan", str(root), "--domain", "dicom", "--out", str(out), "--option", f"cache_dir={tmp_path / 'c'}"]) == 0
    assert (out / "manifest.csv").read_text().count("\n") == 4
    assert "not a DICOM file" in (out / "quarantine.csv").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.dcm").write_bytes(b"x")
    assert main(["scan", str(empty), "--domain", "dicom", "--out", str(tmp_path / "o2"), "--option", f"cache_dir={tmp_path / 'c'}"]) == 1


def test_demo_class_is_carried_only_by_the_livers_attenuation():
    from insitu.domains.dicom.demo import DEMO_LIVER_HU, demo_volume

    normal = demo_volume(np.random.default_rng(7), 0, 64)
    fatty = demo_volume(np.random.default_rng(7), 1, 64)  # same draws, other class
    diff = normal - fatty
    changed = np.abs(diff) > 1e-3
    # the class moves one region by the difference of the class means and leaves every other voxel alone
    assert 0.03 < changed.mean() < 0.3
    assert np.allclose(diff[changed], DEMO_LIVER_HU[0] - DEMO_LIVER_HU[1], atol=1e-3)
    # the normal liver is above and the fatty liver below the usual steatosis threshold of about 40 HU
    assert np.median(normal[changed]) > 45 and np.median(fatty[changed]) < 35
