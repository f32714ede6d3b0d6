"""Results back out: per-frame phase CSVs, H.264 MP4s, and overlay videos with masks and phase banners."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from insitu.domains.base import IGNORE_INDEX, Predictor
from insitu.domains.images import write_image_predictions
from insitu.domains.video.options import VIDEO_SUFFIXES
from insitu.io import atomic_path, write_csv

if TYPE_CHECKING:  # the domain calls this module (VideoDomain.write_predictions)
    from insitu.domains.video.domain import VideoDomain


def write_mp4(path: Path, frames: np.ndarray | list[np.ndarray], fps: float = 25, crf: int = 23) -> Path:
    """Write uint8 H×W×3 frames as an H.264 MP4 (odd sizes are cropped by one pixel for yuv420p)."""
    from fractions import Fraction

    frames = [np.asarray(f) for f in frames]
    h, w = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("h264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w, :3]), format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def write_phase_csv(path: Path, times: list[float], predictions: list[int], class_names: list[str]) -> Path:
    """Per-frame predictions as ``frame,time_s,phase_index,phase``."""
    rows = [
        [i, f"{t:.3f}", p, class_names[p] if 0 <= p < len(class_names) else ""]
        for i, (t, p) in enumerate(zip(times, predictions, strict=True))
    ]
    return write_csv(path, ["frame", "time_s", "phase_index", "phase"], rows)


def write_overlay(
    path: Path,
    frames: np.ndarray,
    fps: float = 25,
    masks: np.ndarray | None = None,
    phases: list[str] | None = None,
    colour: tuple[int, int, int] = (255, 40, 40),
) -> Path:
    """An MP4 for a person to watch: predicted masks tinted over the frames and/or a phase banner."""
    out = []
    for t, frame in enumerate(np.asarray(frames, dtype=np.uint8)):
        img = frame.astype(np.float32)
        if masks is not None:
            on = (masks[t] > 0) & (masks[t] != IGNORE_INDEX)
            img[on] = 0.55 * img[on] + 0.45 * np.asarray(colour, np.float32)
        im = Image.fromarray(img.round().astype(np.uint8))
        if phases is not None:
            draw = ImageDraw.Draw(im)
            bar = max(10, im.height // 12)
            draw.rectangle([0, 0, im.width, bar], fill=(0, 0, 0))
            draw.text((3, max(0, bar // 2 - 5)), phases[t], fill=(255, 255, 255))
        out.append(np.asarray(im))
    return write_mp4(path, out, fps)


def write_video_predictions(domain: VideoDomain, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
    """Per video under ``inputs``: ``<name>_overlay.mp4`` (masks, or a class banner) and ``<name>_frames.csv``.

    Every frame is predicted (decoded at ``decode_size``, the field of view not cropped). A folder without
    videos (image/mask pairs, frame folders) is predicted as images, from its ``images/`` folder when it has one.
    """
    videos = [inputs] if inputs.is_file() else sorted(p for p in inputs.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        return write_image_predictions(model, inputs / "images" if (inputs / "images").is_dir() else inputs, out_dir)
    domain = domain.with_options(crop_fov=False)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    written = []
    for path in videos:
        info = domain.info(str(path))
        frames = domain.read_frames(str(path), list(range(len(info.times))))  # T×H×W×3 uint8 at decode_size
        images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        fps = len(info.times) / max(info.duration, 1e-6) if len(info.times) > 1 else 25.0
        if model.task == "segmentation":
            masks = np.stack([model.segment(im).argmax(0).numpy() for im in images])
            written.append(write_overlay(out_dir / f"{path.stem}_overlay.mp4", frames, fps, masks=masks))
            fractions = [round(float((m > 0).mean()), 4) for m in masks]
            rows = [(i, f"{t:.3f}", f) for i, (t, f) in enumerate(zip(info.times, fractions, strict=True))]
            written.append(write_csv(out_dir / f"{path.stem}_frames.csv", ["frame", "time_s", "foreground_fraction"], rows))
        else:
            preds = [c[0] for c in model.classify(list(images))]
            written.append(write_overlay(out_dir / f"{path.stem}_overlay.mp4", frames, fps, phases=[names[p] for p in preds]))
            written.append(write_phase_csv(out_dir / f"{path.stem}_frames.csv", list(info.times), preds, names))
    return written
