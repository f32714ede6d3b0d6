"""The geotiff domain: scanning scenes into (scene, window) items, and loading tiles with validity and labels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from insitu.domains.base import (
    IGNORE_INDEX,
    DemoData,
    Domain,
    DomainOptions,
    Manifest,
    ManifestItem,
    Predictor,
    QuarantineItem,
    Sample,
    stable_id,
)
from insitu.domains.geotiff.demo import DEMO_BANDS, DEMO_CLASSES, write_demo_scene
from insitu.domains.geotiff.options import BAND_FILE, SUFFIXES, GeoTiffError, GeoTiffOptions
from insitu.domains.geotiff.read import (
    fill_invalid,
    read_labels,
    read_window,
    scene_windows,
    uses_db,
    window_from_list,
    window_list,
    window_text,
)
from insitu.domains.geotiff.scene import Scene, SceneRef, majority_bands, resolve_scene
from insitu.domains.geotiff.write import write_scene_predictions
from insitu.errors import EmptyDatasetError
from insitu.registry import DOMAINS


@DOMAINS.register("geotiff")
class GeoTiffDomain(Domain):
    """GeoTIFF scenes as (scene, window) tiles with explicit nodata, band names and scaling.

    Options (``data.options``):
        preset: sensor band names and scaling (sentinel2_l1c, sentinel2_l2a, landsat8, landsat9,
            sentinel1 (linear power, converted to dB), sentinel1_db (already dB), rgb); a multi-band
            file must then hold exactly the preset's bands.
        band_names: names of a multi-band file's bands in order (when the file has no descriptions).
        bands: which bands to use, in this order, by name; a missing band is an error naming it.
        layout: ``multiband`` files, ``band_files`` sets (``<prefix>_<BAND>.tif``), or ``auto``.
        tile_size, overlap, sampling (``grid`` or ``random``), tiles_per_scene: the windows; a null
            tile_size reads each scene as one window (for small patches only).
        max_nodata_fraction: tiles with more nodata than this are dropped (listed in skipped.csv).
        nodata: nodata value for files that do not declare one.
        scale, offset, to_db: physical scaling ``raw * scale + offset`` then optionally 10·log10
            (SAR); default from the preset.
        labels: ``raster`` (``<stem><label_suffix>.tif`` aligned class raster), ``bigearthnet``
            (``*_labels_metadata.json`` multi-label tags), ``folders`` (``<root>/<Class>/*.tif``: one class
            per top folder, like EuroSAT), ``none`` or ``auto``; label_reproject
            reprojects a misaligned label raster (nearest) instead of rejecting it.
        tile_label: ``majority`` gives each tile the majority class of its label window (for probes).
    """

    name = "geotiff"
    Options = GeoTiffOptions

    def __init__(self, options: dict[str, Any] | DomainOptions | None = None) -> None:
        super().__init__(options)
        self._scenes: dict[tuple[str, str | None], Scene] = {}

    # ---------------------------------------------------------------- scan

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        root = Path(root)
        refs, quarantine = self.discover(root)
        items: list[ManifestItem] = []
        skipped: list[QuarantineItem] = []
        opened: list[tuple[SceneRef, Scene]] = []
        for ref in refs:
            try:
                opened.append((ref, self.open_scene(ref)))
            except Exception as exc:  # noqa: BLE001 - one bad scene is quarantined, the scan goes on
                quarantine.append(QuarantineItem(ref.path, "cannot use scene", _error_text(exc)))
        for ref, scene in majority_bands(opened, quarantine):
            if max_items and len(items) >= max_items:
                break
            items += self._scan_scene(root, ref, scene, quarantine, skipped, (max_items or 0) - len(items))
        if self.options.labels == "folders":  # <root>/<Class>/...: the class is the first folder below root
            items = folder_labels(root, items, self.options)
        if not items:
            reasons = "; ".join(f"{Path(q.path).name}: {q.reason} [{q.message[:200]}]" for q in quarantine[:3])
            raise EmptyDatasetError(
                f"No usable GeoTIFF tile under {root} ({len(quarantine)} quarantined{': ' + reasons if reasons else ''}). "
                "Expected multi-band .tif files or <prefix>_<BAND>.tif band sets with valid pixels."
            )
        return Manifest(self.name, str(root), items, quarantine, self._class_names(items), skipped)

    def discover(self, root: Path) -> tuple[list[SceneRef], list[QuarantineItem]]:
        """Scene references under ``root`` (a file or a folder); label rasters are not scenes."""
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise EmptyDatasetError(f"No .tif/.tiff file under {root}. Point data.root at GeoTIFF scenes.")
        suffix = self.options.label_suffix
        files = [p for p in files if not (suffix and p.stem.endswith(suffix))]
        band_sets: dict[tuple[str, str], int] = {}
        if self.options.layout != "multiband":
            for p in files:
                m = BAND_FILE.match(p.stem)
                if m:
                    band_sets[(str(p.parent), m["prefix"])] = band_sets.get((str(p.parent), m["prefix"]), 0) + 1
        refs = [SceneRef(parent, prefix) for (parent, prefix), n in sorted(band_sets.items()) if n >= 2]
        in_sets = {(ref.path, ref.prefix) for ref in refs}
        quarantine: list[QuarantineItem] = []
        for p in files:
            m = BAND_FILE.match(p.stem)
            if m and (str(p.parent), m["prefix"]) in in_sets:
                continue
            if self.options.layout == "band_files":
                quarantine.append(QuarantineItem(str(p), "not part of a band file set", "expected <prefix>_<BAND>.tif with >= 2 bands"))
                continue
            refs.append(SceneRef(str(p)))
        return refs, quarantine

    def _scan_scene(
        self, root: Path, ref: SceneRef, scene: Scene, quarantine: list[QuarantineItem], skipped: list[QuarantineItem], budget: int
    ) -> list[ManifestItem]:
        rel = _relative(root, ref)
        group = stable_id(rel)
        items, dropped, errors = [], 0, 0
        windows = list(self.windows(scene, rel))
        for win in windows:
            try:
                valid_fraction, label = self._inspect_window(scene, win)
            except Exception as exc:  # noqa: BLE001 - a corrupt block loses its tile, not the scene
                errors += 1
                quarantine.append(QuarantineItem(scene.path, f"block read failed at window {window_text(win)}", _error_text(exc)))
                continue
            if valid_fraction == 0.0 or 1.0 - valid_fraction > self.options.max_nodata_fraction:
                dropped += 1
                continue
            extra = {"window": window_list(win), "valid_fraction": round(valid_fraction, 4)}
            if ref.prefix:
                extra["prefix"] = ref.prefix
            if scene.tags:
                extra["tags"] = scene.tags
            items.append(ManifestItem(stable_id(rel, *map(str, window_list(win))), ref.path, group, label, None, extra))
            if budget > 0 and len(items) >= budget:
                break
        if not items and dropped and not errors:
            hint = " (to_db makes non-positive values invalid: data already in dB needs to_db: false)" if uses_db(self.options) else ""
            quarantine.append(QuarantineItem(scene.path, "all nodata", f"none of {len(windows)} windows has enough valid pixels{hint}"))
        elif dropped:
            limit = self.options.max_nodata_fraction
            skipped.append(
                QuarantineItem(scene.path, "tiles dropped for nodata", f"{dropped} of {len(windows)} windows > {limit:.0%} nodata")
            )
        return items

    def _inspect_window(self, scene: Scene, win: Window) -> tuple[float, int | None]:
        """Read the whole window once (so corrupt blocks surface at scan time): valid fraction, tile label."""
        _, valid = self.read_window(scene, win)
        fraction = float(valid.mean())
        if scene.label_path is None or self.options.tile_label == "none" or fraction == 0.0:
            return fraction, None
        labels = self.read_labels(scene, win)
        labels = labels[valid & (labels != IGNORE_INDEX)]
        if labels.size == 0:
            return fraction, None
        return fraction, int(np.bincount(labels.ravel()).argmax())

    def _class_names(self, items: list[ManifestItem]) -> list[str]:
        if self.options.class_names:
            return list(self.options.class_names)
        if self.options.labels == "folders":
            return sorted({i.extra["class"] for i in items})
        tags = sorted({t for i in items for t in i.extra.get("tags", [])})
        if tags:
            return tags
        labels = [i.label for i in items if i.label is not None]
        return [str(c) for c in range(max(labels) + 1)] if labels else []

    def windows(self, scene: Scene, rel: str) -> Iterator[Window]:
        """Grid windows (with overlap, the last row/column flush with the edge) or seeded random ones."""
        return scene_windows(scene, rel, self.options)

    # ---------------------------------------------------------------- scenes

    def open_scene(self, ref: SceneRef) -> Scene:
        """Resolve a scene's bands, grid and labels (cached per process; reads headers only)."""
        key = (ref.path, ref.prefix)
        if key not in self._scenes:
            self._scenes[key] = resolve_scene(ref, self.options)
        return self._scenes[key]

    # ---------------------------------------------------------------- reading

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        scene = self.open_scene(SceneRef(item.path, item.extra.get("prefix")))
        win = Window(*window_from_list(item.extra["window"]))
        image, valid = self.read_window(scene, win)
        if not valid.any():
            raise GeoTiffError(f"window {window_text(win)} of {scene.path} has no valid pixel (the file changed since the scan?).")
        sample: Sample = {
            "image": torch.from_numpy(fill_invalid(image, valid)),
            "meta": {
                "domain": self.name,
                "item_id": item.item_id,
                "group": item.group,
                "bands": scene.names,
                "crs": scene.crs.to_string() if scene.crs else None,
                "transform": list(window_transform(win, scene.transform))[:6],
                "window": window_list(win),
                "valid": torch.from_numpy(valid),
            },
        }
        if scene.label_path is not None:
            labels = self.read_labels(scene, win).astype(np.int64)
            labels[~valid] = IGNORE_INDEX
            sample["mask"] = torch.from_numpy(labels)
        if item.label is not None:
            sample["label"] = item.label
        if scene.tags:
            sample["meta"]["tags"] = scene.tags
            names = manifest.class_names or scene.tags
            sample["multilabel"] = torch.tensor([float(n in scene.tags) for n in names])
        return sample

    def read_window(self, scene: Scene, win: Window) -> tuple[np.ndarray, np.ndarray]:
        """(float32 C×h×w in physical units, bool h×w valid) for one window; reads only that window."""
        return read_window(scene, win, self.options)

    def read_labels(self, scene: Scene, win: Window) -> np.ndarray:
        """uint8 class ids of the window (label nodata -> IGNORE_INDEX), reprojected if configured."""
        return read_labels(scene, win, self.options)

    # ---------------------------------------------------------------- predictions

    def write_predictions(self, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
        """Whole scenes to georeferenced uint8 class maps, one tile row at a time (`write_scene_predictions`)."""
        return write_scene_predictions(self, model, inputs, out_dir)

    # ---------------------------------------------------------------- demo

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Seeded 6-band UTM scenes of 4 land-cover classes with label rasters: 40 tiles per training scene,
        8 per test scene, so the probe's bootstrap has independent scenes to resample (one per group)."""
        n_tiles = len(DEMO_CLASSES) * n_per_class
        for split, total, per_scene in (("train", n_tiles, 40), ("test", max(8, n_tiles // 2), 8)):
            for k in range(max(1, total // per_scene)):
                scene_seed = int(np.random.default_rng([seed, split == "test", k]).integers(1 << 31))
                write_demo_scene(out_dir / split / f"scene{k:02d}.tif", scene_seed, min(per_scene, total), size)
        options = {"tile_size": size, "scale": 1e-4, "max_nodata_fraction": 0.5, "class_names": list(DEMO_CLASSES)}
        return DemoData.split_folders(
            out_dir,
            "geotiff",
            size,
            options=options,
            in_chans=len(DEMO_BANDS),
            description=f"{len(DEMO_CLASSES)} land-cover classes ({', '.join(DEMO_CLASSES)}) in 6-band UTM GeoTIFFs, {size}px tiles; "
            "the RGB base's patch embedding takes the bands by wavelength (channel_init rgb_nearest: B02/B03/B04 on the blue/green/red "
            "filters, B08/B11/B12 on the red one), the best choice measured on 200 real EuroSAT-MS patches "
            "(docs/results/remote_sensing.md; resolved over mean on fractal_vit_tiny, not on colour_vit_tiny)",
            recipe={"backbone": {"channel_init": "rgb_nearest", "bands": list(DEMO_BANDS)}},
        )


def folder_labels(root: Path, items: list[ManifestItem], options: GeoTiffOptions) -> list[ManifestItem]:
    """Each item labelled by its scene's first folder below ``root`` (sorted folder names, or ``class_names``, are the classes)."""
    if root.is_file():
        raise GeoTiffError(f"data.options.labels is 'folders' but data.root {root} is a file; point it at the folder of class folders.")
    top = [Path(i.path).relative_to(root).parts for i in items]
    loose = [i.path for i, parts in zip(items, top, strict=True) if len(parts) < 2]
    if loose:
        raise GeoTiffError(f"data.options.labels is 'folders' but {loose[0]} is not inside a class folder of {root} (<root>/<Class>/*.tif).")
    names = list(options.class_names) if options.class_names else sorted({parts[0] for parts in top})
    unknown = sorted({parts[0] for parts in top} - set(names))
    if unknown:
        raise GeoTiffError(f"class folder {unknown[0]!r} under {root} is not in data.options.class_names ({', '.join(names)}).")
    for item, parts in zip(items, top, strict=True):
        item.label = names.index(parts[0])
        item.extra["class"] = parts[0]
    return items


def _relative(root: Path, ref: SceneRef) -> str:
    base = Path(ref.path)
    rel = base.name if root.is_file() else base.relative_to(root).as_posix()
    return f"{rel}/{ref.prefix}" if ref.prefix else rel


def _error_text(exc: BaseException) -> str:
    """The library's message, with its cause (rasterio puts GDAL's detail there)."""
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" ({type(exc.__cause__).__name__}: {exc.__cause__})"
    return text
