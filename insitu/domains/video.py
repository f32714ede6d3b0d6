"""Surgical/endoscopic video: MP4/AVI/MKV files and folders of numbered frames, as frames or clips.

Reading goes through PyAV. A scan demuxes each video's packets (no decoding) to get every
frame's presentation time, so variable frame rates are handled by timestamps, frames are sampled
at a target fps by time, and any frame can be reached by seeking to its timestamp. Decoded frames
(after text masking, field-of-view crop and downsizing) are kept as uint8 in a per-process cache,
so epochs after the first do not decode again.

Items are single frames (``mode: frames``, C×H×W, the default used by the probe and quickstart)
or clips (``mode: clips``, T×C×H×W windows for the temporal objectives). The group of every item
is its video (case), so splits never put frames of one case on both sides.

Labels: Cholec80-style per-frame phase files (``<video>-phase.txt``: ``Frame<TAB>Phase``) or CSV
with times (``<video>-phase.csv``: ``time,phase``), tool-presence tables (``<video>-tool.txt``),
class subfolders (``labels: folders``), and Kvasir-style ``images/`` + ``masks/`` folders for frame
segmentation. Results go back out as a per-frame phase CSV and an overlay MP4.
"""

from __future__ import annotations

import csv
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import Field

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
from insitu.domains.masks import read_binary_mask
from insitu.domains.synthetic import SHAPES, _shape_mask, _smooth_noise
from insitu.errors import ConfigError, DataError, EmptyDatasetError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ANNOTATION_SUFFIXES = ("-phase.txt", "_phase.txt", "-phase.csv", "_phase.csv")
TOOL_SUFFIXES = ("-tool.txt", "_tool.txt")


class VideoError(DataError):
    """A video cannot be used: empty, unsupported codec, truncated, or inconsistent annotations."""


class VideoOptions(DomainOptions):
    mode: Literal["frames", "clips"] = "frames"
    fps: float = Field(1.0, gt=0)
    max_frames_per_video: int | None = Field(None, gt=0)
    clip_frames: int = Field(16, gt=0)
    stride: int = Field(1, gt=0)
    clip_step: int | None = Field(None, gt=0)
    decode_size: int = Field(128, gt=0)
    crop_fov: bool = True
    fov_threshold: int = Field(20, ge=0, le=255)
    text_boxes: list[tuple[float, float, float, float]] = Field(default_factory=list)
    labels: Literal["auto", "phases", "folders", "none"] = "auto"
    phases: list[str] | None = None
    frames_fps: float = Field(25.0, gt=0)
    source_weights: dict[str, float] | None = None
    cache_mb: int = Field(1024, ge=0)
    mask_threshold: int = Field(127, ge=0, le=255)


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


