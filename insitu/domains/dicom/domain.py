"""The dicom domain: scanning a DICOM/NIfTI tree into units and items, and loading slices or 3-D crops."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from insitu.domains.base import DemoData, Domain, DomainOptions, Manifest, ManifestItem, Predictor, QuarantineItem, Sample, stable_id
from insitu.domains.dicom.cache import (
    class_dir,
    file_key,
    list_files,
    read_array_cache,
    read_cached_record,
    write_array_cache,
    write_json,
)
from insitu.domains.dicom.demo import DEMO_CLASSES, DEMO_LIVER_HU, DEMO_SLICES, DEMO_VIEWS, demo_volume, write_ct_series
from insitu.domains.dicom.geometry import Volume, plane_axes, reslice, square_pixels
from insitu.domains.dicom.nifti import crop3d, read_nifti_mask
from insitu.domains.dicom.options import DicomError, DicomOptions
from insitu.domains.dicom.pixels import decode_unit
from insitu.domains.dicom.records import RECORD_VERSION, read_record
from insitu.domains.dicom.seg import read_seg, write_series_predictions
from insitu.domains.dicom.series import Unit, mark_label_maps, nifti_mask_problem, series_units, unit_geometry, unit_shape
from insitu.errors import DataError, EmptyDatasetError
from insitu.privacy import secret_salt
from insitu.registry import DOMAINS

log = logging.getLogger("insitu")


@DOMAINS.register("dicom")
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
        files = list_files(root, cache)
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
        class_names = sorted({class_dir(root, u.files[0]) for u in self.units.values()}) if self.options.labels == "folders" else []
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
        keys = [file_key(f) for f in files]
        records: list[dict[str, Any] | None] = [read_cached_record(cache, k) for k in keys]
        todo = [i for i, r in enumerate(records) if r is None]
        pool_cls = ProcessPoolExecutor if self.options.pool == "process" else ThreadPoolExecutor
        if todo:
            with pool_cls(self.options.workers) as pool:
                for i, rec in zip(todo, pool.map(read_record, [files[i] for i in todo], [salt] * len(todo)), strict=True):
                    records[i] = rec
                    write_json(cache / "records" / f"{keys[i]}.json", {**rec, "version": RECORD_VERSION})
        log.info("dicom scan: %d files, %d decoded now, %d from cache", len(files), len(todo), len(files) - len(todo))
        return [r for r in records if r is not None]

    def _assemble(self, root: Path, files: list[str], records: list[dict[str, Any]]) -> tuple[list[ManifestItem], list, list]:
        quarantine, skipped, ok_files, ok_recs = [], [], [], []
        mark_label_maps(files, records, self.options.mask_suffix)
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
            names = sorted({class_dir(root, u.files[0]) for u in units})
            for u in units:
                u.label = names.index(class_dir(root, u.files[0]))
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
                problem = nifti_mask_problem(unit, rec) if unit else "no image volume next to it"
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
        geo = unit_geometry(unit)
        axis = plane_axes(geo[0], self.options.plane)[0][0]
        return unit_shape(unit)[axis]

    def _write_index(self, cache: Path, root: Path, files: list[str]) -> None:
        """The private map: unit key -> files, token -> path (lets a user find a quarantined file)."""
        index = {
            "root": str(root),
            "units": {
                k: {"files": u.files, "seg": u.seg, "group": u.group, "label": u.label, "stack": u.stack} for k, u in self.units.items()
            },
            "tokens": {self.display(f): f for f in files},
        }
        write_json(cache / "index.json", index)

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
            recs = [read_cached_record(Path(cache), file_key(f)) or {} for f in u["files"]]
            self.units[key] = Unit(key, u["files"], recs, u["group"], u["stack"], u["seg"], u["label"])

    def volume(self, unit: Unit) -> Volume:
        """The unit's decoded, intensity-converted array: from memory, the array cache, or the files."""
        if unit.key in self._volumes:
            return self._volumes[unit.key]
        cache = self.cache_dir(self.root) if self.root else None
        vol = read_array_cache(cache, unit, self._array_tag()) if cache else None
        if vol is None:
            vol = decode_unit(unit, self.options)
            if cache:
                write_array_cache(cache, unit, self._array_tag(), vol)
        if unit.seg and vol.mask is None:
            vol.mask = self._mask(unit, vol)
        self._volumes = {unit.key: vol}  # keep one volume: consecutive slices of a series hit it
        return vol

    def _array_tag(self) -> str:
        o = self.options
        return stable_id(json.dumps([o.windows, o.mr_percentiles, o.normalize, o.channels], default=str))

    def _mask(self, unit: Unit, vol: Volume) -> np.ndarray:
        if unit.records[0].get("nifti"):
            return read_nifti_mask(unit.files[0], unit.seg, vol)
        return read_seg(unit.seg, unit.files, describe=self.display)

    def _slice(self, vol: Volume, index: int, plane: str) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
        """Slice ``index`` along ``plane``, with ``context`` neighbours as channels, square pixels."""
        array, mask, spacing = reslice(vol, plane)
        k = self.options.context
        idx = np.clip(np.arange(index - k, index + k + 1), 0, array.shape[0] - 1)
        image = torch.from_numpy(np.ascontiguousarray(array[idx])).flatten(0, 1)  # (2k+1)·C × H × W
        m = torch.from_numpy(np.ascontiguousarray(mask[index])).long() if mask is not None else None
        image, m = square_pixels(image, m, spacing[0], spacing[1])
        return image, m, spacing

    # -- predictions ---------------------------------------------------------------------------

    def write_predictions(self, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
        """CT/MR series slice by slice to one DICOM-SEG per series, referencing the source instances."""
        return write_series_predictions(self, model, inputs, out_dir)

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Tiny abdominal CT volumes, normal vs. fatty liver (only the liver's attenuation differs), as real DICOM series."""
        rng = np.random.default_rng(seed)
        n_patients = max(2, 2 * n_per_class // DEMO_SLICES)  # twice the slices of the other demos: more patients
        for split, n in (("train", n_patients), ("test", max(2, n_patients // 2))):
            for label, name in enumerate(DEMO_CLASSES):
                for p in range(n):
                    hu = demo_volume(rng, label, size)
                    write_ct_series(
                        out_dir / split / name / f"case{p:03d}", hu, patient_id=f"DEMO-{split}-{name}-{p}", seed=int(rng.integers(1 << 30))
                    )
        options = {"windows": ["lung", "abdomen", "bone"], "labels": "folders", "cache_dir": str(out_dir / "cache")}
        return DemoData.split_folders(
            out_dir,
            "dicom",
            size,
            options=options,
            recipe={"objective": {"options": {"views": DEMO_VIEWS}}},
            in_chans=3,
            description=(
                f"abdominal CT phantoms ({DEMO_SLICES}-slice DICOM series at {size} px; lung, abdomen and bone HU windows as "
                f"channels) of a liver that is {' or '.join(DEMO_CLASSES)} (about {DEMO_LIVER_HU[0]:.0f} vs {DEMO_LIVER_HU[1]:.0f} HU). "
                "Only the liver's attenuation carries the class; body and liver shape, vessels, an incidental cyst, a per-scan "
                "calibration offset and noise do not. The embedded base was pretrained on generated fractals, not on CT, "
                "so a small HU difference over part of the image may count for little in its features. The views keep what CT "
                "measures: no intensity jitter (a view keeps its HU) and crops of at least 70 % of the slice"
            ),
        )


def _spread(values: list[Any], n: int) -> list[Any]:
    if n >= len(values):
        return values
    idx = np.linspace(0, len(values) - 1, n).round().astype(int)
    return [values[i] for i in idx]
