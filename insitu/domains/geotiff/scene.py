"""Resolving a scene: its band files and names, the selected bands, one pixel grid, and its labels (headers only)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from insitu.domains.base import QuarantineItem
from insitu.domains.geotiff.options import BAND_FILE, PRESETS, SUFFIXES, GeoTiffError, GeoTiffOptions


@dataclass
class Scene:
    """A scene resolved to its selected bands on one pixel grid (nothing read yet)."""

    path: str
    names: list[str]
    sources: list[tuple[str, int]]  # (file, 1-based band index) per selected band
    height: int
    width: int
    transform: Affine
    crs: CRS
    label_path: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SceneRef:
    """Where a scene lives: one multi-band file, or a folder plus the band files' common prefix."""

    path: str
    prefix: str | None = None


def resolve_scene(ref: SceneRef, options: GeoTiffOptions) -> Scene:
    """A scene's bands, grid and labels as configured by ``options`` (reads headers only)."""
    scene = _band_file_scene(ref, options) if ref.prefix else _multiband_scene(ref.path, options)
    _attach_labels(scene, ref, options)
    return scene


def _multiband_scene(path: str, options: GeoTiffOptions) -> Scene:
    with rasterio.open(path) as src:
        names = _file_band_names(options, path, src.count, list(src.descriptions))
        order = _select(options, names, path)
        return Scene(path, [names[i] for i in order], [(path, i + 1) for i in order], src.height, src.width, src.transform, src.crs)


def _file_band_names(options: GeoTiffOptions, path: str, count: int, descriptions: list[str | None]) -> list[str]:
    if options.band_names is not None:
        if len(options.band_names) != count:
            raise GeoTiffError(f"{path} has {count} bands but data.options.band_names lists {len(options.band_names)}.")
        return list(options.band_names)
    if options.preset is not None:
        preset = PRESETS[options.preset].bands
        if count != len(preset):
            raise GeoTiffError(
                f"wrong band count for preset {options.preset!r}: {path} has {count} bands, the preset expects "
                f"{len(preset)} ({', '.join(preset)}). Pick the matching preset or set data.options.band_names."
            )
        return list(preset)
    if all(descriptions) and len(set(descriptions)) == count:
        return [str(d) for d in descriptions]
    return [f"b{i + 1}" for i in range(count)]


def _select(options: GeoTiffOptions, names: list[str], where: str) -> list[int]:
    """Indices of the configured bands in ``names`` (all, in file order, when none are configured)."""
    wanted = options.bands
    if wanted is None:
        return list(range(len(names)))
    missing = [b for b in wanted if b not in names]
    if missing:
        raise GeoTiffError(
            f"band {missing[0]!r} is missing from {where} (it has {', '.join(names)}). Fix data.options.bands or data.options.band_names."
        )
    return [names.index(b) for b in wanted]


def _band_file_scene(ref: SceneRef, options: GeoTiffOptions) -> Scene:
    folder = Path(ref.path)
    files = {}
    for p in sorted(folder.iterdir()):
        m = BAND_FILE.match(p.stem)
        if p.suffix.lower() in SUFFIXES and m and m["prefix"] == ref.prefix:
            files[m["band"].upper()] = str(p)
    preset = PRESETS[options.preset].bands if options.preset else None
    names = [b for b in preset if b in files] if preset else sorted(files)
    if preset and options.bands is None and len(names) != len(preset):
        absent = [b for b in preset if b not in files]
        raise GeoTiffError(
            f"band {absent[0]!r} of preset {options.preset!r} is missing from {folder}/{ref.prefix}_*.tif "
            "(select the bands you have with data.options.bands)."
        )
    order = _select(options, names, f"{folder}/{ref.prefix}_*.tif")
    selected = [names[i] for i in order]
    return _finest_grid(str(folder), selected, [files[b] for b in selected])


