"""Demo data: tiny CT phantoms written as real DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_CLASSES = ("sphere", "box")
DEMO_SLICES = 4


def demo_volume(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """HU volume S×H×W: a fatty body in air holding a soft-tissue ball (0) or a bony hollow box (1)."""
    z, y, x = np.mgrid[0:DEMO_SLICES, 0:size, 0:size].astype(np.float32)
    c = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    hu = np.full((DEMO_SLICES, size, size), -1000.0, np.float32)
    body = ((y - size / 2) / (0.45 * size)) ** 2 + ((x - size / 2) / (0.4 * size)) ** 2 < 1
    hu[body] = -100.0
    r = size * rng.uniform(0.12, 0.2)
    if label == 0:
        inside = (y - c[0]) ** 2 + (x - c[1]) ** 2 + ((z - DEMO_SLICES / 2) * 2) ** 2 < r**2
        hu[inside] = 50.0
    else:
        outer = np.maximum(np.abs(y - c[0]), np.abs(x - c[1])) < r
        inner = np.maximum(np.abs(y - c[0]), np.abs(x - c[1])) < r * 0.6
        hu[outer & ~inner] = 500.0
    return hu + rng.normal(0, 15, hu.shape).astype(np.float32)


def write_ct_series(folder: Path, hu: np.ndarray, patient_id: str, seed: int = 0, spacing: float = 1.0, gap: float = 2.0) -> list[Path]:
    """Write an HU volume S×H×W as an axial CT series (uint16 + rescale intercept, the usual scanner form)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"1.2.826.0.1.3680043.10.{seed % 100000}."
    study, series = generate_uid(prefix, [patient_id, "study"]), generate_uid(prefix, [patient_id, "series"])
    paths = []
    for i, plane in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid(prefix, [patient_id, str(i)])
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, study, series
        ds.Modality, ds.InstanceNumber = "CT", len(hu) - i  # deliberately reversed: order comes from positions
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0.0, 0.0, i * gap]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], gap
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.clip(np.round(plane + 1024), 0, 65535).astype(np.uint16).tobytes()
        path = folder / f"IM{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
