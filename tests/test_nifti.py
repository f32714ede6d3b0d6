"""NIfTI volumes and label maps through the dicom domain; 3-D crops through MONAI transforms."""

from __future__ import annotations

import numpy as np
import pytest

from insitu.domains import create_domain
from insitu.domains.dicom import DicomError
from insitu.domains.dicom.nifti import read_nifti_mask
from tests.data.dicom_fixtures import ct_volume, write_nifti, write_series


def _volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(100, 10, (20, 24, 8)).astype(np.float32)  # X × Y × Z
    x[5:15, 6:18, 2:6] += 200
    return x


def test_nifti_volume_slices_and_mask(tmp_path):
    root = tmp_path / "sub-01"
    vol = _volume(0)
    write_nifti(root / "t1.nii.gz", vol)
    labels = (vol > 200).astype(np.int16)
    write_nifti(root / "t1_seg.nii.gz", labels)
    d = create_domain("dicom", {"cache_dir": str(tmp_path / "c")})
    m = d.scan(tmp_path)
    assert len(m.items) == 8 and all(i.extra["has_mask"] for i in m.items)  # 8 axial slices, mask not an item
    s = d.load(m.items[3], m)
    assert s["image"].shape == (1, 24, 20)  # H = y, W = x
    np.testing.assert_array_equal(s["mask"].numpy(), labels[:, :, 3].T)
    d2 = create_domain("dicom", {"cache_dir": str(tmp_path / "c"), "plane": "sagittal"})
    assert len(d2.scan(tmp_path).items) == 20


def test_nifti_mask_geometry_mismatch_names_both_files(tmp_path):
    write_nifti(tmp_path / "a" / "ct.nii.gz", _volume(1))
    write_nifti(tmp_path / "a" / "ct_seg.nii.gz", np.zeros((20, 24, 7), np.int16))
    m = create_domain("dicom", {"cache_dir": str(tmp_path / "c"), "manifest_paths": "relative"}).scan(tmp_path)
    q = {x.path: x for x in m.quarantine}
    assert q["a/ct_seg.nii.gz"].reason == "label map does not fit its image" and "a/ct.nii.gz" in q["a/ct_seg.nii.gz"].message
    with pytest.raises(DicomError, match="ct_seg.nii.gz does not fit image .*ct.nii.gz"):
        read_nifti_mask(str(tmp_path / "a" / "ct.nii.gz"), str(tmp_path / "a" / "ct_seg.nii.gz"), None)


def test_crop3d_resamples_with_monai(tmp_path):
    write_series(tmp_path / "data" / "s", ct_volume(0, (6, 32, 32)))
    write_nifti(tmp_path / "data" / "n" / "v.nii", _volume(2))
    d = create_domain(
        "dicom", {"cache_dir": str(tmp_path / "c"), "sample": "crop3d", "crop_size": [8, 16, 16], "crop_spacing": [1.0, 1.0, 1.0]}
    )
    m = d.scan(tmp_path / "data")
    assert len(m.items) == 2
    for item in m.items:
        img = d.load(item, m)["image"]
        assert tuple(img.shape) == (8, 1, 16, 16) and np.isfinite(img.numpy()).all()
