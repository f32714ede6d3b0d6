"""The video domain: scanning videos, frame folders and image/mask pairs into frame or clip items, and loading them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from insitu.domains.base import DemoData, Domain, Manifest, ManifestItem, Predictor, QuarantineItem, Sample, stable_id
from insitu.domains.masks import read_binary_mask
from insitu.domains.video.annotations import annotation_file, frame_phases, read_tool_table, tool_file
from insitu.domains.video.decode import _INFO, _frame_cache, decode_frames
from insitu.domains.video.demo import MUCOSA, mucosa_frames
from insitu.domains.video.fov import downsize
from insitu.domains.video.options import FRAME_SUFFIXES, VIDEO_SUFFIXES, VideoError, VideoOptions
from insitu.domains.video.probe import VideoInfo, find_sources, probe_video, sample_at_fps
from insitu.domains.video.write import write_mp4, write_video_predictions
from insitu.errors import ConfigError, DataError, EmptyDatasetError
from insitu.registry import DOMAINS


@DOMAINS.register("video")
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

    @classmethod
    def yields(cls, options: VideoOptions) -> tuple[str, int]:
        return ("clips", options.clip_frames) if options.mode == "clips" else ("images", 1)

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a folder. Point data.root at a folder of videos (MP4/AVI/MKV) or frame folders.")
        videos, frame_dirs, seg_dirs = find_sources(root)
        annotated = any(annotation_file(p) for p in videos + frame_dirs)
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
            image = downsize(np.asarray(im.convert("RGB")), self.options.decode_size)
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
        phases = frame_phases(path, info, phase_names, fixed=bool(self.options.phases)) if use_phases else None
        tools = read_tool_table(path, info) if tool_file(path) else None
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

    # --- predictions ---------------------------------------------------------------------------

    def write_predictions(self, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
        """Videos: an overlay MP4 (masks or class banner) and a per-frame CSV; image/mask folders: as images."""
        return write_video_predictions(self, model, inputs, out_dir)

    # --- demo ----------------------------------------------------------------------------------

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Seeded H.264 MP4s of an endoscope panning over mucosa: class = appearance (colour), group = video."""
        rng = np.random.default_rng(seed)
        per_class = {"train": max(2, n_per_class // 2), "test": max(2, n_per_class // 4)}  # 2 frames per clip
        for split, n_videos in per_class.items():
            for label, name in enumerate(MUCOSA):
                for v in range(n_videos):
                    frames = mucosa_frames(rng, label, size, n_frames=8)
                    write_mp4(out_dir / split / name / f"{name}_{v:03d}.mp4", frames, fps=8)
        options = {"labels": "folders", "fps": 2.0, "crop_fov": False, "decode_size": size}
        return DemoData.split_folders(
            out_dir,
            "video",
            size,
            options=options,
            in_chans=3,
            description=(
                f"H.264 clips (1 s at 8 fps, 2 frames sampled per clip, {size} px) of an endoscope panning over mucosa of {len(MUCOSA)} appearances "
                f"({', '.join(MUCOSA).replace('_', ' ')}) that differ in colour while sharing the same textures, under a "
                "vignette and per-clip illumination. The embedded base was pretrained on generated fractals, not on "
                "endoscopy; contrastive adaptation on the unlabelled frames can make the mucosa's colour count for more"
            ),
        )


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
