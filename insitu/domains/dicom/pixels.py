"""Decoding a unit's pixels and converting intensities: HU windows for CT, percentiles for MR, /255 for colour."""

from __future__ import annotations

import numpy as np

from insitu.domains.dicom.geometry import Volume
from insitu.domains.dicom.nifti import read_nifti
from insitu.domains.dicom.options import WINDOWS, DicomError, DicomOptions
from insitu.domains.dicom.series import Unit, unit_geometry


def decode_unit(unit: Unit, options: DicomOptions) -> Volume:
    """The unit's files decoded to an intensity-converted S×C×H×W float32 volume with its geometry."""
    if unit.records[0].get("nifti"):
        vol = read_nifti(unit.files[0], unit.records[0])
        vol.array = to_intensity(vol.array, unit.modality if unit.modality != "OT" else "MR", "MONOCHROME2", options)
        return vol
    slices = [_decode_file(f) for f in unit.files]
    array = np.concatenate(slices).transpose(0, 3, 1, 2)  # S×C×H×W
    array = to_intensity(array, unit.modality, unit.records[0]["photometric"], options)
    direction, spacing, positions = unit_geometry(unit)
    return Volume(np.ascontiguousarray(array, dtype=np.float32), direction, spacing, positions)


def _decode_file(path: str) -> np.ndarray:
    """One DICOM file as float32 frames×H×W×samples, through its modality or colour LUT."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = apply_modality_lut(arr, ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = np.asarray(arr, dtype=np.float32).reshape((frames, int(ds.Rows), int(ds.Columns), -1))
    if photometric == "MONOCHROME1":  # stored inverted: high values are dark
        arr = arr.max() + arr.min() - arr
    return arr


def to_intensity(array: np.ndarray, modality: str, photometric: str, options: DicomOptions) -> np.ndarray:
    """HU windows for CT, percentile scaling for MR and other grey modalities, /255 for colour."""
    o = options
    if o.normalize == "auto":
        if array.shape[1] == 3 or photometric.startswith(("RGB", "YBR", "PALETTE")):
            array = array / 255.0
        elif modality == "CT" and o.windows:
            array = np.concatenate([apply_window(array, w) for w in o.windows], axis=1)
        elif modality != "CT":
            lo, hi = np.percentile(array, o.mr_percentiles)
            array = (array - lo) / max(hi - lo, 1e-6)
    if o.channels == 1 and array.shape[1] == 3:
        array = array.mean(1, keepdims=True)
    elif o.channels == 3 and array.shape[1] == 1:
        array = np.repeat(array, 3, axis=1)
    return array.astype(np.float32)


def apply_window(hu: np.ndarray, window: str | tuple[float, float]) -> np.ndarray:
    """HU mapped to [0, 1] through a named preset or a (centre, width) window."""
    if isinstance(window, str):
        if window not in WINDOWS:
            raise DicomError(f"unknown CT window {window!r} in data.options.windows; use one of {sorted(WINDOWS)} or [centre, width].")
        window = WINDOWS[window]
    centre, width = window
    return np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)
