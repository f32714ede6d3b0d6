"""Seeded writers of tiny real video files (PyAV, H.264/MJPEG) and their broken variants.

Frames of `counter_frames` carry their own index as the grey level of a large block, so a test can
tell which frame a decoder returned even after lossy compression.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 25,
    codec: str = "h264",
    gop: int = 6,
    times: list[float] | None = None,
    faststart: bool = True,
) -> Path:
    """Encode uint8 T×H×W×3 frames; ``times`` (seconds) gives a variable frame rate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart and path.suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "h264":
            stream.options = {"g": str(gop), "crf": "18"}
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if times is not None:
                vf.pts, vf.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    return path


def counter_frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Frames whose left half has grey level ``10 + 10 * (i % 24)``; the right half is seeded texture."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (size, size // 2, 3), dtype=np.uint8)
    frames = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i, :, : size // 2] = 10 + 10 * (i % 24)
        frames[i, :, size // 2 :] = np.roll(texture, i, axis=1)
    return frames


def frame_index(frame: np.ndarray) -> int:
    """Recover the index written by `counter_frames` from a decoded (uint8 H×W×3) frame."""
    level = float(frame[2:-2, 2 : frame.shape[1] // 2 - 2].mean())
    return int(round((level - 10) / 10))


def colonoscopy_pan(src: Path, n: int = 12, size: int = 64, border: int = 8) -> np.ndarray:
    """A camera pan across a real colonoscopy frame, with a black border around the field of view."""
    with Image.open(src) as im:
        image = np.asarray(im.convert("RGB"))
    h, w = image.shape[:2]
    side = min(h, w) * 2 // 3
    frames = np.zeros((n, size + 2 * border, size + 2 * border, 3), np.uint8)
    for t in range(n):
        # stay inside the real frame's own lit field (its black border and text sit at the edges)
        left = w // 12 + int((w - side - w // 6) * t / max(1, n - 1))
        top = (h - side) // 2
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        frames[t, border:-border, border:-border] = np.asarray(crop)
    return frames


def truncated_copy(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """The first ``keep`` of a file's bytes (an interrupted copy of a faststart MP4)."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def unsupported_codec_avi(path: Path, n: int = 4, size: int = 16) -> Path:
    """An MJPEG AVI whose codec tag is rewritten to an unknown FourCC, so no decoder exists for it."""
    write_video(path, counter_frames(n, size), fps=10, codec="mjpeg")
    path.write_bytes(path.read_bytes().replace(b"MJPG", b"QQQQ"))
    return path


def frame_folder(folder: Path, n: int = 6, size: int = 32) -> Path:
    """A folder of numbered PNG frames (frame_000.png ...), a video stored as images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(counter_frames(n, size)):
        Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
    return folder