class VideoDomain(Domain):
    """Endoscopic recordings as frames or clips, plus Kvasir-style image/mask pairs.

    Options (``data.options``):
        mode: ``frames`` (C×H×W items sampled at ``fps``) or ``clips`` (T×C×H×W windows of
            ``clip_frames`` frames, every ``stride``-th source frame, a window every ``clip_step``).
        fps: frames per second of video taken in frames mode (by timestamp, so VFR is fine).
        max_frames_per_video: cap on frames mode items per video (spread evenly).
        decode_size: frames are downsized so their short side is at most this (cache size).
        crop_fov: crop the black border / circular field of view (found on the first frame).
        fov_threshold: uint8 level above which a pixel is inside the field of view.
        text_boxes: on-screen text regions ``[x0, y0, x1, y1]`` as fractions of the frame, blacked out.
        labels: ``phases`` (annotation files), ``folders`` (class subfolders), ``none``;
            ``auto`` uses phases when any annotation file exists.
        phases: the phase names in class order (default: order of first appearance).
        frames_fps: frame rate of folders of numbered frames.
        source_weights: sampling weight per source (first subfolder under the root) for pretraining.
        cache_mb: size of the per-process decoded-frame cache.
    """

    name = "video"
    Options = VideoOptions

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a folder. Point data.root at a folder of videos (MP4/AVI/MKV) or frame folders.")
        videos, frame_dirs, seg_dirs = find_sources(root)
        annotated = any(_annotation_file(p) for p in videos + frame_dirs)
        use_phases = self.options.labels == "phases" or (self.options.labels == "auto" and annotated)
        class_dirs = self._class_dirs(root, videos + frame_dirs)
        phase_names = list(self.options.phases or [])
        items: list[ManifestItem] = []
        quarantine: list[QuarantineItem] = []
        for source in videos + frame_dirs:
            try:
                items += self._scan_video(root, source, use_phases, phase_names, class_dirs)
            except VideoError as exc:
                quarantine.append(QuarantineItem(str(source), _reason(exc), str(exc)))
        skipped = [QuarantineItem(str(d), "image/mask pairs are not clips", "use mode: frames to read them") for d in seg_dirs]
        for seg_dir in seg_dirs if self.options.mode == "frames" else []:
            seg_items, seg_bad = self._scan_segmentation(root, seg_dir)
            items += seg_items
            quarantine += seg_bad
        if not items:
            raise EmptyDatasetError(
                f"No usable video, frame folder or image/mask pair under {root} ({len(quarantine)} quarantined). "
                f"Expected {', '.join(VIDEO_SUFFIXES)} files, folders of numbered frames, or images/ + masks/ folders."
            )
        self._check_source_weights(items)
        if max_items and len(items) > max_items:
            idx = np.linspace(0, len(items) - 1, max_items).round().astype(int)
            items = [items[i] for i in idx]
        names = phase_names if use_phases else class_dirs
        return Manifest(self.name, str(root), items, quarantine, names, skipped if self.options.mode == "clips" else [])

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        kind = item.extra.get("kind")
        meta = {"domain": self.name, "item_id": item.item_id, "group": item.group}
        if kind == "seg":
            image, mask = self._load_pair(item)
            return {"image": image, "mask": mask, "meta": meta}
        indices = item.extra["indices"] if "indices" in item.extra else [item.extra["index"]]
        frames = self.read_frames(item.path, indices)
        # transpose the uint8 array first: converting a permuted tensor to float is ~50x slower
        clip = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))).float().div_(255.0)
        sample: Sample = {"image": clip if kind == "clip" else clip[0], "meta": {**meta, "frame": indices[0], "time": item.extra["time"]}}
        if item.label is not None:
            sample["label"] = item.label
        if "tools" in item.extra:
            sample["tools"] = torch.tensor(item.extra["tools"], dtype=torch.float32)
        return sample

    def sample_weights(self, items: list[ManifestItem]) -> list[float] | None:
        """Per-item sampling weights so each source is drawn in proportion to its weight, whatever its size."""
        weights = self.options.source_weights
        if not weights:
            return None
        counts: dict[str, int] = {}
        for item in items:
            counts[item.extra.get("source", ".")] = counts.get(item.extra.get("source", "."), 0) + 1
        return [weights.get(i.extra.get("source", "."), 1.0) / counts[i.extra.get("source", ".")] for i in items]

    # --- reading -------------------------------------------------------------------------------

    def info(self, path: str) -> VideoInfo:
        """The demux index of a video or frame folder (cached per process)."""
        key = self._info_key(path)
        if key not in _INFO:
            _INFO[key] = probe_video(Path(path), self.options)
        return _INFO[key]

    def _info_key(self, path: str) -> tuple:
        o = self.options
        return path, o.crop_fov, o.fov_threshold, tuple(map(tuple, o.text_boxes)), o.frames_fps

    def read_frames(self, path: str, indices: list[int]) -> np.ndarray:
        """uint8 T×H×W×3 frames at these indices (presentation order), decoded once then cached."""
        info = self.info(path)
        cache = _frame_cache(self.options.cache_mb)
        key = (path, self.options.decode_size, self.options.crop_fov, tuple(map(tuple, self.options.text_boxes)))
        missing = sorted({i for i in indices if (key, i) not in cache})
        if missing:
            # frames other items need that are decoded on the way anyway are kept too, so reading
            # a video's items in order decodes each group of pictures once
            end = info.gop_end(missing[-1])
            keep = {i for i in self._used_frames(path) if missing[0] <= i <= end and (key, i) not in cache}
            for index, frame in decode_frames(info, missing, self.options, keep).items():
                cache.put((key, index), frame)
        return np.stack([cache.get((key, i)) for i in indices])

    def _used_frames(self, path: str) -> set[int]:
        """Every frame index some item of this video reads (under this domain's options)."""
        used = self.__dict__.setdefault("_used", {})
        if path not in used:
            used[path] = {i for clip in self._item_frames(self.info(path)) for i in clip}
        return used[path]

    def _load_pair(self, item: ManifestItem) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(item.path) as im:
            image = _downsize(np.asarray(im.convert("RGB")), self.options.decode_size)
        mask = read_binary_mask(item.extra["mask"], image.shape[:2], self.options.mask_threshold)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, mask

    # --- scanning ------------------------------------------------------------------------------

    def _class_dirs(self, root: Path, sources: list[Path]) -> list[str]:
        if self.options.labels != "folders":
            return []
        dirs = sorted({p.relative_to(root).parts[0] for p in sources if len(p.relative_to(root).parts) > 1})
        if not dirs:
            raise DataError(f"data.options.labels is 'folders' but {root} has no class subfolders holding videos.")
        return dirs

    def _scan_video(self, root: Path, path: Path, use_phases: bool, phase_names: list[str], class_dirs: list[str]) -> list[ManifestItem]:
        info = probe_video(path, self.options)
        _INFO[self._info_key(str(path))] = info
        rel = path.relative_to(root).as_posix()
        group = stable_id(rel)
        phases = _frame_phases(path, info, phase_names, fixed=bool(self.options.phases)) if use_phases else None
        tools = read_tool_table(path, info) if _tool_file(path) else None
        label = class_dirs.index(rel.split("/")[0]) if class_dirs and "/" in rel else None
        source = rel.split("/")[0] if "/" in rel else "."
        items = []
        for indices in self._item_frames(info):
            mid = indices[len(indices) // 2]
            extra: dict = {"kind": "clip", "indices": indices} if self.options.mode == "clips" else {"kind": "frame", "index": mid}
            extra.update(time=round(info.times[indices[0]], 4), source=source)
            if tools is not None:
                extra["tools"] = tools[mid]
            item_label = phases[mid] if phases is not None else label
            if phases is not None and item_label is None:
                continue  # frames before the first annotation carry no phase
            items.append(ManifestItem(stable_id(rel, str(indices[0])), str(path), group, item_label, None, extra))
        if not items:
            raise VideoError(f"{path}: no frame or clip fits ({len(info.times)} frames); lower data.options.clip_frames or stride.")
        return items

    def _item_frames(self, info: VideoInfo) -> list[list[int]]:
        o = self.options
        n = len(info.times)
        if o.mode == "clips":
            span = (o.clip_frames - 1) * o.stride + 1
            step = o.clip_step or span
            return [list(range(s, s + span, o.stride)) for s in range(0, n - span + 1, step)]
        frames = sample_at_fps(info.times, o.fps)
        if o.max_frames_per_video and len(frames) > o.max_frames_per_video:
            idx = np.linspace(0, len(frames) - 1, o.max_frames_per_video).round().astype(int)
            frames = [frames[i] for i in idx]
        return [[f] for f in frames]

    def _scan_segmentation(self, root: Path, folder: Path) -> tuple[list[ManifestItem], list[QuarantineItem]]:
        masks = {p.stem: p for p in (folder / "masks").iterdir() if p.suffix.lower() in FRAME_SUFFIXES}
        items, bad = [], []
        for image in sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in FRAME_SUFFIXES):
            if image.stem not in masks:
                bad.append(QuarantineItem(str(image), "no mask", f"expected a mask named {image.stem}.* in {folder / 'masks'}"))
                continue
            problem = _check_pair(image, masks[image.stem])
            if problem:
                bad.append(QuarantineItem(str(image), "cannot decode image/mask pair", problem))
                continue
            rel = image.relative_to(root).as_posix()
            source = rel.split("/")[0] if rel.count("/") > 1 else "."
            extra = {"kind": "seg", "mask": str(masks[image.stem]), "time": 0.0, "source": source}
            items.append(ManifestItem(stable_id(rel), str(image), stable_id(rel), None, None, extra))
        return items, bad

    def _check_source_weights(self, items: list[ManifestItem]) -> None:
        sources = {i.extra.get("source", ".") for i in items}
        unknown = sorted(set(self.options.source_weights or {}) - sources)
        if unknown:
            raise ConfigError(
                f"data.options.source_weights names {unknown}, which hold no usable item; the sources found are {sorted(sources)}."
            )

    # --- demo ----------------------------------------------------------------------------------

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Seeded H.264 MP4s of moving textured shapes: one shape per video, class = shape, group = video."""
        rng = np.random.default_rng(seed)
        per_class = {"train": max(2, n_per_class // 8), "test": max(2, n_per_class // 16)}
        for split, n_videos in per_class.items():
            for label, shape in enumerate(SHAPES):
                for v in range(n_videos):
                    frames = moving_shape_frames(rng, label, size, n_frames=16)
                    write_mp4(out_dir / split / shape / f"{shape}_{v:03d}.mp4", frames, fps=8)
        options = {"labels": "folders", "fps": 4.0, "crop_fov": False, "decode_size": size}
        train = {"domain": "video", "root": str(out_dir / "train"), "options": options, "image_size": size}
        test = {"domain": "video", "root": str(out_dir / "test"), "options": options, "image_size": size}
        return DemoData(
            data=train,
            probe_train=train,
            probe_test=test,
            in_chans=3,
            description=f"H.264 videos of moving textured shapes ({', '.join(SHAPES)}), {size}px, 2 s at 8 fps",
        )


# --- demux, decode, cache ----------------------------------------------------------------------

_INFO: dict[tuple, VideoInfo] = {}


class FrameCache:
    """A byte-bounded LRU of decoded uint8 frames, per process (each DataLoader worker has its own)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def __contains__(self, key: tuple) -> bool:
        return key in self._data

    def get(self, key: tuple) -> np.ndarray:
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: tuple, frame: np.ndarray) -> None:
        if key in self._data:
            return
        self._data[key] = frame
        self.bytes += frame.nbytes
        while self.bytes > self.max_bytes and len(self._data) > 1:
            _, old = self._data.popitem(last=False)
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0


