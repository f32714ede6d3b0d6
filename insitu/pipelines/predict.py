"""Run a fine-tuned downstream model over new data; the domain writes its own output format.

Large inputs are covered by overlapping tiles blended with tent weights (``sliding_window``), so
any image size works with the model's input size. This module turns the saved model into a
`Predictor` (device, batches, windows); each domain's ``write_predictions`` reads its inputs and
writes its format: GeoTIFF class maps with the source georeferencing (bounded memory: one tile row
is held at a time), DICOM-SEG referencing the source series, PNG masks and overlays or
``predictions.csv``, overlay MP4 + per-frame CSV.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from insitu.domains import get_domain_class
from insitu.domains.base import Predictor
from insitu.domains.geotiff import grid_offsets
from insitu.domains.geotiff.write import tent_weights
from insitu.domains.normalize import Normalizer
from insitu.errors import ConfigError
from insitu.io import claim_folder
from insitu.pipelines.data import model_input
from insitu.pipelines.downstream_model import DownstreamModel
from insitu.pipelines.head_folder import load_head
from insitu.registry import DOMAINS, validated

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
    one batch, plus one image or one GeoTIFF tile row). A domain without an output format is a `ConfigError`.
    """
    model, meta, norm = load_head(model_dir)
    name = domain or meta["domain"]
    opts = {**(meta.get("domain_options") or {}), **(options or {})} if name == meta["domain"] else dict(options or {})
    # tile_size is an option of a domain that has one (geotiff: its tiles); elsewhere it sets the sliding window,
    # which by default covers the whole image, as training saw whole images resized to image_size
    options_model = DOMAINS.options(name)
    window = None if "tile_size" in options_model.model_fields else opts.pop("tile_size", None)
    target = get_domain_class(name)(validated(options_model, opts, "", f"of the {name!r} domain (insitu predict --option)"))
    predictor = prediction_model(model, meta, norm, resolve_device(device), int(batch_size), int(window or 1 << 30))
    out_dir = Path(out_dir)
    folder = claim_folder(out_dir, "predict", overwrite)
    try:
        return target.write_predictions(predictor, Path(inputs), out_dir)
    finally:
        folder.record()


def prediction_model(
    model: DownstreamModel, meta: dict[str, Any], norm: Normalizer | None, device: torch.device, batch_size: int, window: int
) -> Predictor:
    """The saved model (``head.json``'s ``meta``) as a domain's `Domain.write_predictions` runs it."""
    tiles = make_predictor(model, norm, meta["image_size"], device, meta["in_chans"])
    k = meta["num_classes"]
    return Predictor(
        task=meta["task"],
        num_classes=k,
        class_names=meta.get("class_names") or [],
        image_size=meta["image_size"],
        batch_size=batch_size,
        predict=tiles,
        segment=lambda image: sliding_window(tiles, image, window, 0.25, k, batch_size),
    )