def _finest_grid(path: str, names: list[str], files: list[str]) -> Scene:
    """Put every band file on the grid of the one with the most pixels; they must cover one area."""
    grids = []
    for f in files:
        with rasterio.open(f) as src:
            grids.append((src.height * src.width, src.height, src.width, src.transform, src.crs, src.bounds, src.count))
    best = max(grids, key=lambda g: g[0])
    for f, g in zip(files, grids, strict=True):
        if g[4] != best[4] or not np.allclose(g[5], best[5], atol=abs(best[3].a) * 0.5):
            raise GeoTiffError(f"{f} does not cover the same area/CRS as the other bands of {path}; band files must share one footprint.")
        if g[6] != 1:
            raise GeoTiffError(f"{f} has {g[6]} bands; a band file must hold exactly one.")
    return Scene(path, names, [(f, 1) for f in files], best[1], best[2], best[3], best[4])


def _attach_labels(scene: Scene, ref: SceneRef, options: GeoTiffOptions) -> None:
    mode = options.labels
    if mode in ("auto", "bigearthnet") and ref.prefix:
        meta = Path(ref.path) / f"{ref.prefix}_labels_metadata.json"
        if meta.is_file():
            scene.tags = list(json.loads(meta.read_text()).get("labels", []))
        elif mode == "bigearthnet":
            raise GeoTiffError(f"{meta} is missing; data.options.labels is 'bigearthnet'.")
    if mode in ("auto", "raster"):
        base = Path(ref.path) / ref.prefix if ref.prefix else Path(ref.path).with_suffix("")
        candidates = [base.parent / f"{base.name}{options.label_suffix}{s}" for s in SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None and mode == "raster":
            raise GeoTiffError(f"no label raster for {ref.path}: expected {candidates[0]} (data.options.label_suffix).")
        if found is not None:
            if not options.label_reproject:
                check_label_alignment(scene, str(found))
            scene.label_path = str(found)


def majority_bands(opened: list[tuple[SceneRef, Scene]], quarantine: list[QuarantineItem]) -> list[tuple[SceneRef, Scene]]:
    """Keep the scenes with the most common band count; quarantine the others with the reason.

    One model input needs one channel count, so a folder mixing 1-band and 4-band scenes cannot be
    read as one dataset. Ties go to the larger band count.
    """
    counts = Counter(len(scene.names) for _, scene in opened)
    if len(counts) <= 1:
        return opened
    want = max(counts, key=lambda n: (counts[n], n))
    names = next(scene.names for _, scene in opened if len(scene.names) == want)
    kept = []
    for ref, scene in opened:
        if len(scene.names) == want:
            kept.append((ref, scene))
            continue
        quarantine.append(
            QuarantineItem(
                scene.path,
                "band count differs from the other scenes",
                f"{len(scene.names)} bands ({', '.join(scene.names)}) but {counts[want]} of {len(opened)} scenes have {want} "
                f"({', '.join(names)}). Scan scenes of different sensors as separate roots, or pick common bands with data.options.bands.",
            )
        )
    return kept


def check_label_alignment(scene: Scene, label_path: str) -> None:
    """Raise `GeoTiffError` naming both files unless the label raster has the scene's CRS, transform, shape."""
    with rasterio.open(label_path) as lab:
        problems = []
        if lab.crs != scene.crs:
            problems.append(f"CRS {lab.crs} vs {scene.crs}")
        if not lab.transform.almost_equals(scene.transform, precision=1e-6):
            problems.append(f"transform {tuple(lab.transform)[:6]} vs {tuple(scene.transform)[:6]}")
        if lab.shape != (scene.height, scene.width):
            problems.append(f"shape {lab.shape} vs {(scene.height, scene.width)}")
    if problems:
        raise GeoTiffError(
            f"label raster {label_path} does not match image {scene.path}: {'; '.join(problems)}. "
            "Fix the label raster or set data.options.label_reproject: true to reproject it onto the image grid."
        )
