"""The files of a scan and the private cache: per-file records and decoded arrays, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from insitu.domains.base import stable_id
from insitu.domains.dicom.geometry import Volume
from insitu.domains.dicom.records import RECORD_VERSION
from insitu.domains.dicom.series import Unit
from insitu.io import atomic_path
from insitu.io import write_json as write_json_atomic


def list_files(root: Path, cache: Path) -> list[str]:
    """Every regular file under root (DICOM files often have no extension), minus hidden and the cache."""
    if root.is_file():
        return [str(root)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != cache.resolve())
        out.extend(str(Path(dirpath, f)) for f in sorted(filenames) if not f.startswith("."))
    return out


def class_dir(root: Path, path: str) -> str:
    rel = Path(path).resolve().relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{Path(path).resolve()}\x00{st.st_size}\x00{st.st_mtime_ns}".encode()).hexdigest()[:24]


def read_cached_record(cache: Path, key: str) -> dict[str, Any] | None:
    path = cache / "records" / f"{key}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a record torn by a killed scan is simply redone
    return rec if rec.get("version") == RECORD_VERSION else None


def write_json(path: Path, data: Any) -> None:
    """A cache file, written atomically (a killed scan leaves the old file or the new one), unsynced."""
    write_json_atomic(path, data, indent=None, sync=False)


def _array_path(cache: Path, unit: Unit, tag: str) -> Path:
    stamp = stable_id(*[file_key(f) for f in unit.files], unit.seg or "")
    return cache / "arrays" / f"{unit.key}-{stamp}-{tag}.npy"


def read_array_cache(cache: Path, unit: Unit, tag: str) -> Volume | None:
    path = _array_path(cache, unit, tag)
    meta = path.with_suffix(".json")
    if not (path.exists() and meta.exists()):
        return None
    geo = json.loads(meta.read_text())
    array = np.load(path, mmap_mode="r")  # slices are read on demand, never decoded again
    return Volume(array, np.asarray(geo["direction"]), tuple(geo["spacing"]), geo["positions"])


def write_array_cache(cache: Path, unit: Unit, tag: str, vol: Volume) -> None:
    path = _array_path(cache, unit, tag)
    with atomic_path(path, sync=False) as tmp:
        np.save(tmp, vol.array)
    write_json(path.with_suffix(".json"), {"direction": vol.direction.tolist(), "spacing": list(vol.spacing), "positions": vol.positions})
