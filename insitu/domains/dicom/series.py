"""Grouping per-file records into units: volume series (ordered along the slice normal), stacks, NIfTI volumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.domains.base import stable_id
from insitu.domains.dicom.geometry import slice_normal
from insitu.domains.dicom.records import NIFTI_SUFFIXES

_SPACING_TOL = 0.02  # relative tolerance on the gap between consecutive slices
_ORIENT_TOL = 1e-3


@dataclass
class Unit:
    """One loadable thing: a volume series, a single image, or a NIfTI volume (+ optional mask)."""

    key: str
    files: list[str]  # real paths: kept in memory and in the private cache only
    records: list[dict[str, Any]]
    group: str
    stack: bool  # True: independent 2-D images (no volume geometry)
    seg: str | None = None
    label: int | None = None

    @property
    def modality(self) -> str:
        return self.records[0].get("modality", "OT")

    @property
    def n_slices(self) -> int:
        return sum(r.get("frames", 1) for r in self.records)


def series_units(files: list[str], records: list[dict[str, Any]]) -> tuple[list[Unit], list[tuple[str, str, str]]]:
    """Group ok image records into units; returns (units, [(file, reason, message)] for bad series)."""
    by_series: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for f, rec in zip(files, records, strict=True):
        key = rec["series"] or stable_id(f)
        if rec.get("frames", 1) > 1 or rec.get("nifti"):
            key = f"{key}-{stable_id(f)}"  # a multi-frame file or a NIfTI volume is its own unit
        by_series.setdefault(key, []).append((f, rec))
    units, bad = [], []
    for key, members in sorted(by_series.items()):
        problem = _series_problem([r for _, r in members])
        if problem:
            bad.extend((f, problem[0], problem[1]) for f, _ in members)
            continue
        units.extend(_make_units(key, members))
    return units, bad


def _series_problem(recs: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why a multi-slice series cannot form a volume (None when it can, or when it is a stack)."""
    with_geometry = [r for r in recs if r.get("orientation") is not None and len(r.get("positions") or []) == 1]
    if len(recs) < 2 or len(with_geometry) < len(recs):
        return None
    orients = np.array([r["orientation"] for r in recs])
    if np.abs(orients - orients[0]).max() > _ORIENT_TOL:
        return "inconsistent orientation in series", f"ImageOrientationPatient varies by {np.abs(orients - orients[0]).max():.4f}"
    if _is_stack(recs):
        return None
    if len({(r["rows"], r["cols"]) for r in recs}) > 1:
        return "inconsistent image size in series", f"sizes {sorted({(r['rows'], r['cols']) for r in recs})}"
    gaps = np.diff(np.sort(_along_normal(recs)))
    if gaps.size and (gaps.max() - gaps.min()) > _SPACING_TOL * max(gaps.mean(), 1e-6):
        return "inconsistent slice spacing in series", f"gaps between slices range {gaps.min():.3f}-{gaps.max():.3f} mm"
    return None


def _is_stack(recs: list[dict[str, Any]]) -> bool:
    """Single images, missing geometry, or repeated positions (mosaics, several echoes): not a volume."""
    if any(r.get("orientation") is None or len(r.get("positions") or []) != 1 for r in recs):
        return True
    pos = _along_normal(recs)
    return len(np.unique(np.round(pos, 3))) != len(recs)


def _along_normal(recs: list[dict[str, Any]]) -> np.ndarray:
    n = slice_normal(recs[0]["orientation"])
    return np.array([float(np.dot(r["positions"][0], n)) for r in recs])


def _make_units(key: str, members: list[tuple[str, dict[str, Any]]]) -> list[Unit]:
    recs = [r for _, r in members]
    if len(members) > 1 and not _is_stack(recs):
        order = np.argsort(_along_normal(recs))  # position along the normal, never InstanceNumber
        ordered = [members[i] for i in order]
        return [Unit(key, [f for f, _ in ordered], [r for _, r in ordered], recs[0]["group"], stack=False)]
    if len(members) == 1:
        f, rec = members[0]
        if rec.get("nifti"):
            return [Unit(key, [f], [rec], rec["group"], stack=False)]
        stack = rec.get("orientation") is None or (rec.get("frames", 1) > 1 and len(rec.get("positions", [])) != rec.get("frames", 1))
        return [Unit(key, [f], [rec], rec["group"], stack=stack or rec.get("frames", 1) == 1)]
    members = sorted(members, key=lambda m: m[1].get("instance", 0))
    return [Unit(f"{key}-{i}", [f], [r], r["group"], stack=True) for i, (f, r) in enumerate(members)]


def unit_shape(unit: Unit) -> tuple[int, int, int]:
    r = unit.records[0]
    if r.get("nifti"):
        return tuple(r["shape"][:3])
    return (unit.n_slices, r["rows"], r["cols"])


def unit_geometry(unit: Unit) -> tuple[np.ndarray, tuple[float, float, float], list[float]]:
    """Direction (columns +W, +H, +S in LPS), spacing (W, H, S) and slice positions of a unit."""
    r = unit.records[0]
    if r.get("nifti"):
        return np.asarray(r["direction"]), tuple(r["spacing"]), []
    o = np.asarray(r.get("orientation") or [1, 0, 0, 0, 1, 0], dtype=np.float64)
    direction = np.stack([o[:3], o[3:], slice_normal(o)], axis=1)
    ps = r.get("pixel_spacing") or [1.0, 1.0]
    positions = [float(np.dot(p, direction[:, 2])) for rec in unit.records for p in rec.get("positions", [])]
    if len(positions) > 1:
        gap = float(np.median(np.abs(np.diff(positions))))
    else:
        gap = r.get("thickness") or 1.0
    return direction, (float(ps[1]), float(ps[0]), gap), positions


def nifti_mask_problem(unit: Unit, rec: dict[str, Any]) -> str | None:
    img = unit.records[0]
    if list(img["shape"][:3]) != list(rec["shape"][:3]):
        return f"shape {rec['shape'][:3]} != image shape {img['shape'][:3]}"
    if not np.allclose(img["affine"], rec["affine"], atol=1e-3):
        return "affine differs from the image's"
    return None


def mark_label_maps(files: list[str], records: list[dict[str, Any]], suffix: str) -> None:
    """``x_seg.nii.gz`` is the label map of ``x.nii.gz`` (``suffix`` is ``data.options.mask_suffix``)."""
    for f, rec in zip(files, records, strict=True):
        rec.pop("mask_of", None)
        for ext in NIFTI_SUFFIXES:
            if rec.get("nifti") and f.endswith(suffix + ext):
                rec["mask_of"] = f[: -len(suffix + ext)] + ext
