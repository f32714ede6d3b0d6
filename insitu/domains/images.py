"""Plain images: folders of PNG/JPEG/TIFF (optionally one subfolder per class) and MedMNIST .npz."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

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
from insitu.domains.masks import read_binary_mask
from insitu.domains.overlays import overlay_mask, save_png, to_rgb_uint8
from insitu.domains.synthetic import LAND_COVER, write_land_cover_folders
from insitu.errors import DataError, EmptyDatasetError
from insitu.io import write_csv
from insitu.privacy import path_token, secret_salt
from insitu.registry import DOMAINS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageOptions(DomainOptions):
    channels: Literal[1, 3] = 3
    labels: Literal["auto", "folders", "none"] = "auto"
    split: str | None = "train"
    group_pattern: str | None = None
    workers: int = 4
    masks: str | None = None
    mask_threshold: int = Field(127, ge=0, le=255)
    aspect: Literal["keep", "crop", "pad"] = "keep"
    manifest_paths: Literal["relative", "token"] = "relative"
    class_names: Literal["auto", "folders", "token"] = "auto"
    salt_env: str = "INSITU_SALT"


@DOMAINS.register("images")
class ImageFolderDomain(Domain):
    """Images from a folder tree or a MedMNIST-style ``.npz`` (``{split}_images``/``{split}_labels``).

    Options:
        channels: 1 (grey) or 3 (RGB); images are converted on load.
        labels: ``folders`` takes one subfolder per class; ``auto`` does so when subfolders exist.
        split: which arrays of an ``.npz`` to read (``train``, ``val``, ``test``); ignored for folders.
        group_pattern: a regex whose first group, applied to the file name, gives the split group
            (for example a case id); by default every file is its own group.
        masks: a folder mirroring the image folder (same relative path and stem, any image suffix)
            holding a binary mask per image, e.g. BUSI's ``busi_masks/``; pixels above
            ``mask_threshold`` are foreground (1). Items get a ``mask``; an image without one is quarantined.
        aspect: how a non-square image becomes square before the later resize to ``image_size``:
            ``keep`` (default) stretches it, so the original aspect ratio stays visible in the content's
            shapes; ``crop`` takes the centred largest square (every image looks alike in size and shape,
            at the cost of the cut-off sides); ``pad`` extends the short side with the image's own mean
            colour (keeps all content, but the band's width still tells the aspect). A mask gets the same
            crop or pad (padding is ``IGNORE_INDEX``). See docs/surgical_video.md on size shortcuts.
        manifest_paths: ``relative`` (default: root-relative paths, as public data sets are shared) or ``token``
            (for a hospital's own folders, often named after patients): ``manifest.csv``, ``quarantine.csv`` and
            ``near_duplicates.csv`` show opaque salted tokens, quoted file and folder names in decoder messages
            become the same tokens, and item ids and groups are salted hashes, so a guessed file name cannot be
            confirmed from a shared manifest. The salt is DICOM's (`insitu.privacy.secret_salt`: ``$INSITU_SALT``,
            named by ``salt_env``, else a random salt in the private cache); splits by group then depend on it, so
            set ``INSITU_SALT`` where runs on several machines must split alike.
        class_names: what the class-folder names become in the manifest and everything downstream (reports,
            heads, predictions): ``folders`` keeps them (``benign``, ``malignant``: labels the user chose),
            ``token`` writes ``class-<salted hash>`` (class ``i`` is still the ``i``-th folder in sorted order),
            ``auto`` (default) is ``token`` with ``manifest_paths: token`` and ``folders`` otherwise: a config
            that says its paths are private must say ``class_names: folders`` to show folder names.
    """

    name = "images"
    Options = ImageOptions

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        root = Path(root)
        if root.is_file() and root.suffix == ".npz":
            return self._scan_npz(root, max_items)
        if not root.is_dir():
            raise DataError(f"{root} is neither a folder of images nor a .npz file. Point data.root at one.")
        if self.options.masks and not Path(self.options.masks).is_dir():
            raise DataError(f"options.masks points at {self.options.masks}, which is not a folder; point it at the mask folder.")
        return self._scan_folder(root, max_items)

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        if "npz_key" in item.extra:
            arr = npz_arrays(item.path)[item.extra["npz_key"]][item.extra["index"]]
            image = _to_chw(np.asarray(arr), self.options.channels)
        else:
            with Image.open(item.path) as im:
                image = pil_to_chw(im, self.options.channels)
        sample: Sample = {"image": image, "meta": {"domain": self.name, "item_id": item.item_id, "group": item.group}}
        if item.label is not None:
            sample["label"] = item.label
        if "mask" in item.extra:
            sample["mask"] = read_binary_mask(item.extra["mask"], tuple(image.shape[-2:]), self.options.mask_threshold)
        if self.options.aspect != "keep":
            sample["image"] = make_square(image, self.options.aspect)
            if "mask" in sample:
                sample["mask"] = make_square(sample["mask"], self.options.aspect, fill=IGNORE_INDEX)
        return sample

    def _scan_folder(self, root: Path, max_items: int | None) -> Manifest:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        use_folders = self.options.labels == "folders" or (self.options.labels == "auto" and class_dirs)
        if self.options.labels == "folders" and not class_dirs:
            raise DataError(f"data.options.labels is 'folders' but {root} has no class subfolders.")
        if max_items:
            files = _spread(files, max_items)
        with ThreadPoolExecutor(self.options.workers) as pool:
            problems = list(pool.map(_check_image, files))
        salt = self._salt()
        items, quarantine = [], []
        for path, problem in zip(files, problems, strict=False):
            if problem:
                quarantine.append(QuarantineItem(str(path), "cannot decode image", problem))
                continue
            rel = path.relative_to(root).as_posix()
            label = class_dirs.index(rel.split("/")[0]) if use_folders and "/" in rel else None
            extra = {}
            if self.options.masks:
                mask = _mask_for(Path(self.options.masks), path.relative_to(root))
                if mask is None:
                    where = "options.masks at the same relative path" if salt is not None else Path(self.options.masks) / rel
                    quarantine.append(QuarantineItem(str(path), "no mask", f"expected {where} (any image suffix)"))
                    continue
                extra["mask"] = str(mask)
            items.append(ManifestItem(stable_id(rel, salt=salt or ""), str(path), self._group(path.name, rel, salt or ""), label, None, extra))
        if not items:
            raise EmptyDatasetError(
                f"No usable image under {root} ({len(quarantine)} quarantined). "
                f"Expected {', '.join(IMAGE_SUFFIXES)} files, optionally in one subfolder per class."
            )
        names = self._class_names(class_dirs, salt) if use_folders else []
        return Manifest(self.name, str(root), items, quarantine, names, path_salt=salt)

    def _scan_npz(self, path: Path, max_items: int | None) -> Manifest:
        split = self.options.split or "train"
        try:
            arrays = npz_arrays(str(path))
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes a typed error
            raise DataError(f"Cannot read {path} as .npz: {exc}") from exc
        key = f"{split}_images"
        if key not in arrays:
            known = sorted(k[: -len("_images")] for k in arrays if k.endswith("_images"))
            raise DataError(f"{path} has no '{key}' array; data.options.split must be one of {known}.")
        images = arrays[key]
        labels = arrays.get(f"{split}_labels")
        _check_npz_arrays(path, key, images, labels)
        n = len(images) if not max_items else min(len(images), max_items)
        index = _spread(list(range(len(images))), n)
        salt = self._salt()
        items = []
        for i in index:
            label = int(np.asarray(labels[i]).reshape(-1)[0]) if labels is not None else None
            item_id = stable_id(path.name, split, str(i), salt=salt or "")
            items.append(ManifestItem(item_id, str(path), item_id, label, split, {"npz_key": key, "index": i}))
        if not items:
            raise EmptyDatasetError(f"{path} holds no images in '{key}'.")
        n_classes = int(labels.max()) + 1 if labels is not None else 0
        return Manifest(self.name, str(path), items, [], [str(c) for c in range(n_classes)], path_salt=salt)

    def _group(self, name: str, rel: str, salt: str = "") -> str:
        if self.options.group_pattern:
            match = re.search(self.options.group_pattern, name)
            if match:
                return stable_id(match.group(1) if match.groups() else match.group(0), salt=salt)
        return stable_id(rel, salt=salt)

    def _salt(self) -> str | None:
        """The secret salt when ``manifest_paths: token`` (ids, groups and shown paths are salted), else None."""
        return secret_salt(None, self.options.salt_env) if self.options.manifest_paths == "token" else None

    def _class_names(self, class_dirs: list[str], salt: str | None) -> list[str]:
        """Class-folder names as the manifest shows them (``class_names``): the names, or salted tokens."""
        mode = self.options.class_names
        if mode == "auto":
            mode = "token" if salt is not None else "folders"
        if mode == "folders":
            return list(class_dirs)
        return [path_token(name, salt if salt is not None else secret_salt(None, self.options.salt_env), "class") for name in class_dirs]

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Aerial RGB tiles of four land-cover classes that differ in colour, not texture, as 8-bit PNG class folders."""
        write_land_cover_folders(out_dir, seed, n_per_class, size)
        return DemoData.split_folders(
            out_dir,
            "images",
            size,
            in_chans=3,
            options={"channels": 3},
            description=(
                f"aerial RGB tiles of {len(LAND_COVER)} land-cover classes ({', '.join(LAND_COVER).replace('_', ' ')}) that differ "
                f"in colour while sharing the same textures, under per-tile illumination and haze ({size} px PNG). The embedded "
                "base was pretrained on generated fractals and taught to keep their colours (colour_vit_tiny), so its frozen "
                "features already carry the classes' colours. Two views of one tile share its colour and other tiles differ "
                "in it, so contrastive adaptation on the unlabelled tiles can make colour count for more, which matters most "
                "when few labels are available; a base pretrained on natural images (DINOv2) would start higher and gain less"
            ),
        )

    def write_predictions(self, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
        """Segmentation: ``<name>_mask.png`` (class ids) + ``<name>_overlay.png``; classification: ``predictions.csv``."""
        return write_image_predictions(model, inputs, out_dir, self.options.channels)


def write_image_predictions(model: Predictor, inputs: Path, out_dir: Path, channels: int = 3) -> list[Path]:
    """`ImageFolderDomain.write_predictions` for every image file under ``inputs`` (or the file), read one at a time."""
    files = [inputs] if inputs.is_file() else sorted(p for p in inputs.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = _images_of(files, channels)
    if model.task != "segmentation":  # read and classified one batch at a time
        rows: list[tuple] = []
        while batch := list(itertools.islice(images, model.batch_size)):
            rows += [(stem, *c) for (stem, _), c in zip(batch, model.classify([im for _, im in batch]), strict=True)]
        return [write_csv(out_dir / "predictions.csv", ["item", "class_index", "class", "probability"], rows)] if rows else []
    written: list[Path] = []
    for stem, image in images:
        classes = model.segment(image).argmax(0).numpy()
        written.append(save_png(classes.astype(np.uint8), out_dir / f"{stem}_mask.png"))
        written.append(save_png(overlay_mask(to_rgb_uint8(image), classes), out_dir / f"{stem}_overlay.png"))
    return written


def _images_of(files: list[Path], channels: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, C×H×W image) per image file, read one at a time."""
    for path in files:
        with Image.open(path) as im:
            yield path.stem, pil_to_chw(im, channels)


_NPZ_CACHE: dict[str, dict[str, np.ndarray]] = {}


def npz_arrays(path: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz, read once per process (npz members cannot be memory-mapped)."""
    if path not in _NPZ_CACHE:
        with np.load(path, allow_pickle=False) as data:
            _NPZ_CACHE[path] = {k: data[k] for k in data.files}
    return _NPZ_CACHE[path]


def _check_npz_arrays(path: Path, key: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    """An image array is N×H×W or N×H×W×C (C = 1, 3 or 4) with one label row per image."""
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise DataError(
            f"{path}: '{key}' has shape {images.shape}; expected N×H×W (grey) or N×H×W×C with C = 1, 3 or 4 "
            "(MedMNIST layout). Re-export the array in one of these layouts."
        )
    if labels is not None and len(labels) != len(images):
        label_key = key.replace("_images", "_labels")
        raise DataError(
            f"{path}: '{label_key}' has {len(labels)} labels for {len(images)} images in '{key}'; "
            "each image needs exactly one label row. Fix the arrays or drop the labels."
        )


def _mask_for(mask_root: Path, rel: Path) -> Path | None:
    """The mask file for an image at ``rel``: same relative folder and stem under ``mask_root``."""
    for suffix in (rel.suffix, *IMAGE_SUFFIXES):
        candidate = mask_root / rel.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _check_image(path: Path) -> str | None:
    """Fully decode the file (a header read passes truncated files); return the error text or None."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a quarantine reason
        return f"{type(exc).__name__}: {exc}"


def make_square(x: torch.Tensor, aspect: str, fill: float | None = None) -> torch.Tensor:
    """A ``...×H×W`` tensor made square: ``crop`` keeps the centred min(H, W) square, ``pad`` grows the
    short side evenly, filling with ``fill`` (default: each channel's mean, so no dark band marks the pad)."""
    h, w = x.shape[-2:]
    if h == w:
        return x
    if aspect == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return x[..., top : top + s, left : left + s].contiguous()
    s = max(h, w)
    out = torch.empty((*x.shape[:-2], s, s), dtype=x.dtype)
    if fill is None:
        out[:] = x.float().mean(dim=(-2, -1), keepdim=True).to(x.dtype)
    else:
        out.fill_(fill)
    top, left = (s - h) // 2, (s - w) // 2
    out[..., top : top + h, left : left + w] = x
    return out


def pil_to_chw(im: Image.Image, channels: int) -> torch.Tensor:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        scale = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = arr / scale
        arr = np.repeat(arr[None], channels, 0) if channels == 3 else arr[None]
        return torch.from_numpy(np.ascontiguousarray(arr))
    im = im.convert("L" if channels == 1 else "RGB")
    return _to_chw(np.asarray(im), channels)


def _to_chw(arr: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 H×W or H×W×C -> float32 C×H×W in [0, 1] with the requested channel count."""
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    x = torch.from_numpy(np.array(arr, copy=True)).float() / scale
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] == channels:
        return x
    if channels == 1:
        return x[:3].mean(0, keepdim=True)
    return x[:1].expand(3, -1, -1).clone()


def _spread(values: list[Any], n: int) -> list[Any]:
    """``n`` values spread evenly over the list (keeps classes balanced in sorted folders)."""
    if n >= len(values):
        return values
    idx = np.linspace(0, len(values) - 1, n).round().astype(int)
    return [values[i] for i in idx]
