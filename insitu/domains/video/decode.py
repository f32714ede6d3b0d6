"""Decoding frames by seeking to their timestamps, and the per-process caches of indexes and decoded frames."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
from PIL import Image

from insitu.domains.video.fov import downsize, mask_text
from insitu.domains.video.options import VideoError, VideoOptions
from insitu.domains.video.probe import VideoInfo, numbered_frames

# the demux index of every video probed in this process, keyed by path and the options it depends on
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


def decode_frames(info: VideoInfo, indices: list[int], opts: VideoOptions, keep: set[int] | None = None) -> dict[int, np.ndarray]:
    """Decode the frames at sorted ``indices`` (plus any in ``keep`` met on the way): seek, decode forward."""
    if info.codec == "frames":
        files = numbered_frames(Path(info.path))
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
    return downsize(frame, opts.decode_size)
