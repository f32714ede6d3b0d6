"""Remote sensing: multispectral GeoTIFF/COG scenes and per-band file sets, read as windowed tiles.

An item is one (scene, window) pair. A scene is either one multi-band GeoTIFF or a set of
single-band files named ``<prefix>_<BAND>.tif`` (Sentinel-2 products, BigEarthNet patches) that are
resampled onto the grid of the finest band. Only the window of an item is ever read, so memory is
bounded by the tile size, not the scene size.

Validity is explicit: ``meta["valid"]`` (bool H×W, True = usable pixel) combines the file's nodata
mask and non-finite values. Invalid pixels of ``image`` are filled with that band's mean over the
tile's valid pixels (never zeros, which are a real reflectance), and when a label raster exists they
are ``IGNORE_INDEX`` in ``mask`` so that losses and metrics skip them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
from pydantic import model_validator
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window, from_bounds
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform

from insitu.domains.base import (
    IGNORE_INDEX,
    DemoData,
    Domain,
    DomainOptions,
    Manifest,
    ManifestItem,
    QuarantineItem,
    Sample,
    stable_id,
)
from insitu.errors import DataError, EmptyDatasetError

SUFFIXES = (".tif", ".tiff")
BAND_FILE = re.compile(r"^(?P<prefix>.+)_(?P<band>B\d{1,2}A?|VV|VH|HH|HV)$", re.IGNORECASE)
RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear, "cubic": Resampling.cubic, "average": Resampling.average}


class GeoTiffError(DataError):
    """A GeoTIFF scene cannot be used as configured (missing band, misaligned labels, bad read)."""


@dataclass(frozen=True)
class BandPreset:
    """Band names of a sensor product in their conventional order, and its physical scaling."""

    bands: tuple[str, ...]
    scale: float = 1.0
    offset: float = 0.0
    to_db: bool = False


_S2 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_LANDSAT_SR = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")
PRESETS: dict[str, BandPreset] = {
    # L1C/L2A digital numbers are reflectance x 10000 (products from baseline 04.00 also need offset -0.1)
    "sentinel2_l1c": BandPreset(_S2, scale=1e-4),
    "sentinel2_l2a": BandPreset(tuple(b for b in _S2 if b != "B10"), scale=1e-4),
    # Collection 2 Level-2 surface reflectance: DN * 2.75e-5 - 0.2
    "landsat8": BandPreset(_LANDSAT_SR, scale=2.75e-5, offset=-0.2),
    "landsat9": BandPreset(_LANDSAT_SR, scale=2.75e-5, offset=-0.2),
    # GRD backscatter is linear power; models see it in dB
    "sentinel1": BandPreset(("VV", "VH"), to_db=True),
    # backscatter already in dB (BigEarthNet S1 patches)
    "sentinel1_db": BandPreset(("VV", "VH")),
    "rgb": BandPreset(("red", "green", "blue")),
}


class GeoTiffOptions(DomainOptions):
    """``data.options`` of the geotiff domain (see `GeoTiffDomain`)."""

    preset: str | None = None
    band_names: list[str] | None = None
    bands: list[str] | None = None
    layout: Literal["auto", "multiband", "band_files"] = "auto"
    tile_size: int | None = 64
    overlap: int = 0
    sampling: Literal["grid", "random"] = "grid"
    tiles_per_scene: int = 16
    max_nodata_fraction: float = 0.5
    nodata: float | None = None
    scale: float | None = None
    offset: float | None = None
    to_db: bool | None = None
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    labels: Literal["auto", "none", "raster", "bigearthnet"] = "auto"
    label_suffix: str = "_label"
    label_reproject: bool = False
    tile_label: Literal["majority", "none"] = "majority"
    class_names: list[str] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> GeoTiffOptions:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.preset and self.bands:
            unknown = [b for b in self.bands if b not in PRESETS[self.preset].bands]
            if unknown:
                raise ValueError(f"bands {unknown} are not in preset {self.preset!r} ({', '.join(PRESETS[self.preset].bands)})")
        if self.tile_size is not None and self.tile_size <= 0:
            raise ValueError("tile_size must be positive (or null for one window per scene)")
        if self.tile_size is not None and not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {self.overlap}")
        if not 0.0 <= self.max_nodata_fraction < 1.0:
            raise ValueError("max_nodata_fraction must be in [0, 1): a tile needs at least one valid pixel")
        return self


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
            (``*_labels_metadata.json`` multi-label tags), ``none`` or ``auto``; label_reproject
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
                quarantine.append(QuarantineItem(scene.path, f"block read failed at window {_window_text(win)}", _error_text(exc)))
                continue
            if valid_fraction == 0.0 or 1.0 - valid_fraction > self.options.max_nodata_fraction:
                dropped += 1
                continue
            extra = {"window": _window_list(win), "valid_fraction": round(valid_fraction, 4)}
            if ref.prefix:
                extra["prefix"] = ref.prefix
            if scene.tags:
                extra["tags"] = scene.tags
            items.append(ManifestItem(stable_id(rel, *map(str, _window_list(win))), ref.path, group, label, None, extra))
            if budget > 0 and len(items) >= budget:
                break
        if not items and dropped and not errors:
            hint = " (to_db makes non-positive values invalid: data already in dB needs to_db: false)" if self._to_db() else ""
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
        tags = sorted({t for i in items for t in i.extra.get("tags", [])})
        if tags:
            return tags
        labels = [i.label for i in items if i.label is not None]
        return [str(c) for c in range(max(labels) + 1)] if labels else []

    def windows(self, scene: Scene, rel: str) -> Iterator[Window]:
        """Grid windows (with overlap, the last row/column flush with the edge) or seeded random ones."""
        size = self.options.tile_size
        if size is None:
            yield Window(0, 0, scene.width, scene.height)
            return
        th, tw = min(size, scene.height), min(size, scene.width)
        if self.options.sampling == "random":
            seed = int(stable_id(rel, salt=str(self.options.seed)), 16) % 2**32
            rng = np.random.default_rng(seed)
            for _ in range(self.options.tiles_per_scene):
                row = int(rng.integers(0, scene.height - th + 1))
                col = int(rng.integers(0, scene.width - tw + 1))
                yield Window(col, row, tw, th)
            return
        stride = size - self.options.overlap
        for row in grid_offsets(scene.height, th, stride):
            for col in grid_offsets(scene.width, tw, stride):
                yield Window(col, row, tw, th)

    # ---------------------------------------------------------------- scenes

    def open_scene(self, ref: SceneRef) -> Scene:
        """Resolve a scene's bands, grid and labels (cached per process; reads headers only)."""
        key = (ref.path, ref.prefix)
        if key not in self._scenes:
            scene = self._band_file_scene(ref) if ref.prefix else self._multiband_scene(ref.path)
            self._attach_labels(scene, ref)
            self._scenes[key] = scene
        return self._scenes[key]

    def _multiband_scene(self, path: str) -> Scene:
        with rasterio.open(path) as src:
            names = self._file_band_names(path, src.count, list(src.descriptions))
            order = self._select(names, path)
            return Scene(path, [names[i] for i in order], [(path, i + 1) for i in order], src.height, src.width, src.transform, src.crs)

    def _file_band_names(self, path: str, count: int, descriptions: list[str | None]) -> list[str]:
        opts = self.options
        if opts.band_names is not None:
            if len(opts.band_names) != count:
                raise GeoTiffError(f"{path} has {count} bands but data.options.band_names lists {len(opts.band_names)}.")
            return list(opts.band_names)
        if opts.preset is not None:
            preset = PRESETS[opts.preset].bands
            if count != len(preset):
                raise GeoTiffError(
                    f"wrong band count for preset {opts.preset!r}: {path} has {count} bands, the preset expects "
                    f"{len(preset)} ({', '.join(preset)}). Pick the matching preset or set data.options.band_names."
                )
            return list(preset)
        if all(descriptions) and len(set(descriptions)) == count:
            return [str(d) for d in descriptions]
        return [f"b{i + 1}" for i in range(count)]

    def _select(self, names: list[str], where: str) -> list[int]:
        """Indices of the configured bands in ``names`` (all, in file order, when none are configured)."""
        wanted = self.options.bands
        if wanted is None:
            return list(range(len(names)))
        missing = [b for b in wanted if b not in names]
        if missing:
            raise GeoTiffError(
                f"band {missing[0]!r} is missing from {where} (it has {', '.join(names)}). "
                "Fix data.options.bands or data.options.band_names."
            )
        return [names.index(b) for b in wanted]

    def _band_file_scene(self, ref: SceneRef) -> Scene:
        folder = Path(ref.path)
        files = {}
        for p in sorted(folder.iterdir()):
            m = BAND_FILE.match(p.stem)
            if p.suffix.lower() in SUFFIXES and m and m["prefix"] == ref.prefix:
                files[m["band"].upper()] = str(p)
        preset = PRESETS[self.options.preset].bands if self.options.preset else None
        names = [b for b in preset if b in files] if preset else sorted(files)
        if preset and self.options.bands is None and len(names) != len(preset):
            absent = [b for b in preset if b not in files]
            raise GeoTiffError(
                f"band {absent[0]!r} of preset {self.options.preset!r} is missing from {folder}/{ref.prefix}_*.tif "
                "(select the bands you have with data.options.bands)."
            )
        order = self._select(names, f"{folder}/{ref.prefix}_*.tif")
        selected = [names[i] for i in order]
        return self._finest_grid(str(folder), selected, [files[b] for b in selected])

    def _finest_grid(self, path: str, names: list[str], files: list[str]) -> Scene:
        """Put every band file on the grid of the one with the most pixels; they must cover one area."""
        grids = []
        for f in files:
            with rasterio.open(f) as src:
                grids.append((src.height * src.width, src.height, src.width, src.transform, src.crs, src.bounds, src.count))
        best = max(grids, key=lambda g: g[0])
        for f, g in zip(files, grids, strict=True):
            if g[4] != best[4] or not np.allclose(g[5], best[5], atol=abs(best[3].a) * 0.5):
                raise GeoTiffError(
                    f"{f} does not cover the same area/CRS as the other bands of {path}; band files must share one footprint."
                )
            if g[6] != 1:
                raise GeoTiffError(f"{f} has {g[6]} bands; a band file must hold exactly one.")
        return Scene(path, names, [(f, 1) for f in files], best[1], best[2], best[3], best[4])

    def _attach_labels(self, scene: Scene, ref: SceneRef) -> None:
        mode = self.options.labels
        if mode in ("auto", "bigearthnet") and ref.prefix:
            meta = Path(ref.path) / f"{ref.prefix}_labels_metadata.json"
            if meta.is_file():
                scene.tags = list(json.loads(meta.read_text()).get("labels", []))
            elif mode == "bigearthnet":
                raise GeoTiffError(f"{meta} is missing; data.options.labels is 'bigearthnet'.")
        if mode in ("auto", "raster"):
            base = Path(ref.path) / ref.prefix if ref.prefix else Path(ref.path).with_suffix("")
            candidates = [base.parent / f"{base.name}{self.options.label_suffix}{s}" for s in SUFFIXES]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None and mode == "raster":
                raise GeoTiffError(f"no label raster for {ref.path}: expected {candidates[0]} (data.options.label_suffix).")
            if found is not None:
                if not self.options.label_reproject:
                    check_label_alignment(scene, str(found))
                scene.label_path = str(found)

    # ---------------------------------------------------------------- reading

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        scene = self.open_scene(SceneRef(item.path, item.extra.get("prefix")))
        win = Window(*_window_from_list(item.extra["window"]))
        image, valid = self.read_window(scene, win)
        if not valid.any():
            raise GeoTiffError(f"window {_window_text(win)} of {scene.path} has no valid pixel (the file changed since the scan?).")
        sample: Sample = {
            "image": torch.from_numpy(fill_invalid(image, valid)),
            "meta": {
                "domain": self.name,
                "item_id": item.item_id,
                "group": item.group,
                "bands": scene.names,
                "crs": scene.crs.to_string() if scene.crs else None,
                "transform": list(window_transform(win, scene.transform))[:6],
                "window": _window_list(win),
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
        out_shape = (int(win.height), int(win.width))
        bands, valid = [], np.ones(out_shape, dtype=bool)
        for path, indexes in _group_sources(scene.sources):
            with rasterio.open(path) as src:
                data, ok = self._read_source(src, scene, win, indexes, out_shape)
            bands.append(data)
            valid &= ok
        image = np.concatenate(bands, axis=0)
        image, ok = self._scale(image)
        return image, valid & ok & np.isfinite(image).all(axis=0)

    def _read_source(
        self, src: Any, scene: Scene, win: Window, indexes: list[int], out_shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        same_grid = src.transform == scene.transform and src.shape == (scene.height, scene.width)
        src_win = win if same_grid else from_bounds(*window_bounds(win, scene.transform), transform=src.transform)
        resampling = RESAMPLING[self.options.resampling]
        data = src.read(indexes, window=src_win, out_shape=(len(indexes), *out_shape), resampling=resampling).astype(np.float32)
        valid = np.ones(out_shape, dtype=bool)
        if self.options.nodata is not None and src.nodata is None:
            valid &= (data != self.options.nodata).all(axis=0)
        elif src.nodata is not None or any({MaskFlags.per_dataset, MaskFlags.alpha} & set(f) for f in src.mask_flag_enums):
            # GDAL masks are 255 = valid, 0 = nodata (numpy masked arrays use the opposite sense)
            masks = src.read_masks(indexes, window=src_win, out_shape=(len(indexes), *out_shape), resampling=Resampling.nearest)
            valid &= (masks > 0).all(axis=0)
        return data, valid

    def _scale(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``raw * scale + offset``, then 10·log10 for SAR (non-positive power becomes invalid, not -inf)."""
        preset = PRESETS[self.options.preset] if self.options.preset else BandPreset(())
        scale = preset.scale if self.options.scale is None else self.options.scale
        offset = preset.offset if self.options.offset is None else self.options.offset
        to_db = self._to_db()
        image = image * np.float32(scale) + np.float32(offset) if (scale != 1.0 or offset != 0.0) else image
        valid = np.ones(image.shape[1:], dtype=bool)
        if to_db:
            positive = image > 0
            valid = positive.all(axis=0)
            image = np.where(positive, 10.0 * np.log10(np.where(positive, image, 1.0)), np.nan).astype(np.float32)
        return image, valid

    def _to_db(self) -> bool:
        preset = PRESETS[self.options.preset] if self.options.preset else BandPreset(())
        return preset.to_db if self.options.to_db is None else self.options.to_db

    def read_labels(self, scene: Scene, win: Window) -> np.ndarray:
        """uint8 class ids of the window (label nodata -> IGNORE_INDEX), reprojected if configured."""
        assert scene.label_path is not None
        with rasterio.open(scene.label_path) as src:
            if self.options.label_reproject:
                with WarpedVRT(
                    src, crs=scene.crs, transform=scene.transform, width=scene.width, height=scene.height,
                    resampling=Resampling.nearest, nodata=IGNORE_INDEX,
                ) as vrt:  # fmt: skip
                    return _labels(vrt.read(1, window=win), vrt.nodata)
            return _labels(src.read(1, window=win), src.nodata)

    # ---------------------------------------------------------------- demo

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Two seeded 6-band UTM scenes (train/test) of 4 land-cover classes with label rasters."""
        from insitu.domains.geotiff_write import write_demo_scene

        n_tiles = len(DEMO_CLASSES) * n_per_class
        for split, k in (("train", 0), ("test", 1)):
            write_demo_scene(out_dir / split / "scene.tif", seed * 2 + k, n_tiles if k == 0 else max(8, n_tiles // 2), size)
        options = {"tile_size": size, "scale": 1e-4, "max_nodata_fraction": 0.5, "class_names": list(DEMO_CLASSES)}
        train = {"domain": "geotiff", "root": str(out_dir / "train"), "options": options, "image_size": size}
        test = {**train, "root": str(out_dir / "test")}
        return DemoData(
            data=train,
            probe_train=train,
            probe_test=test,
            in_chans=len(DEMO_BANDS),
            description=f"{len(DEMO_CLASSES)} land-cover classes ({', '.join(DEMO_CLASSES)}) in 6-band UTM GeoTIFFs, {size}px tiles",
        )


DEMO_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
DEMO_CLASSES = ("water", "forest", "cropland", "urban")


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


def fill_invalid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels by each band's mean over the valid ones (a neutral value, not a fake zero)."""
    if valid.all():
        return np.ascontiguousarray(image, dtype=np.float32)
    if not valid.any():
        raise ValueError("fill_invalid: the tile has no valid pixel to take band means from")
    means = image[:, valid].mean(axis=1)
    out = np.where(valid[None], image, means[:, None, None])
    return np.ascontiguousarray(out, dtype=np.float32)


def grid_offsets(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``length`` with tiles of ``tile`` every ``stride``; the last is flush with the end."""
    if length <= tile:
        return [0]
    offsets = list(range(0, length - tile + 1, stride))
    if offsets[-1] != length - tile:
        offsets.append(length - tile)
    return offsets


def _labels(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    out = arr.astype(np.uint8)
    if nodata is not None:
        out[arr == nodata] = IGNORE_INDEX
    return out


def _group_sources(sources: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """Consecutive bands of one file are read in one call."""
    groups: list[tuple[str, list[int]]] = []
    for path, index in sources:
        if groups and groups[-1][0] == path:
            groups[-1][1].append(index)
        else:
            groups.append((path, [index]))
    return groups


def _relative(root: Path, ref: SceneRef) -> str:
    base = Path(ref.path)
    rel = base.name if root.is_file() else base.relative_to(root).as_posix()
    return f"{rel}/{ref.prefix}" if ref.prefix else rel


def _window_list(win: Window) -> list[int]:
    return [int(win.row_off), int(win.col_off), int(win.height), int(win.width)]


def _window_from_list(values: list[int]) -> tuple[int, int, int, int]:
    row, col, height, width = values
    return col, row, width, height


def _window_text(win: Window) -> str:
    return f"(row {int(win.row_off)}, col {int(win.col_off)}, {int(win.height)}x{int(win.width)})"


def _error_text(exc: BaseException) -> str:
    """The library's message, with its cause (rasterio puts GDAL's detail there)."""
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" ({type(exc.__cause__).__name__}: {exc.__cause__})"
    return text
