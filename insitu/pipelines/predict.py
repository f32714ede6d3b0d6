"""Run a fine-tuned downstream model over new data and write each domain's own output format.

Large inputs are covered by overlapping tiles blended with tent weights (``sliding_window``), so
any image size works with the model's input size. Outputs go through the domain writers: GeoTIFF
class maps with the source georeferencing (bounded memory: one tile row is held at a time),
DICOM-SEG referencing the source series, PNG masks and overlays, overlay MP4 + per-frame CSV.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from insitu.domains import create_domain
from insitu.domains.geotiff import grid_offsets
from insitu.domains.geotiff.write import tent_weights
from insitu.domains.normalize import Normalizer
from insitu.errors import ConfigError
from insitu.exports.overlays import overlay_mask, save_png, to_rgb_uint8
from insitu.io import claim_folder, write_csv
from insitu.pipelines.data import model_input
from insitu.pipelines.finetune import DownstreamModel
from insitu.pipelines.head_folder import load_head
from insitu.registry import WRITERS

log = logging.getLogger("insitu")
TilePredictor = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith(("cuda", "gpu")) and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu (or auto).")
    return torch.device(device.replace("gpu", "cuda"))


def make_predictor(
    model: DownstreamModel, norm: Normalizer | None, size: int, device: torch.device | None = None, channels: int | None = None
) -> TilePredictor:
    """C×h×w tiles (physical units) -> K×h×w probabilities on the CPU: normalise, resize, run as one batch on ``device``.

    ``channels``: the channel count the model was trained on; a tile with another count is a `ConfigError`.

    On a GPU the model runs under bf16 autocast when the device supports it; scores come back as float32.
    """
    device = device or torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    @torch.no_grad()
    def predict(tiles: list[torch.Tensor]) -> list[torch.Tensor]:
        if channels is not None and any(t.shape[0] != channels for t in tiles):
            raise ConfigError(
                f"the model was trained on {channels}-channel input but this input has {tiles[0].shape[0]} channels; "
                "pass the domain options it was trained with (--option channels=... / bands=...)."
            )
        batch = torch.stack([model_input(t, norm, size) for t in tiles]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch).float()
        out = []
        for tile, scores in zip(tiles, logits, strict=True):
            scores = scores.cpu()
            if scores.ndim == 3:  # segmentation: back to the tile's own size
                scores = F.interpolate(scores[None], size=tuple(tile.shape[-2:]), mode="bilinear", align_corners=False)[0]
            out.append(scores.softmax(0))
        return out

    return predict


def sliding_window(
    predict: TilePredictor, image: torch.Tensor, tile: int, overlap: float, num_classes: int, batch_size: int = 16
) -> torch.Tensor:
    """K×H×W scores of a C×H×W image from overlapping ``tile``-sized windows, tent-weighted, ``batch_size`` windows per pass.

    An image no larger than one tile is predicted in a single pass (identical output).
    """
    _, h, w = image.shape
    th, tw = min(tile, h), min(tile, w)
    step = max(1, round(tile * (1 - overlap)))
    acc = torch.zeros(num_classes, h, w)
    wsum = torch.zeros(h, w)
    weight = torch.from_numpy(tent_weights(th, tw))
    windows = [(y, x) for y in grid_offsets(h, th, step) for x in grid_offsets(w, tw, step)]
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        for (y, x), scores in zip(chunk, predict([image[:, y : y + th, x : x + tw] for y, x in chunk]), strict=True):
            acc[:, y : y + th, x : x + tw] += scores * weight
            wsum[y : y + th, x : x + tw] += weight
    return acc / wsum


def predict(
    model_dir: Path,
    inputs: Path,
    out_dir: Path,
    domain: str | None = None,
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    batch_size: int = 16,
) -> list[Path]:
    """Predict every item under ``inputs`` with the model ``insitu finetune`` saved; returns written files.

    The model runs on ``device`` in batches of ``batch_size`` tiles or images (memory stays bounded by
    one batch, plus one image or one GeoTIFF tile row).
    """
    model, meta, norm = load_head(model_dir)
    meta = {**meta, "_device": resolve_device(device), "_batch": int(batch_size)}
    name = domain or meta["domain"]
    opts = {**(meta.get("domain_options") or {}), **(options or {})} if name == meta["domain"] else dict(options or {})
    writer = WRITERS.get(name)
    out_dir = Path(out_dir)
    folder = claim_folder(out_dir, "predict", overwrite)
    # tile_size is a geotiff domain option; elsewhere it sets the sliding window, which by default
    # covers the whole image, as training saw whole images resized to image_size
    opts["_tile"] = int((opts.get("tile_size") or meta["image_size"]) if name == "geotiff" else (opts.pop("tile_size", None) or 1 << 30))
    try:
        return writer(model, meta, norm, Path(inputs), out_dir, opts)
    finally:
        folder.record()


def _seg_only(meta: dict[str, Any], what: str) -> None:
    if meta["task"] != "segmentation":
        raise ConfigError(f"{what} needs a segmentation model; this one was trained for {meta['task']}.")


@WRITERS.register("geotiff")
def _write_geotiff(model: DownstreamModel, meta: dict, norm: Normalizer, inputs: Path, out: Path, opts: dict) -> list[Path]:
    """Whole scenes to georeferenced uint8 class maps (+ float probabilities), tile row by tile row."""
    from insitu.domains.geotiff.write import predict_scene

    _seg_only(meta, "GeoTIFF prediction")
    tile = opts.pop("_tile")
    domain = create_domain("geotiff", opts)
    refs, _ = domain.discover(inputs) if inputs.is_dir() else ([str(inputs)], [])
    size = meta["image_size"]
    written = []
    for ref in refs:
        stem = Path(getattr(ref, "path", ref) or "scene").stem
        dst = out / f"{stem}_classes.tif"
        batched = make_predictor(model, norm, size, meta["_device"], meta["in_chans"])
        predict_scene(domain, ref, lambda t, p=batched: p([t])[0], dst, meta["num_classes"], tile_size=tile, overlap=tile // 4)
        written.append(dst)
    return written


def _images_of(inputs: Path, opts: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, C×H×W image) per image file, read one at a time."""
    from PIL import Image

    from insitu.domains.images import IMAGE_SUFFIXES, pil_to_chw

    files = [inputs] if inputs.is_file() else sorted(p for p in inputs.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    channels = int(opts.get("channels", 3))
    for path in files:
        with Image.open(path) as im:
            yield path.stem, pil_to_chw(im, channels)


@WRITERS.register("images")
def _write_images(model: DownstreamModel, meta: dict, norm: Normalizer, inputs: Path, out: Path, opts: dict) -> list[Path]:
    """Segmentation: ``<name>_mask.png`` (class ids) + ``<name>_overlay.png``; classification: ``predictions.csv``."""
    predictor = make_predictor(model, norm, meta["image_size"], meta["_device"], meta["in_chans"])
    written: list[Path] = []
    images = _images_of(inputs, opts)
    if meta["task"] != "segmentation":  # read and classified one batch at a time
        rows: list[tuple] = []
        while batch := list(itertools.islice(images, meta["_batch"])):
            rows += [(stem, *c) for (stem, _), c in zip(batch, _classify(predictor, [im for _, im in batch], meta), strict=True)]
        return [_write_rows(out / "predictions.csv", ["item", "class_index", "class", "probability"], rows)] if rows else []
    for stem, image in images:
        classes = sliding_window(predictor, image, opts["_tile"], 0.25, meta["num_classes"], meta["_batch"]).argmax(0).numpy()
        written.append(save_png(classes.astype(np.uint8), out / f"{stem}_mask.png"))
        written.append(save_png(overlay_mask(to_rgb_uint8(image), classes), out / f"{stem}_overlay.png"))
    return written


def _classify(predictor: TilePredictor, images: list[torch.Tensor], meta: dict) -> list[tuple[int, str, float]]:
    """(class index, class name, probability) per image, ``meta['_batch']`` images per pass."""
    names = meta.get("class_names") or []
    out = []
    for i in range(0, len(images), meta["_batch"]):
        for probs in predictor(images[i : i + meta["_batch"]]):
            k = int(probs.argmax())
            out.append((k, names[k] if k < len(names) else str(k), round(float(probs[k]), 4)))
    return out


def _write_rows(path: Path, header: list[str], rows: list[tuple]) -> Path:
    return write_csv(path, header, rows)


@WRITERS.register("video")
def _write_video(model: DownstreamModel, meta: dict, norm: Normalizer, inputs: Path, out: Path, opts: dict) -> list[Path]:
    """Videos: an overlay MP4 (masks or class banner) and a per-frame CSV; image/mask folders: as images."""
    from insitu.domains.video import VIDEO_SUFFIXES, write_overlay, write_phase_csv

    videos = [inputs] if inputs.is_file() else sorted(p for p in inputs.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        return _write_images(model, meta, norm, inputs / "images" if (inputs / "images").is_dir() else inputs, out, opts)
    domain = create_domain("video", {**{k: v for k, v in opts.items() if k != "_tile"}, "crop_fov": False})
    written = []
    for path in videos:
        info = domain.info(str(path))
        frames = domain.read_frames(str(path), list(range(len(info.times))))  # T×H×W×3 uint8 at decode_size
        images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        fps = len(info.times) / max(info.duration, 1e-6) if len(info.times) > 1 else 25.0
        names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
        predictor = make_predictor(model, norm, meta["image_size"], meta["_device"], meta["in_chans"])
        if meta["task"] == "segmentation":
            tile, batch = opts["_tile"], meta["_batch"]
            masks = np.stack([sliding_window(predictor, im, tile, 0.25, meta["num_classes"], batch).argmax(0).numpy() for im in images])
            written.append(write_overlay(out / f"{path.stem}_overlay.mp4", frames, fps, masks=masks))
            fractions = [round(float((m > 0).mean()), 4) for m in masks]
            rows = [(i, f"{t:.3f}", f) for i, (t, f) in enumerate(zip(info.times, fractions, strict=True))]
            written.append(_write_rows(out / f"{path.stem}_frames.csv", ["frame", "time_s", "foreground_fraction"], rows))
        else:
            preds = [c[0] for c in _classify(predictor, list(images), meta)]
            written.append(write_overlay(out / f"{path.stem}_overlay.mp4", frames, fps, phases=[names[p] for p in preds]))
            written.append(write_phase_csv(out / f"{path.stem}_frames.csv", list(info.times), preds, names))
    return written


@WRITERS.register("dicom")
def _write_dicom(model: DownstreamModel, meta: dict, norm: Normalizer, inputs: Path, out: Path, opts: dict) -> list[Path]:
    """CT/MR series slice by slice to one DICOM-SEG per series, referencing the source instances."""
    from insitu.domains.dicom_seg import write_seg

    _seg_only(meta, "DICOM-SEG export")
    domain = create_domain("dicom", {**{k: v for k, v in opts.items() if k != "_tile"}, "plane": "acquisition", "sample": "slice"})
    manifest = domain.scan(inputs)
    predictor = make_predictor(model, norm, meta["image_size"], meta["_device"], meta["in_chans"])
    by_unit: dict[str, list] = {}
    for item in manifest.items:
        by_unit.setdefault(item.extra["unit"], []).append(item)
    written = []
    for n, (key, items) in enumerate(by_unit.items()):
        unit = domain.units[key]
        rows, cols = domain.volume(unit).array.shape[-2:]
        masks = []
        for item in sorted(items, key=lambda i: i.extra["index"]):
            image = domain.load(item, manifest)["image"]
            scores = sliding_window(predictor, image, opts["_tile"], 0.25, meta["num_classes"], meta["_batch"])
            scores = F.interpolate(scores[None], size=(rows, cols), mode="bilinear", align_corners=False)[0]
            masks.append(scores.argmax(0).numpy())
        if len(masks) != len(unit.files):
            log.warning("series %d: %d slices for %d files (multi-frame source); skipped DICOM-SEG", n, len(masks), len(unit.files))
            continue
        names = (meta.get("class_names") or [])[1:] or None
        written.append(write_seg(np.stack(masks), unit.files, out / f"series_{n:03d}_seg.dcm", segment_names=names))
    return written
