"""Medical images: DICOM folder trees (PACS exports, with or without DICOMDIR) and NIfTI volumes.

A scan reads every file once in a worker pool, fully decoding its pixels (a header read passes
truncated files), and caches one small JSON record per file keyed by path, size and mtime, so a
second scan of the same tree only opens new or changed files. Records are grouped into series by
SeriesInstanceUID; slices are ordered by their position along the slice normal. Items are 2-D
slices (in the acquisition plane or resliced axial/coronal/sagittal, optionally with neighbouring
slices as channels) or 3-D crops.

Privacy: item ids and groups are salted hashes (groups hash PatientID, else StudyInstanceUID), and
by default the ``path`` column of manifest.csv / quarantine.csv holds an opaque salted token, because PACS
export folders are often named after patients. The token -> real path map lives only in the private
cache folder (``cache_dir``), which is as sensitive as the source data and never leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from insitu.domains.base import DemoData, Domain, DomainOptions, Manifest, ManifestItem, QuarantineItem, Sample, stable_id
from insitu.errors import DataError, EmptyDatasetError
from insitu.privacy import secret_salt

log = logging.getLogger("insitu")

# HU window presets (centre, width)
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
PLANES = ("acquisition", "axial", "coronal", "sagittal")
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
_SPACING_TOL = 0.02  # relative tolerance on the gap between consecutive slices
_ORIENT_TOL = 1e-3


class DicomError(DataError):
    """A DICOM/NIfTI input cannot be used: bad geometry, a mask that does not fit its image, ..."""


class DicomOptions(DomainOptions):
    """``data.options`` of the dicom domain."""

    sample: Literal["slice", "crop3d"] = "slice"
    plane: Literal["acquisition", "axial", "coronal", "sagittal"] = "acquisition"
    context: int = Field(0, ge=0, description="2.5-D: k neighbouring slices on each side become channels")
    windows: list[str | tuple[float, float]] = Field(default_factory=list, description="CT windows, one channel each; [] keeps HU")
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    normalize: Literal["auto", "none"] = "auto"
    channels: Literal["auto", 1, 3] = "auto"
    crop_size: tuple[int, int, int] = (16, 64, 64)
    crop_spacing: tuple[float, float, float] | None = None
    labels: Literal["none", "folders"] = "none"
    mask_suffix: str = "_seg"
    manifest_paths: Literal["token", "relative"] = "token"
    cache_dir: Path | None = None
    workers: int = Field(4, ge=1)
    pool: Literal["thread", "process"] = "thread"
    salt_env: str = "INSITU_SALT"


@dataclass
class Volume:
    """A decoded unit: ``array`` S×C×H×W in acquisition order plus its patient-space geometry (LPS)."""

    array: np.ndarray
    direction: np.ndarray  # 3×3, columns: direction of +W, +H, +S in LPS
    spacing: tuple[float, float, float]  # (W, H, S) in mm
    positions: list[float] = field(default_factory=list)
    mask: np.ndarray | None = None  # S×H×W int64 when a segmentation is attached


# ----------------------------------------------------------------------------------------------
# per-file records (run in the worker pool; must stay picklable and free of identifying values)


def read_record(path: str, salt: str) -> dict[str, Any]:
    """Open one file, decode its pixels, and return a non-identifying record (or why it failed)."""
    if path.endswith(NIFTI_SUFFIXES):
        from insitu.domains.nifti import nifti_record

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


# ----------------------------------------------------------------------------------------------
# series assembly


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


def _normal(orientation: list[float]) -> np.ndarray:
    o = np.asarray(orientation, dtype=np.float64)
    return np.cross(o[:3], o[3:])


def _along_normal(recs: list[dict[str, Any]]) -> np.ndarray:
    n = _normal(recs[0]["orientation"])
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


# ----------------------------------------------------------------------------------------------
# the domain


class DicomDomain(Domain):
    """DICOM series and NIfTI volumes as 2-D slices, 2.5-D slabs or 3-D crops.

    Options (``data.options``): ``sample`` (slice | crop3d), ``plane`` (acquisition | axial | coronal |
    sagittal), ``context`` (2.5-D neighbours per side), ``windows`` (CT presets or [centre, width]
    pairs, one channel each; empty keeps HU), ``mr_percentiles``, ``normalize`` (auto | none),
    ``channels``, ``crop_size``/``crop_spacing`` (3-D), ``labels`` (none | folders),
    ``mask_suffix`` (NIfTI label maps), ``manifest_paths`` (token | relative), ``cache_dir``,
    ``workers``, ``pool`` (thread | process), ``salt_env``.
    """

    name = "dicom"
    Options = DicomOptions

    def __init__(self, options: dict[str, Any] | DomainOptions | None = None) -> None:
        super().__init__(options)
        self.options: DicomOptions
        self.units: dict[str, Unit] = {}
        self.root: Path | None = None
        self._volumes: dict[str, Volume] = {}
        self._salt = ""  # set by scan: path tokens are salted, so a guessed PACS layout cannot be confirmed

    # -- scanning ------------------------------------------------------------------------------

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        root = Path(root).resolve()
        if not root.exists():
            raise DataError(f"{root} does not exist. Point data.root at a DICOM/NIfTI folder.")
        self.root = root
        cache = self.cache_dir(root)
        self._salt = self.salt(cache)
        files = _list_files(root, cache)
        records = self._records(files, cache)
        items, quarantine, skipped = self._assemble(root, files, records)
        if max_items:
            items = _spread(items, max_items)
        self._write_index(cache, root, files)
        if not items:
            raise EmptyDatasetError(
                f"No usable DICOM or NIfTI image under {root} ({len(quarantine)} quarantined, {len(skipped)} skipped). "
                "Expected DICOM files (any extension) or .nii/.nii.gz volumes; see quarantine.csv for reasons."
            )
        class_names = sorted({_class_dir(root, u.files[0]) for u in self.units.values()}) if self.options.labels == "folders" else []
        return Manifest(self.name, self.display(root), items, quarantine, class_names, skipped)

    def cache_dir(self, root: Path) -> Path:
        """The private cache (records, decoded arrays, the token -> path map, the salt)."""
        base = self.options.cache_dir or Path(os.environ.get("INSITU_CACHE", Path.home() / ".cache" / "insitu")) / "dicom"
        path = Path(base) / stable_id(str(Path(root).resolve())) if self.options.cache_dir is None else Path(base)
        (path / "records").mkdir(parents=True, exist_ok=True)
        return path

    def salt(self, cache: Path) -> str:
        """A secret salt: from the environment (stable across machines) or one kept in the private cache."""
        return secret_salt(cache, self.options.salt_env)

    def _records(self, files: list[str], cache: Path) -> list[dict[str, Any]]:
        """Per-file records, from the cache where path, size and mtime match; the rest in the pool."""
        salt = self.salt(cache)
        keys = [_file_key(f) for f in files]
        records: list[dict[str, Any] | None] = [_read_cached(cache, k) for k in keys]
        todo = [i for i, r in enumerate(records) if r is None]
        pool_cls = ProcessPoolExecutor if self.options.pool == "process" else ThreadPoolExecutor
        if todo:
            with pool_cls(self.options.workers) as pool:
                for i, rec in zip(todo, pool.map(read_record, [files[i] for i in todo], [salt] * len(todo)), strict=True):
                    records[i] = rec
                    _write_json(cache / "records" / f"{keys[i]}.json", {**rec, "version": RECORD_VERSION})
        log.info("dicom scan: %d files, %d decoded now, %d from cache", len(files), len(todo), len(files) - len(todo))
        return [r for r in records if r is not None]

    def _assemble(self, root: Path, files: list[str], records: list[dict[str, Any]]) -> tuple[list[ManifestItem], list, list]:
        quarantine, skipped, ok_files, ok_recs = [], [], [], []
        _mark_label_maps(files, records, self.options.mask_suffix)
        for f, rec in zip(files, records, strict=True):
            if rec["status"] == "quarantined":
                quarantine.append(QuarantineItem(self.display(f), rec["reason"], self.scrub(rec.get("message", ""), f)))
            elif rec["status"] == "skipped":
                skipped.append(QuarantineItem(self.display(f), rec["reason"], rec.get("message", "")))
            else:
                ok_files.append(f)
                ok_recs.append(rec)
        images = [(f, r) for f, r in zip(ok_files, ok_recs, strict=True) if r["kind"] != "seg" and not r.get("mask_of")]
        units, bad = series_units([f for f, _ in images], [r for _, r in images])
        quarantine += [QuarantineItem(self.display(f), reason, msg) for f, reason, msg in bad]
        self.units = {u.key: u for u in units}
        skipped += self._attach_masks(ok_files, ok_recs, quarantine)
        if self.options.labels == "folders":
            names = sorted({_class_dir(root, u.files[0]) for u in units})
            for u in units:
                u.label = names.index(_class_dir(root, u.files[0]))
        items = [item for u in units for item in self._unit_items(u)]
        return items, quarantine, skipped

    def _attach_masks(self, files: list[str], recs: list[dict[str, Any]], quarantine: list[QuarantineItem]) -> list[QuarantineItem]:
        """DICOM-SEG objects and NIfTI label maps become the mask of the unit they describe."""
        by_series = {u.records[0]["series"]: u for u in self.units.values() if not u.stack}
        by_file = {u.files[0]: u for u in self.units.values()}
        skipped = []
        for f, rec in zip(files, recs, strict=True):
            if rec.get("mask_of"):
                unit = by_file.get(rec["mask_of"])
                problem = _nifti_mask_problem(unit, rec) if unit else "no image volume next to it"
                if problem:
                    quarantine.append(
                        QuarantineItem(self.display(f), "label map does not fit its image", f"{problem} ({self.display(rec['mask_of'])})")
                    )
                else:
                    unit.seg = f
            elif rec["kind"] == "seg":
                unit = by_series.get(rec.get("ref_series", ""))
                if unit is None:
                    skipped.append(QuarantineItem(self.display(f), "segmentation whose source series is not under root", rec["sop_class"]))
                else:
                    unit.seg = f
        return skipped

    def _unit_items(self, unit: Unit) -> list[ManifestItem]:
        extra = {"unit": unit.key, "modality": unit.modality, "has_mask": unit.seg is not None}
        path = self.display(unit.files[0])
        if self.options.sample == "crop3d" and not unit.stack:
            return [ManifestItem(stable_id(unit.key, "crop3d"), path, unit.group, unit.label, None, {**extra, "index": 0})]
        n = self._n_slices(unit)
        plane = "acquisition" if unit.stack else self.options.plane
        return [
            ManifestItem(
                stable_id(unit.key, plane, str(i)), path, unit.group, unit.label, None, {**extra, "index": i, "plane": plane, "n_slices": n}
            )
            for i in range(n)
        ]

    def _n_slices(self, unit: Unit) -> int:
        if unit.stack or self.options.plane == "acquisition":
            return unit.n_slices if not unit.records[0].get("nifti") else unit.records[0]["shape"][0]
        geo = _unit_geometry(unit)
        axis = _plane_axes(geo[0], self.options.plane)[0][0]
        return _unit_shape(unit)[axis]

    def _write_index(self, cache: Path, root: Path, files: list[str]) -> None:
        """The private map: unit key -> files, token -> path (lets a user find a quarantined file)."""
        index = {
            "root": str(root),
            "units": {
                k: {"files": u.files, "seg": u.seg, "group": u.group, "label": u.label, "stack": u.stack} for k, u in self.units.items()
            },
            "tokens": {self.display(f): f for f in files},
        }
        _write_json(cache / "index.json", index)

    def display(self, path: str | Path) -> str:
        """What a manifest shows for a path: an opaque token, or the path relative to root."""
        rel = Path(path).resolve().relative_to(self.root).as_posix() if self.root and Path(path).is_absolute() else str(path)
        return rel if self.options.manifest_paths == "relative" else f"dcm-{stable_id(rel, salt=self._salt)}"

    def scrub(self, message: str, path: str) -> str:
        """Library messages often quote the file path: replace it by its token."""
        for text in (path, str(Path(path).resolve()), Path(path).name):
            message = message.replace(text, self.display(path))
        return message

    # -- loading -------------------------------------------------------------------------------

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        unit = self._unit(item.extra["unit"], manifest)
        vol = self.volume(unit)
        meta = {"domain": self.name, "item_id": item.item_id, "group": item.group, "modality": unit.modality}
        if self.options.sample == "crop3d" and not unit.stack:
            from insitu.domains.nifti import crop3d

            image = crop3d(vol, self.options.crop_size, self.options.crop_spacing)
            sample: Sample = {"image": image, "meta": {**meta, "spacing": self.options.crop_spacing}}
        else:
            image, mask, spacing = self._slice(vol, item.extra["index"], item.extra.get("plane", "acquisition"))
            sample = {"image": image, "meta": {**meta, "spacing": spacing, "plane": item.extra.get("plane"), "index": item.extra["index"]}}
            if mask is not None:
                sample["mask"] = mask
        if item.label is not None:
            sample["label"] = item.label
        return sample

    def _unit(self, key: str, manifest: Manifest) -> Unit:
        if key not in self.units:
            self._load_index(manifest)
        if key not in self.units:
            raise DicomError(f"item unit {key} is not in the scan index; re-run the scan of {manifest.root}.")
        return self.units[key]

    def _load_index(self, manifest: Manifest) -> None:
        """Rebuild units from the private cache index (a manifest read from disk holds no paths)."""
        cache = self.options.cache_dir
        if cache is None or not (Path(cache) / "index.json").exists():
            raise DicomError("This manifest was read from disk: set data.options.cache_dir to the scan's cache folder to load its items.")
        index = json.loads((Path(cache) / "index.json").read_text())
        self.root = Path(index["root"])
        for key, u in index["units"].items():
            recs = [_read_cached(Path(cache), _file_key(f)) or {} for f in u["files"]]
            self.units[key] = Unit(key, u["files"], recs, u["group"], u["stack"], u["seg"], u["label"])

    def volume(self, unit: Unit) -> Volume:
        """The unit's decoded, intensity-converted array: from memory, the array cache, or the files."""
        if unit.key in self._volumes:
            return self._volumes[unit.key]
        cache = self.cache_dir(self.root) if self.root else None
        vol = _read_array_cache(cache, unit, self._array_tag()) if cache else None
        if vol is None:
            vol = self._decode(unit)
            if cache:
                _write_array_cache(cache, unit, self._array_tag(), vol)
        if unit.seg and vol.mask is None:
            vol.mask = self._mask(unit, vol)
        self._volumes = {unit.key: vol}  # keep one volume: consecutive slices of a series hit it
        return vol

    def _array_tag(self) -> str:
        o = self.options
        return stable_id(json.dumps([o.windows, o.mr_percentiles, o.normalize, o.channels], default=str))

    def _decode(self, unit: Unit) -> Volume:
        if unit.records[0].get("nifti"):
            from insitu.domains.nifti import read_nifti

            vol = read_nifti(unit.files[0], unit.records[0])
            vol.array = self._intensity(vol.array, unit.modality if unit.modality != "OT" else "MR", "MONOCHROME2")
            return vol
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut

        slices = []
        for f in unit.files:
            ds = pydicom.dcmread(f)
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
            slices.append(arr)
        array = np.concatenate(slices).transpose(0, 3, 1, 2)  # S×C×H×W
        array = self._intensity(array, unit.modality, unit.records[0]["photometric"])
        direction, spacing, positions = _unit_geometry(unit)
        return Volume(np.ascontiguousarray(array, dtype=np.float32), direction, spacing, positions)

    def _intensity(self, array: np.ndarray, modality: str, photometric: str) -> np.ndarray:
        """HU windows for CT, percentile scaling for MR and other grey modalities, /255 for colour."""
        o = self.options
        if o.normalize == "auto":
            if array.shape[1] == 3 or photometric.startswith(("RGB", "YBR", "PALETTE")):
                array = array / 255.0
            elif modality == "CT" and o.windows:
                array = np.concatenate([_window(array, w) for w in o.windows], axis=1)
            elif modality != "CT":
                lo, hi = np.percentile(array, o.mr_percentiles)
                array = (array - lo) / max(hi - lo, 1e-6)
        if o.channels == 1 and array.shape[1] == 3:
            array = array.mean(1, keepdims=True)
        elif o.channels == 3 and array.shape[1] == 1:
            array = np.repeat(array, 3, axis=1)
        return array.astype(np.float32)

    def _mask(self, unit: Unit, vol: Volume) -> np.ndarray:
        if unit.records[0].get("nifti"):
            from insitu.domains.nifti import read_nifti_mask

            return read_nifti_mask(unit.files[0], unit.seg, vol)
        from insitu.domains.dicom_seg import read_seg

        return read_seg(unit.seg, unit.files, describe=self.display)

    def _slice(self, vol: Volume, index: int, plane: str) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
        """Slice ``index`` along ``plane``, with ``context`` neighbours as channels, square pixels."""
        array, mask, spacing = vol.array, vol.mask, list(vol.spacing)
        if plane != "acquisition":
            (axis, flip_s), h, w = _plane_axes(vol.direction, plane)
            perm = (axis, h[0], w[0])
            array = _orient(array, perm, (flip_s, h[1], w[1]), channel_axis=True)
            mask = _orient(mask, perm, (flip_s, h[1], w[1]), channel_axis=False) if mask is not None else None
            spacing = [vol.spacing[[2, 1, 0][perm[2]]], vol.spacing[[2, 1, 0][perm[1]]], vol.spacing[[2, 1, 0][perm[0]]]]
        k = self.options.context
        idx = np.clip(np.arange(index - k, index + k + 1), 0, array.shape[0] - 1)
        image = torch.from_numpy(np.ascontiguousarray(array[idx])).flatten(0, 1)  # (2k+1)·C × H × W
        m = torch.from_numpy(np.ascontiguousarray(mask[index])).long() if mask is not None else None
        image, m = _square_pixels(image, m, spacing[0], spacing[1])
        return image, m, spacing

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Tiny CT volumes of two phantom classes (sphere vs. hollow box) as real DICOM series."""
        rng = np.random.default_rng(seed)
        n_patients = max(2, n_per_class // DEMO_SLICES)
        for split, n in (("train", n_patients), ("test", max(2, n_patients // 2))):
            for label, name in enumerate(DEMO_CLASSES):
                for p in range(n):
                    hu = _demo_volume(rng, label, size)
                    write_ct_series(
                        out_dir / split / name / f"case{p:03d}", hu, patient_id=f"DEMO-{split}-{name}-{p}", seed=int(rng.integers(1 << 30))
                    )
        options = {"windows": ["lung", "mediastinum", "bone"], "labels": "folders", "cache_dir": str(out_dir / "cache")}
        train = {"domain": "dicom", "root": str(out_dir / "train"), "image_size": size, "options": options}
        test = {"domain": "dicom", "root": str(out_dir / "test"), "image_size": size, "options": options}
        return DemoData(
            data=train,
            probe_train=train,
            probe_test=test,
            in_chans=3,
            description=f"CT phantoms ({' vs '.join(DEMO_CLASSES)}), {DEMO_SLICES}-slice DICOM series at {size} px, 3 HU windows as channels",
        )


DEMO_CLASSES = ("sphere", "box")
DEMO_SLICES = 4


def _demo_volume(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------
# geometry helpers


def _unit_shape(unit: Unit) -> tuple[int, int, int]:
    r = unit.records[0]
    if r.get("nifti"):
        return tuple(r["shape"][:3])
    return (unit.n_slices, r["rows"], r["cols"])


def _unit_geometry(unit: Unit) -> tuple[np.ndarray, tuple[float, float, float], list[float]]:
    """Direction (columns +W, +H, +S in LPS), spacing (W, H, S) and slice positions of a unit."""
    r = unit.records[0]
    if r.get("nifti"):
        return np.asarray(r["direction"]), tuple(r["spacing"]), []
    o = np.asarray(r.get("orientation") or [1, 0, 0, 0, 1, 0], dtype=np.float64)
    direction = np.stack([o[:3], o[3:], _normal(o)], axis=1)
    ps = r.get("pixel_spacing") or [1.0, 1.0]
    positions = [float(np.dot(p, direction[:, 2])) for rec in unit.records for p in rec.get("positions", [])]
    if len(positions) > 1:
        gap = float(np.median(np.abs(np.diff(positions))))
    else:
        gap = r.get("thickness") or 1.0
    return direction, (float(ps[1]), float(ps[0]), gap), positions


# target plane -> (slice axis, H axis with sign, W axis with sign) in LPS (x=L, y=P, z=S), radiological view
_PLANE_LPS = {"axial": (2, (1, 1), (0, 1)), "coronal": (1, (2, -1), (0, 1)), "sagittal": (0, (2, -1), (1, 1))}


def _plane_axes(direction: np.ndarray, plane: str) -> tuple[tuple[int, bool], tuple[int, bool], tuple[int, bool]]:
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


def _orient(array: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool], channel_axis: bool) -> np.ndarray:
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


def _square_pixels(image: torch.Tensor, mask: torch.Tensor | None, sw: float, sh: float) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _window(hu: np.ndarray, window: str | tuple[float, float]) -> np.ndarray:
    if isinstance(window, str):
        if window not in WINDOWS:
            raise DicomError(f"unknown CT window {window!r} in data.options.windows; use one of {sorted(WINDOWS)} or [centre, width].")
        window = WINDOWS[window]
    centre, width = window
    return np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# files and caches


def _list_files(root: Path, cache: Path) -> list[str]:
    """Every regular file under root (DICOM files often have no extension), minus hidden and the cache."""
    if root.is_file():
        return [str(root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != cache.resolve())
        out.extend(str(Path(dirpath, f)) for f in sorted(filenames) if not f.startswith("."))
    return out


def _class_dir(root: Path, path: str) -> str:
    rel = Path(path).resolve().relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{Path(path).resolve()}\x00{st.st_size}\x00{st.st_mtime_ns}".encode()).hexdigest()[:24]


def _read_cached(cache: Path, key: str) -> dict[str, Any] | None:
    path = cache / "records" / f"{key}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a record torn by a killed scan is simply redone
    return rec if rec.get("version") == RECORD_VERSION else None


def _write_json(path: Path, data: Any) -> None:
    """Atomic write: a killed scan leaves either the old file or the new one."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _array_path(cache: Path, unit: Unit, tag: str) -> Path:
    stamp = stable_id(*[_file_key(f) for f in unit.files], unit.seg or "")
    return cache / "arrays" / f"{unit.key}-{stamp}-{tag}.npy"