_CACHE: FrameCache | None = None


def _frame_cache(cache_mb: int) -> FrameCache:
    global _CACHE
    if _CACHE is None or _CACHE.max_bytes != cache_mb * 2**20:
        _CACHE = FrameCache(cache_mb * 2**20)
    return _CACHE


def find_sources(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(video files, folders of numbered frames, Kvasir-style folders with images/ and masks/)."""
    videos = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    seg_dirs, frame_dirs = [], []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            seg_dirs.append(folder)
        elif folder.name not in ("images", "masks") and _numbered_frames(folder):
            frame_dirs.append(folder)
    return videos, frame_dirs, seg_dirs


def _numbered_frames(folder: Path) -> list[Path]:
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
    files = _numbered_frames(folder)
    try:
        with Image.open(files[0]) as im:
            first = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any PIL failure makes the folder unusable
        raise VideoError(f"{files[0]}: first frame does not decode ({type(exc).__name__}: {exc}).") from exc
    h, w = first.shape[:2]
    fov = detect_fov(mask_text(first, opts.text_boxes), opts.fov_threshold) if opts.crop_fov else (0, 0, h, w)
    times = [i / opts.frames_fps for i in range(len(files))]
    return VideoInfo(str(folder), times, list(range(len(files))), w, h, "frames", fov)


def decode_frames(info: VideoInfo, indices: list[int], opts: VideoOptions, keep: set[int] | None = None) -> dict[int, np.ndarray]:
    """Decode the frames at sorted ``indices`` (plus any in ``keep`` met on the way): seek, decode forward."""
    if info.codec == "frames":
        files = _numbered_frames(Path(info.path))
        out = {}
        for i in indices:
            with Image.open(files[i]) as im:
                out[i] = _prepare(np.asarray(im.convert("RGB")), info, opts)
        return out
    wanted = {info.pts[i]: i for i in {*indices, *(keep or ())}}
    last_pts = max(wanted)
    out = {}
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        container.seek(info.pts[indices[0]], stream=stream, backward=True, any_frame=False)
        try:
            for frame in container.decode(stream):
                if frame.pts in wanted:
                    out[wanted[frame.pts]] = _prepare(frame.to_ndarray(format="rgb24"), info, opts)
                if frame.pts is not None and frame.pts >= last_pts:
                    break
        except av.FFmpegError as exc:
            good = max(out, default=indices[0] - 1)
            raise VideoError(
                f"{info.path}: decoding failed after frame {good} ({exc}). The file changed since the scan or is damaged."
            ) from exc
    if not set(indices) <= set(out):
        lost = sorted(set(indices) - set(out))[:5]
        raise VideoError(f"{info.path}: frames {lost} could not be decoded (the last good frame is {max(out, default=-1)}).")
    return out


def _prepare(frame: np.ndarray, info: VideoInfo, opts: VideoOptions) -> np.ndarray:
    top, left, h, w = info.fov
    frame = mask_text(frame, opts.text_boxes)[top : top + h, left : left + w]
    return _downsize(frame, opts.decode_size)


def _downsize(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize so the short side is at most ``size`` (never upsample: the model's resize does that)."""
    h, w = frame.shape[:2]
    if min(h, w) <= size:
        return np.array(frame)  # a writable copy: PIL/PyAV buffers are read-only
    scale = size / min(h, w)
    im = Image.fromarray(frame).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return np.array(im)


def sample_at_fps(times: list[float], fps: float) -> list[int]:
    """Indices of the frames nearest to 0, 1/fps, 2/fps, ... (by timestamp, so VFR is handled)."""
    t = np.asarray(times)
    targets = np.arange(0.0, t[-1] + 1e-9, 1.0 / fps)
    idx = np.clip(np.searchsorted(t, targets), 0, len(t) - 1)
    prev = np.clip(idx - 1, 0, len(t) - 1)
    nearest = np.where(np.abs(t[prev] - targets) <= np.abs(t[idx] - targets), prev, idx)
    return sorted(set(nearest.tolist()))


def mask_text(frame: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Black out on-screen text regions given as fractional ``(x0, y0, x1, y1)`` boxes."""
    if not boxes:
        return frame
    out = frame.copy()
    h, w = frame.shape[:2]
    for x0, y0, x1, y1 in boxes:
        out[int(y0 * h) : int(np.ceil(y1 * h)), int(x0 * w) : int(np.ceil(x1 * w))] = 0
    return out


def detect_fov(frame: np.ndarray, threshold: int = 20, min_fraction: float = 0.02) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the field of view: rows/columns with enough pixels above ``threshold``.

    Endoscope images sit in a black border or a circular mask; cropping to the lit region's
    bounding box removes the border (the circle's corners stay, which the model learns to ignore).
    """
    bright = frame.max(axis=-1) > threshold if frame.ndim == 3 else frame > threshold
    rows = np.flatnonzero(bright.mean(axis=1) > min_fraction)
    cols = np.flatnonzero(bright.mean(axis=0) > min_fraction)
    h, w = bright.shape
    if len(rows) < h // 8 or len(cols) < w // 8:
        return 0, 0, h, w  # a dark first frame: keep everything rather than crop to noise
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# --- annotations --------------------------------------------------------------------------------


def _sidecar(path: Path, suffixes: tuple[str, ...]) -> Path | None:
    stem = path.with_suffix("") if path.is_file() else path
    for suffix in suffixes:
        candidate = stem.parent / f"{stem.name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _annotation_file(path: Path) -> Path | None:
    return _sidecar(path, ANNOTATION_SUFFIXES)


def _tool_file(path: Path) -> Path | None:
    return _sidecar(path, TOOL_SUFFIXES)


def read_phase_annotation(path: Path, info: VideoInfo) -> list[tuple[int, str]]:
    """(frame index, phase) change points from a ``Frame<TAB>Phase`` text file or a ``time,phase`` CSV."""
    rows: list[tuple[int, str]] = []
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                t = float(row["time"])
                if t > info.duration + 1e-3:
                    raise VideoError(f"{path}: time {t:.3f}s is past the end of the video ({info.duration:.3f}s). Fix the annotation.")
                rows.append((int(np.searchsorted(np.asarray(info.times), t - 1e-6)), row["phase"].strip()))
        return rows
    for n, line in enumerate(path.read_text().splitlines()):
        parts = line.split("\t") if "\t" in line else line.split()
        if not parts or (n == 0 and not parts[0].isdigit()):
            continue  # header or blank line
        frame = int(parts[0])
        if frame >= len(info.times):
            raise VideoError(
                f"{path}: frame {frame} is past the end of the video ({len(info.times)} frames). "
                "Check the annotation matches this video (and its frame rate)."
            )
        rows.append((frame, parts[1].strip()))
    return rows


def _frame_phases(path: Path, info: VideoInfo, names: list[str], fixed: bool) -> list[int | None] | None:
    """Phase index of every frame (``None`` before the first annotation); extends ``names`` in place."""
    ann = _annotation_file(path)
    if ann is None:
        return None
    out: list[int | None] = [None] * len(info.times)
    for frame, phase in sorted(read_phase_annotation(ann, info)):
        if phase not in names:
            if fixed:
                raise VideoError(f"{ann}: phase {phase!r} is not in data.options.phases {names}.")
            names.append(phase)
        out[frame:] = [names.index(phase)] * (len(out) - frame)
    return out


def read_tool_table(path: Path, info: VideoInfo) -> list[list[int]]:
    """Tool presence per frame from a Cholec80-style table (``Frame<TAB>Tool1<TAB>...``), held until the next row."""
    table = _tool_file(path)
    lines = [ln.split() for ln in table.read_text().splitlines() if ln.strip()]
    body = [r for r in lines if r[0].isdigit()]
    if not body:
        raise VideoError(f"{table}: no rows of 'Frame<TAB>tool flags'.")
    out: list[list[int]] = [[0] * (len(body[0]) - 1)] * len(info.times)
    for row in body:
        frame = int(row[0])
        if frame >= len(info.times):
            raise VideoError(f"{table}: frame {frame} is past the end of the video ({len(info.times)} frames).")
        out[frame:] = [[int(v) for v in row[1:]]] * (len(out) - frame)
    return out


def _check_pair(image: Path, mask: Path) -> str | None:
    try:
        with Image.open(image) as a, Image.open(mask) as b:
            a.load()
            b.load()
            if a.size != b.size:
                return f"image is {a.size[0]}x{a.size[1]} but its mask is {b.size[0]}x{b.size[1]}"
        return None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a quarantine reason
        return f"{type(exc).__name__}: {exc}"


def _reason(exc: VideoError) -> str:
    text = str(exc)
    for key, reason in (
        ("truncated", "truncated video"),
        ("unsupported codec", "unsupported codec"),
        ("empty (0 bytes)", "empty file"),
        ("past the end", "annotation past end of video"),
    ):
        if key in text:
            return reason
    return "cannot read video"


# --- writing ------------------------------------------------------------------------------------


def write_mp4(path: Path, frames: np.ndarray | list[np.ndarray], fps: float = 25, crf: int = 23) -> Path:
    """Write uint8 H×W×3 frames as an H.264 MP4 (odd sizes are cropped by one pixel for yuv420p)."""
    from fractions import Fraction

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [np.asarray(f) for f in frames]
    h, w = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "time_s", "phase_index", "phase"])
        for i, (t, p) in enumerate(zip(times, predictions, strict=True)):
            writer.writerow([i, f"{t:.3f}", p, class_names[p] if 0 <= p < len(class_names) else ""])
    return path


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


