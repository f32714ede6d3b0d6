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

Modules: ``probe`` (finding and indexing sources), ``fov`` (text masking, field of view, downsizing),
``decode`` (seek + decode, per-process caches), ``annotations`` (phase and tool files), ``write``
(CSV, MP4, overlays), ``demo`` (moving shapes), ``domain`` (the `VideoDomain`).
"""

from __future__ import annotations

from insitu.domains.video.decode import _INFO as _INFO  # per-process caches, reset by tests and benchmarks
from insitu.domains.video.decode import _frame_cache as _frame_cache
from insitu.domains.video.decode import decode_frames
from insitu.domains.video.demo import moving_shape_frames
from insitu.domains.video.domain import VideoDomain
from insitu.domains.video.fov import detect_fov
from insitu.domains.video.options import VIDEO_SUFFIXES, VideoError
from insitu.domains.video.probe import probe_video, sample_at_fps
from insitu.domains.video.write import write_mp4, write_overlay, write_phase_csv

__all__ = [
    "VIDEO_SUFFIXES",
    "VideoDomain",
    "VideoError",
    "decode_frames",
    "detect_fov",
    "moving_shape_frames",
    "probe_video",
    "sample_at_fps",
    "write_mp4",
    "write_overlay",
    "write_phase_csv",
]
