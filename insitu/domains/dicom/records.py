"""Per-file records: open one file, decode its pixels, keep only non-identifying metadata.

Records are made in the worker pool, so they must stay picklable and free of identifying values:
UIDs and patient ids are kept only as salted hashes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from insitu.domains.base import stable_id
from insitu.domains.dicom.nifti import nifti_record

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# files with these extensions that are not DICOM are skipped, not quarantined (".dcm" or none: quarantined)
OTHER_SUFFIXES = {
    ".txt",
    ".md",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".json",
    ".csv",
    ".xml",
    ".npz",
    ".npy",
    ".pdf",
    ".zip",
    ".icc",
    ".dump",
    ".html",
}
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RECORD_VERSION = 2


def read_record(path: str, salt: str) -> dict[str, Any]:
    """Open one file, decode its pixels, and return a non-identifying record (or why it failed)."""
    if path.endswith(NIFTI_SUFFIXES):
        return nifti_record(path, salt)
    import pydicom
    from pydicom.errors import InvalidDicomError

    if os.path.getsize(path) == 0:
        return {"status": "quarantined", "reason": "empty file", "message": "0 bytes"}
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        if Path(path).suffix.lower() in OTHER_SUFFIXES:  # a README or a PNG beside the series
            return {"status": "skipped", "reason": f"not DICOM ({Path(path).suffix.lower()} file)", "message": ""}
        return {"status": "quarantined", "reason": "not a DICOM file", "message": _msg(exc)}
    except Exception as exc:  # noqa: BLE001 - every reader failure is a quarantine reason
        return {"status": "quarantined", "reason": "unreadable DICOM header", "message": _msg(exc)}
    return _dataset_record(ds, salt)


def _dataset_record(ds: Any, salt: str) -> dict[str, Any]:
    meta = getattr(ds, "file_meta", None) or {}
    sop_uid = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    sop = str(sop_uid or "")
    sop_name = getattr(sop_uid, "name", sop) or "unknown SOP class"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "Image Storage" in sop_name and "Directory" not in sop_name:
            return {"status": "quarantined", "reason": "missing pixel data", "message": f"{sop_name} object has no PixelData element"}
        return {"status": "skipped", "reason": f"no pixel data ({sop_name})", "message": sop}
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        frames = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        return _decode_failure(ts, exc)
    rec = _geometry(ds)
    rec.update(_identity(ds, salt))
    rec.update(
        status="ok",
        sop_class=sop,
        kind="seg" if sop == SEG_SOP_CLASS else "image",
        transfer_syntax=getattr(ts, "name", str(ts)),
        modality=str(ds.get("Modality", "OT")),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        instance=int(ds.get("InstanceNumber", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1)),
        finite=bool(np.isfinite(np.asarray(frames, dtype=np.float64)).all()),
    )
    if rec["kind"] == "seg":
        refs = ds.get("ReferencedSeriesSequence") or []
        rec["ref_series"] = _h("series", str(refs[0].SeriesInstanceUID), salt) if refs else ""
    return rec


def _decode_failure(ts: Any, exc: Exception) -> dict[str, Any]:
    """Name the missing codec and the package to install, or pass the decoder's message on."""
    from pydicom.pixels import get_decoder

    name = getattr(ts, "name", str(ts))
    try:
        decoder = get_decoder(ts)
        missing = [] if decoder.is_available else decoder.missing_dependencies
    except Exception:  # noqa: BLE001 - unknown transfer syntax: no decoder at all
        missing = ["(no pydicom decoder exists for this transfer syntax)"]
    if missing:
        return {"status": "quarantined", "reason": f"no codec for {name}: install {'; '.join(missing)}", "message": _msg(exc)}
    return {"status": "quarantined", "reason": f"pixel data cannot be decoded ({name})", "message": _msg(exc)}


def _geometry(ds: Any) -> dict[str, Any]:
    """Orientation, per-frame positions and spacing (frame-level for enhanced multi-frame objects)."""
    orient = ds.get("ImageOrientationPatient")
    pos = ds.get("ImagePositionPatient")
    spacing = ds.get("PixelSpacing")
    positions: list[list[float]] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        for item in per_frame:
            plane = item.get("PlanePositionSequence")
            if plane:
                positions.append([float(v) for v in plane[0].ImagePositionPatient])
        for group in [shared[0]] if shared else []:
            if orient is None and group.get("PlaneOrientationSequence"):
                orient = group.PlaneOrientationSequence[0].ImageOrientationPatient
            if spacing is None and group.get("PixelMeasuresSequence"):
                spacing = group.PixelMeasuresSequence[0].get("PixelSpacing")
    if pos is not None and not positions:
        positions = [[float(v) for v in pos]]
    return {
        "orientation": [float(v) for v in orient] if orient is not None else None,
        "positions": positions,
        "pixel_spacing": [float(v) for v in spacing] if spacing else None,
        "thickness": float(ds.get("SliceThickness") or 0) or None,
    }


def _identity(ds: Any, salt: str) -> dict[str, Any]:
    """Salted hashes of the identifying UIDs; the raw values never leave this function."""
    patient = str(ds.get("PatientID", "") or "")
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    return {
        "group": _h("patient", patient, salt) if patient else _h("study", study, salt),
        "series": _h("series", series, salt) if series else "",
    }


def _h(*parts: str) -> str:
    *values, salt = parts
    return stable_id(*values, salt=salt)


def _msg(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
