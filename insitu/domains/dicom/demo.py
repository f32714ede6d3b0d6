"""Demo data: tiny CT phantoms written as real DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_CLASSES = ("normal", "fatty")
DEMO_SLICES = 4
DEMO_LIVER_HU = (65.0, 20.0)  # mean liver attenuation per class; hepatic steatosis is read below about 40 HU
# SimCLR views that keep what CT measures: no intensity jitter (a view must keep its HU) and crops of at
# least 70 % of the slice (a view keeps the organ). With the image demo's views (intensity 0.6, crops
# down to 30 %) adaptation lost 4-8 points on this demo (docs/results/quickstart.md).
DEMO_VIEWS = {"intensity": 0.0, "global_scale": [0.7, 1.0]}


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 < 1


def demo_volume(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """HU volume S×H×W of an abdominal slab: body, fat, muscle, a liver of normal (0) or fatty (1) attenuation.

    Only the liver's mean attenuation carries the class; everything else (body and liver shape, a spleen,
    vessels, an incidental cyst, a per-scan calibration offset, noise) is drawn independently of it."""
    z, y, x = np.mgrid[0:DEMO_SLICES, 0:size, 0:size].astype(np.float32)
    s = float(size)
    hu = np.full((DEMO_SLICES, size, size), -1000.0, np.float32)
    by, bx = s * rng.uniform(0.36, 0.46), s * rng.uniform(0.38, 0.47)
    hu[_ellipse(y, x, s / 2, s / 2, by, bx, 0.0)] = -100.0  # subcutaneous fat
    hu[_ellipse(y, x, s / 2, s / 2, by - s * rng.uniform(0.04, 0.08), bx - s * rng.uniform(0.04, 0.08), 0.0)] = 45.0  # muscle, bowel
    cy, cx = s / 2 + s * rng.uniform(-0.08, 0.08), s / 2 - s * rng.uniform(0.08, 0.16)  # the patient's right: image left
    liver = _ellipse(y, x, cy, cx, s * rng.uniform(0.16, 0.26), s * rng.uniform(0.14, 0.22), rng.uniform(0, np.pi))
    hu[liver] = DEMO_LIVER_HU[label] + rng.normal(0, 6)
    spleen = _ellipse(y, x, s / 2 + s * rng.uniform(-0.1, 0.1), s / 2 + s * 0.2, s * 0.08, s * 0.06, rng.uniform(0, np.pi))
    hu[spleen] = 50.0
    for _ in range(int(rng.integers(1, 4))):  # contrast-filled vessels crossing the liver
        a, off = rng.uniform(0, np.pi), rng.uniform(-0.1, 0.1) * s
        line = np.abs((x - cx) * np.sin(a) - (y - cy) * np.cos(a) - off) < rng.uniform(0.6, 1.4)
        hu[line & liver] = 160.0
    if rng.random() < 0.5:  # an incidental cyst, in either class
        r = s * rng.uniform(0.03, 0.06)
        dy, dx = cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4)
        hu[((y - dy) ** 2 + (x - dx) ** 2 + ((z - DEMO_SLICES / 2) * 2) ** 2 < r**2) & liver] = 5.0
    hu[hu > -1000] += rng.normal(0, 6)  # scanner calibration differs per scan
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