def moving_shape_frames(rng: np.random.Generator, label: int, size: int, n_frames: int = 16) -> np.ndarray:
    """A textured shape drifting and turning over a textured background (T×H×W×3 uint8)."""
    r = rng.uniform(0.2, 0.3) * size
    start = rng.uniform(r, size - r, 2)
    velocity = rng.uniform(-1, 1, 2) * size / (3 * n_frames)
    spin = rng.uniform(-0.1, 0.1)
    angle = rng.uniform(0, 2 * np.pi)
    background = _smooth_noise(rng, size, int(rng.integers(2, 6)))
    yy, xx = np.mgrid[0:size, 0:size]
    freq, theta = rng.uniform(0.15, 0.6), rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    bg_lo, bg_hi = np.sort(rng.uniform(0, 1, (2, 3)), axis=0)
    fg_lo, fg_hi = np.sort(rng.uniform(0, 1, (2, 3)), axis=0)
    frames = []
    for t in range(n_frames):
        cx, cy = np.clip(start + velocity * t, r, size - r)
        mask = _shape_mask(SHAPES[label], size, cx, cy, r, angle + spin * t)
        bg = bg_lo + (bg_hi - bg_lo) * background[..., None]
        fg = fg_lo + (fg_hi - fg_lo) * stripes[..., None]
        img = np.where(mask[..., None], fg, bg) + rng.normal(0, 0.02, (size, size, 3))
        frames.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(frames)
