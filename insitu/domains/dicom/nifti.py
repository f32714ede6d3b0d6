"""NIfTI volumes and label maps (nibabel), and 3-D crops with MONAI spacing/orientation transforms.

Volumes are brought to the closest canonical (RAS+) orientation and stored like DICOM volumes:
an S×C×H×W array (S = z, H = y, W = x) with its direction in LPS, so the slicing code is shared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from insitu.domains.base import stable_id
from insitu.domains.dicom.geometry import Volume
from insitu.domains.dicom.options import DicomError

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_record(path: str, salt: str) -> dict[str, Any]:
    """Header + full decode of a .nii/.nii.gz (a header read passes truncated files)."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - every reader failure is a quarantine reason
        return {"status": "quarantined", "reason": "cannot read NIfTI volume", "message": f"{type(exc).__name__}: {exc}"[:500]}
    if data.ndim < 3:
        return {"status": "quarantined", "reason": "NIfTI is not a volume", "message": f"shape {list(data.shape)}"}
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return {
        "status": "ok",
        "kind": "image",
        "nifti": True,
        "series": "",
        "group": stable_id("nifti", str(_parent_key(path)), salt=salt),
        "modality": "MR",
        "photometric": "MONOCHROME2",
        "shape": [int(data.shape[2]), int(data.shape[1]), int(data.shape[0])],  # S, H, W
        "frames": int(data.shape[2]),
        "affine": img.affine.tolist(),
        "direction": (_RAS_TO_LPS @ (img.affine[:3, :3] / np.asarray(zooms))).tolist(),
        "spacing": zooms,
        "finite": bool(np.isfinite(data).all()),
    }


def _parent_key(path: str) -> str:
    """Group NIfTI files by their folder (a subject folder in BIDS-like trees)."""
    from pathlib import Path

    return str(Path(path).resolve().parent)


def _canonical(path: str) -> np.ndarray:
    import nibabel as nib

    data = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    if data.ndim > 3:
        data = data.reshape(*data.shape[:3], -1)[..., 0]  # first volume of a 4-D series
    return data


def read_nifti(path: str, record: dict[str, Any]) -> Volume:
    """A NIfTI image as a `Volume` (S×1×H×W float32 in RAS-canonical voxel order)."""
    data = _canonical(path).astype(np.float32)
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)[:, None]), np.asarray(record["direction"]), tuple(record["spacing"]), [])


def read_nifti_mask(image_path: str, mask_path: str, vol: Volume) -> np.ndarray:
    """A label map aligned to its image (S×H×W int64); a geometry mismatch names both files."""
    import nibabel as nib

    img, seg = nib.as_closest_canonical(nib.load(image_path)), nib.as_closest_canonical(nib.load(mask_path))
    if img.shape[:3] != seg.shape[:3] or not np.allclose(img.affine, seg.affine, atol=1e-3):
        raise DicomError(
            f"label map {mask_path} does not fit image {image_path}: shape {seg.shape[:3]} vs {img.shape[:3]}, "
            "affines differ. Resample the label map onto the image grid."
        )
    data = np.asarray(seg.dataobj)
    if data.ndim > 3:
        data = data[..., 0]
    return np.ascontiguousarray(np.rint(data).astype(np.int64).transpose(2, 1, 0))


def crop3d(vol: Any, size: tuple[int, int, int], spacing: tuple[float, float, float] | None) -> torch.Tensor:
    """A random 3-D crop, resampled to ``spacing`` (mm) in RAS orientation: D×C×H×W (D plays T)."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, RandSpatialCrop, ResizeWithPadOrCrop, Spacing, SpatialPad

    array = np.asarray(vol.array, dtype=np.float32).transpose(1, 3, 2, 0)  # C × W × H × S (x, y, z voxel order)
    affine = np.eye(4)
    affine[:3, :3] = (_RAS_TO_LPS @ vol.direction) * np.asarray(vol.spacing)
    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.as_tensor(affine))
    x = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)  # MONAI's default today, stated
    if spacing is not None:
        x = Spacing(pixdim=spacing, mode="bilinear")(x)
    d, h, w = size
    x = SpatialPad((w, h, d))(x)
    x = RandSpatialCrop((w, h, d), random_size=False)(x)
    x = ResizeWithPadOrCrop((w, h, d))(x)
    return torch.as_tensor(x).permute(3, 0, 2, 1).contiguous().float()  # D × C × H × W