def _read_array_cache(cache: Path, unit: Unit, tag: str) -> Volume | None:
    path = _array_path(cache, unit, tag)
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        return None
    geo = json.loads(meta.read_text())
    array = np.load(path, mmap_mode="r")  # slices are read on demand, never decoded again
    return Volume(array, np.asarray(geo["direction"]), tuple(geo["spacing"]), geo["positions"])


def _write_array_cache(cache: Path, unit: Unit, tag: str, vol: Volume) -> None:
    path = _array_path(cache, unit, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, vol.array)
    os.replace(tmp, path)
    _write_json(path.with_suffix(".json"), {"direction": vol.direction.tolist(), "spacing": list(vol.spacing), "positions": vol.positions})


def _nifti_mask_problem(unit: Unit, rec: dict[str, Any]) -> str | None:
    img = unit.records[0]
    if list(img["shape"][:3]) != list(rec["shape"][:3]):
        return f"shape {rec['shape'][:3]} != image shape {img['shape'][:3]}"
    if not np.allclose(img["affine"], rec["affine"], atol=1e-3):
        return "affine differs from the image's"
    return None


def _mark_label_maps(files: list[str], records: list[dict[str, Any]], suffix: str) -> None:
    """``x_seg.nii.gz`` is the label map of ``x.nii.gz`` (``suffix`` is ``data.options.mask_suffix``)."""
    for f, rec in zip(files, records, strict=True):
        rec.pop("mask_of", None)
        for ext in NIFTI_SUFFIXES:
            if rec.get("nifti") and f.endswith(suffix + ext):
                rec["mask_of"] = f[: -len(suffix + ext)] + ext


def _spread(values: list[Any], n: int) -> list[Any]:
    if n >= len(values):
        return values
    idx = np.linspace(0, len(values) - 1, n).round().astype(int)
    return [values[i] for i in idx]
