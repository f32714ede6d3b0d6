"""Patient-space geometry: the decoded Volume, reslicing to axial/coronal/sagittal, square pixels.

Why reslicing is not MONAI's ``Orientation`` (which ``nifti.crop3d`` does use): it gives the same
arrays (tests/test_dicom.py checks all 48 axis-aligned directions × 3 planes against it), but it
copies the whole volume on every call, and a 2-D item needs one slice: on a 300×512×512 CT one
coronal slice took 1.5 s through ``Orientation`` and 1.4 ms through the views below. The slice count
per plane is also needed at scan time from the geometry alone (``plane_axes``), before any decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from insitu.domains.dicom.options import DicomError


@dataclass
class Volume:
    """A decoded unit: ``array`` S×C×H×W in acquisition order plus its patient-space geometry (LPS)."""

    array: np.ndarray
    direction: np.ndarray  # 3×3, columns: direction of +W, +H, +S in LPS
    spacing: tuple[float, float, float]  # (W, H, S) in mm
    positions: list[float] = field(default_factory=list)
    mask: np.ndarray | None = None  # S×H×W int64 when a segmentation is attached


def slice_normal(orientation: list[float]) -> np.ndarray:
    """The slice normal (row direction × column direction) of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=np.float64)
    return np.cross(o[:3], o[3:])


def reslice(vol: Volume, plane: str) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    """The volume's array and mask with ``plane`` as the slice axis, and their (W, H, S) spacing."""
    if plane == "acquisition":
        return vol.array, vol.mask, list(vol.spacing)
    (axis, flip_s), h, w = plane_axes(vol.direction, plane)
    perm = (axis, h[0], w[0])
    array = orient(vol.array, perm, (flip_s, h[1], w[1]), channel_axis=True)
    mask = orient(vol.mask, perm, (flip_s, h[1], w[1]), channel_axis=False) if vol.mask is not None else None
    spacing = [vol.spacing[[2, 1, 0][perm[2]]], vol.spacing[[2, 1, 0][perm[1]]], vol.spacing[[2, 1, 0][perm[0]]]]
    return array, mask, spacing


# target plane -> (slice axis, H axis with sign, W axis with sign) in LPS (x=L, y=P, z=S), radiological view
_PLANE_LPS = {"axial": (2, (1, 1), (0, 1)), "coronal": (1, (2, -1), (0, 1)), "sagittal": (0, (2, -1), (1, 1))}


def plane_axes(direction: np.ndarray, plane: str) -> tuple[tuple[int, bool], tuple[int, bool], tuple[int, bool]]:
    """Which array axis (0=S, 1=H, 2=W) becomes slice/H/W for ``plane``, and whether to flip it."""
    voxel_for = {}
    for j, array_axis in ((0, 2), (1, 1), (2, 0)):  # direction columns are W, H, S
        lps = int(np.argmax(np.abs(direction[:, j])))
        voxel_for[lps] = (array_axis, float(np.sign(direction[lps, j])))
    if len(voxel_for) != 3:
        raise DicomError(f"cannot reslice to {plane}: the volume is too oblique (direction {direction.round(2).tolist()}).")
    s_lps, (h_lps, h_sign), (w_lps, w_sign) = _PLANE_LPS[plane]
    s = voxel_for[s_lps]
    h = voxel_for[h_lps]
    w = voxel_for[w_lps]
    return (s[0], s[1] < 0), (h[0], h[1] * h_sign < 0), (w[0], w[1] * w_sign < 0)


def orient(array: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool], channel_axis: bool) -> np.ndarray:
    """Permute S/H/W axes (channel axis 1 stays in place) and flip where asked."""
    if channel_axis:
        out = array.transpose(perm[0] if perm[0] == 0 else perm[0] + 1, 1, *(p if p == 0 else p + 1 for p in perm[1:]))
        axes = (0, 2, 3)
    else:
        out, axes = array.transpose(perm), (0, 1, 2)
    for ax, flip in zip(axes, flips, strict=True):
        if flip:
            out = np.flip(out, ax)
    return out


def square_pixels(image: torch.Tensor, mask: torch.Tensor | None, sw: float, sh: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample in-plane so pixels are square (reslices of thick-slice volumes are anisotropic)."""
    if sw <= 0 or sh <= 0 or abs(sw / sh - 1) < 0.05:
        return image, mask
    h, w = image.shape[-2:]
    fine = min(sw, sh)
    size = (max(1, round(h * sh / fine)), max(1, round(w * sw / fine)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask
