"""Seeded writers of tiny real DICOM series, broken DICOM files and NIfTI volumes for the tests.

Written with pydicom/nibabel directly (not with insitu's own writer), so the reader is checked
against files it did not produce.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# Values placed in PS3.15 Basic Profile attributes; none may reach any insitu output.
SENTINELS = {
    "PatientName": "SENTINELNAME^ZORBA",
    "PatientID": "SENTINELPID4711",
    "PatientBirthDate": "19230417",
    "StudyDate": "19870219",
    "SeriesDate": "19870219",
    "AccessionNumber": "SENTACC0815",
    "InstitutionName": "SENTINEL GENERAL HOSPITAL",
    "InstitutionAddress": "1 SENTINEL WAY",
    "ReferringPhysicianName": "SENTINELDOC^QUUX",
    "OperatorsName": "SENTINELOPS^FRED",
    "StudyDescription": "SENTINEL STUDY DESCRIPTION",
    "SeriesDescription": "SENTINEL SERIES DESCRIPTION",
    "ImageComments": "SENTINEL FREE TEXT COMMENT",
    "StationName": "SENTSTATION9",
    "StudyID": "SENTSTUDY7",
    "DeviceSerialNumber": "SENTSERIAL31337",
}
SENTINEL_UID_ROOT = "1.2.826.0.1.3680043.10.99887766"
SENTINEL_PRIVATE = "SENTINEL PRIVATE VALUE"
SENTINEL_NESTED = "SENTINEL NESTED VALUE"


def ct_volume(seed: int = 0, shape: tuple[int, int, int] = (6, 32, 32)) -> np.ndarray:
    """HU volume with air (-1000) outside a soft-tissue (40 HU) disc and a bright bone spot."""
    rng = np.random.default_rng(seed)
    s, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    vol = np.full(shape, -1000, np.int16)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.35 * min(h, w)) ** 2
    vol[:, disc] = 40
    for z in range(s):
        vol[z, h // 2 - 2 : h // 2 + 2, (z * 3) % w] = 700  # moves with z: makes slice order visible
    return vol + rng.integers(-5, 6, shape).astype(np.int16)


def write_series(
    folder: Path,
    volume: np.ndarray,
    patient_id: str = "P1",
    modality: str = "CT",
    transfer_syntax: str = ExplicitVRLittleEndian,
    orientation: list[float] | None = None,
    gaps: list[float] | None = None,
    sentinels: bool = False,
    photometric: str = "MONOCHROME2",
    seed: int = 0,
) -> list[Path]:
    """Write S×H×W int16 values as a series (stored = value + 1024 with intercept -1024).

    InstanceNumber runs opposite to position and file names are shuffled, so a reader that orders
    by either gets the volume wrong. ``gaps`` gives the z-spacing between consecutive slices.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    orientation = orientation or [1, 0, 0, 0, 1, 0]
    gaps = gaps or [2.5] * (len(volume) - 1)
    z = np.concatenate([[0.0], np.cumsum(gaps)])
    uid_root = (SENTINEL_UID_ROOT if sentinels else "1.2.826.0.1.3680043.10.5") + f".{seed}."
    study, series = generate_uid(uid_root, [patient_id, "st"]), generate_uid(uid_root, [patient_id, "se", str(orientation)])
    names = rng.permutation(len(volume))
    paths = []
    for i, plane in enumerate(volume):
        ds = _image_dataset(plane, modality, photometric, uid_root + f"{i + 1}.{seed}")
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, study, series
        ds.InstanceNumber = len(volume) - i
        ds.ImageOrientationPatient = orientation
        normal = np.cross(orientation[:3], orientation[3:])
        ds.ImagePositionPatient = [float(v) for v in (-20.0, -20.0, 0.0) + normal * z[i]]
        if sentinels:
            _add_sentinels(ds)
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / f"{names[i]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _image_dataset(plane: np.ndarray, modality: str, photometric: str, sop_uid: str) -> Dataset:
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid, modality
    # type-2 attributes a SEG copies from its source: present but empty unless sentinels are added
    for key in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyID",
    ):
        setattr(ds, key, "")
    ds.SeriesNumber, ds.FrameOfReferenceUID = 1, sop_uid.rsplit(".", 2)[0] + ".0"
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
    ds.Rows, ds.Columns = plane.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (plane.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
    return ds


def _add_sentinels(ds: Dataset) -> None:
    for key, value in SENTINELS.items():
        setattr(ds, key, value)
    ds.FrameOfReferenceUID = SENTINEL_UID_ROOT + ".5"
    block = ds.private_block(0x0011, "SENTINEL CREATOR", create=True)
    block.add_new(0x01, "LO", SENTINEL_PRIVATE)
    nested = Dataset()
    nested.RequestedProcedureDescription = SENTINEL_NESTED
    nested.RequestedProcedureID = "SENTREQ42"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = SENTINEL_UID_ROOT + ".77"
    inner.ReferencedSOPClassUID = CTImageStorage
    nested.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([nested])


def write_bad_files(folder: Path, good_series: Path) -> dict[str, Path]:
    """One file per kind of bad input, next to a good series (returns name -> path)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = sorted(good_series.glob("*.dcm"))[0]
    raw = good.read_bytes()
    out = {
        "truncated": folder / "truncated.dcm",
        "empty": folder / "empty.dcm",
        "random": folder / "random.dcm",
        "jpeg": folder / "photo.dcm",
        "nopixels": folder / "nopixels.dcm",
    }
    out["truncated"].write_bytes(raw[: len(raw) - 700])
    out["empty"].write_bytes(b"")
    out["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    out["jpeg"].write_bytes(buf.getvalue())
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(out["nopixels"])
    return out


def write_sr(path: Path) -> Path:
    """A minimal Basic Text SR (a non-image object): must be listed as skipped, not an error."""
    from pydicom.uid import BasicTextSRStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID, "SR"
    ds.PatientID, ds.SeriesInstanceUID = "P1", generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> Path:
    """An X×Y×Z NIfTI with a diagonal affine."""
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path
