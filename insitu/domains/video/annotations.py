"""Label files beside a video: Cholec80-style phase annotations (text or CSV) and tool-presence tables."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from insitu.domains.video.options import VideoError
from insitu.domains.video.probe import VideoInfo

ANNOTATION_SUFFIXES = ("-phase.txt", "_phase.txt", "-phase.csv", "_phase.csv")
TOOL_SUFFIXES = ("-tool.txt", "_tool.txt")


def _sidecar(path: Path, suffixes: tuple[str, ...]) -> Path | None:
    stem = path.with_suffix("") if path.is_file() else path
    for suffix in suffixes:
        candidate = stem.parent / f"{stem.name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def annotation_file(path: Path) -> Path | None:
    return _sidecar(path, ANNOTATION_SUFFIXES)


def tool_file(path: Path) -> Path | None:
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


def frame_phases(path: Path, info: VideoInfo, names: list[str], fixed: bool) -> list[int | None] | None:
    """Phase index of every frame (``None`` before the first annotation); extends ``names`` in place."""
    ann = annotation_file(path)
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
    table = tool_file(path)
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
