"""Finding sources and indexing them: demux a video (no decoding) or list a folder of numbered frames.

A probe yields a `VideoInfo`: every frame's presentation time, the keyframes, and the field of
view found on the first frame. Frames are sampled at a target fps by these times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from insitu.domains.video.fov import detect_fov, mask_text
from insitu.domains.video.options import FRAME_SUFFIXES, VIDEO_SUFFIXES, VideoError, VideoOptions


@dataclass
class VideoInfo:
    """What a demux pass learnt about one video: per-frame times (seconds, presentation order)."""

    path: str
    times: list[float]
    pts: list[int]
    width: int
    height: int
    codec: str
    fov: tuple[int, int, int, int]  # top, left, height, width in source pixels
    keyframes: list[int] | None = None  # presentation indices of keyframes (None: every frame)

    def gop_end(self, index: int) -> int:
        """The last frame before the next keyframe after ``index`` (decoding up to it costs no seek)."""
        if self.keyframes is None:
            return index
        later = [k for k in self.keyframes if k > index]
        return (later[0] if later else len(self.times)) - 1

    @property
    def duration(self) -> float:
        return self.times[-1] if self.times else 0.0


def find_sources(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(video files, folders of numbered frames, Kvasir-style folders with images/ and masks/)."""
    videos = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    seg_dirs, frame_dirs = [], []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            seg_dirs.append(folder)
        elif folder.name not in ("images", "masks") and numbered_frames(folder):
            frame_dirs.append(folder)
    return videos, frame_dirs, seg_dirs


def numbered_frames(folder: Path) -> list[Path]:
    """Image files named ``<prefix><number>`` with one shared prefix, in number order (else [])."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    parts = [re.fullmatch(r"(.*?)(\d+)", p.stem) for p in files]
    if len(files) < 2 or not all(parts) or len({m.group(1) for m in parts}) != 1:
        return []  # e.g. a folder of unrelated photos with hash names is not a video
    return [p for _, p in sorted(zip([int(m.group(2)) for m in parts], files, strict=True))]


def probe_video(path: Path, opts: VideoOptions) -> VideoInfo:
    """Demux (no decode) to index every frame by timestamp; check the codec and the file's end."""
    if path.is_dir():
        return _probe_frame_folder(path, opts)
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes). Re-copy or re-export the recording.")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoError(f"{path} cannot be opened as a video: {exc}. Check the file is a complete MP4/AVI/MKV.") from exc
    with container:
        if not container.streams.video:
            raise VideoError(f"{path} holds no video stream.")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            tag = stream.codec_tag if hasattr(stream, "codec_tag") else "?"
            raise VideoError(
                f"{path}: unsupported codec (tag {tag!r}, no decoder in PyAV). Transcode to H.264, e.g. with ffmpeg -c:v libx264."
            )
        declared = stream.frames
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size > 0]
    pts = sorted(p for p, _ in packets)
    key_pts = {p for p, key in packets if key}
    if not pts:
        raise VideoError(f"{path} has a video stream with no frames.")
    if declared and len(pts) < declared:
        last = _last_decodable(path)
        raise VideoError(
            f"{path} is truncated: the header declares {declared} frames but the data stops; the last good frame is "
            f"{last} (of {len(pts)} demuxed). Re-copy the file or re-export it from the recorder."
        )
    times, width, height, codec, first = _first_frame(path, pts)
    fov = detect_fov(mask_text(first, opts.text_boxes), opts.fov_threshold) if opts.crop_fov else (0, 0, height, width)
    keyframes = [i for i, p in enumerate(pts) if p in key_pts]
    return VideoInfo(str(path), times, pts, width, height, codec, fov, keyframes)


def _first_frame(path: Path, pts: list[int]) -> tuple[list[float], int, int, str, np.ndarray]:
    """Timestamps in seconds and the first decoded frame (proves the decoder works)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base = float(stream.time_base)
        try:
            first = next(container.decode(stream)).to_ndarray(format="rgb24")
        except (av.FFmpegError, StopIteration) as exc:
            raise VideoError(f"{path}: the first frame does not decode ({exc}). The file is damaged or its codec unsupported.") from exc
        codec = stream.codec_context.name
    start = pts[0]
    return [(p - start) * base for p in pts], first.shape[1], first.shape[0], codec, first


def _last_decodable(path: Path) -> int:
    """Index of the last frame that decodes before the decoder fails (-1 when none does)."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
    except av.FFmpegError:
        pass
    return count - 1


def _probe_frame_folder(folder: Path, opts: VideoOptions) -> VideoInfo:
    files = numbered_frames(folder)
    try:
        with Image.open(files[0]) as im:
            first = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any PIL failure makes the folder unusable
        raise VideoError(f"{files[0]}: first frame does not decode ({type(exc).__name__}: {exc}).") from exc
    h, w = first.shape[:2]
    fov = detect_fov(mask_text(first, opts.text_boxes), opts.fov_threshold) if opts.crop_fov else (0, 0, h, w)
    times = [i / opts.frames_fps for i in range(len(files))]
    return VideoInfo(str(folder), times, list(range(len(files))), w, h, "frames", fov)


def sample_at_fps(times: list[float], fps: float) -> list[int]:
    """Indices of the frames nearest to 0, 1/fps, 2/fps, ... (by timestamp, so VFR is handled)."""
    t = np.asarray(times)
    targets = np.arange(0.0, t[-1] + 1e-9, 1.0 / fps)
    idx = np.clip(np.searchsorted(t, targets), 0, len(t) - 1)
    prev = np.clip(idx - 1, 0, len(t) - 1)
    nearest = np.where(np.abs(t[prev] - targets) <= np.abs(t[idx] - targets), prev, idx)
    return sorted(set(nearest.tolist()))
