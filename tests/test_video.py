"""The video domain on real H.264/MJPEG files written by seeded PyAV fixtures, plus real endoscopy frames."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from insitu.cli import main
from insitu.domains import split_by_group
from insitu.domains import video as vmod
from insitu.domains.video import VideoDomain, VideoError, probe_video, sample_at_fps, write_overlay, write_phase_csv
from insitu.errors import ConfigError, EmptyDatasetError
from insitu.pipelines.data import PretrainDataModule, SampleDataset, ScannedData
from tests.conftest import shared
from tests.data.video_fixtures import (
    colonoscopy_pan,
    counter_frames,
    frame_folder,
    frame_index,
    truncated_copy,
    unsupported_codec_avi,
    write_video,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    vmod._INFO.clear()
    vmod._frame_cache(1024).clear()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    write_video(root / "case1.mp4", counter_frames(24), fps=12)
    write_video(root / "case2.avi", counter_frames(12, seed=1), fps=12, codec="mjpeg")
    frame_folder(root / "case3", n=6)
    return root


def test_frames_mode_samples_by_time_and_groups_by_case(videos):
    dom = VideoDomain({"fps": 4, "crop_fov": False})
    m = dom.scan(videos)
    # 24 frames at 12 fps = 2 s -> t=0,0.25,...,1.75 (8); 12 frames -> 4; 6 frames at 25 fps -> 1
    assert len(m.items) == 8 + 4 + 1 and m.counts()["groups"] == 3 and not m.quarantine
    case1 = [i for i in m.items if i.path.endswith("case1.mp4")]
    assert [i.extra["index"] for i in case1] == [0, 3, 6, 9, 12, 15, 18, 21]
    for item in case1:  # random access by seeking returns exactly the frame asked for
        sample = dom.load(item, m)
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        frame = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert frame_index(frame) == item.extra["index"]
    parts = split_by_group(m.items, {"train": 0.5, "test": 0.5}, seed=0)
    assert not {i.group for i in parts["train"]} & {i.group for i in parts["test"]}


def test_clips_mode_stride_and_cache(videos, monkeypatch):
    dom = VideoDomain({"mode": "clips", "clip_frames": 4, "stride": 2, "crop_fov": False})
    m = dom.scan(videos)
    clips = [i for i in m.items if i.path.endswith("case1.mp4")]
    assert [c.extra["indices"] for c in clips] == [[0, 2, 4, 6], [7, 9, 11, 13], [14, 16, 18, 20]]
    clip = dom.load(clips[1], m)["image"]
    assert clip.shape == (4, 3, 32, 32)
    got = [frame_index((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in clip]
    assert got == [7, 9, 11, 13]
    calls = []
    monkeypatch.setattr("insitu.domains.video.domain.decode_frames", lambda *a, **k: calls.append(a) or {})
    assert torch.equal(dom.load(clips[1], m)["image"], clip)  # second epoch: from the cache
    assert calls == []


def test_variable_frame_rate_uses_timestamps(tmp_path):
    times = [0.0, 0.04, 0.08, 0.5, 0.54, 1.0, 1.04]
    path = write_video(tmp_path / "vfr.mp4", counter_frames(len(times)), times=times)
    info = probe_video(path, VideoDomain.Options())
    assert np.allclose(info.times, times, atol=1e-3)
    assert sample_at_fps(info.times, 2.0) == [0, 3, 5]  # t = 0, 0.5, 1.0 by time, not by index
    m = VideoDomain({"fps": 2, "crop_fov": False}).scan(tmp_path)
    assert [i.extra["index"] for i in m.items] == [0, 3, 5]


def test_colonoscopy_pan_fov_crop_and_text_mask(tmp_path):
    src = sorted(shared("endoscopy", "colonoscopy_unlabeled").glob("*.jpg"))[0]
    before = sha(src)
    real = np.asarray(Image.open(src).convert("RGB"))
    top, left, h, w = vmod.detect_fov(real)  # the real frame's own black border is found
    assert 5 < top < 40 and 20 < left < 60 and h < real.shape[0] - 10 and w < real.shape[1] - 40
    path = write_video(tmp_path / "pan" / "colon.mp4", colonoscopy_pan(src, n=8, size=64, border=8), fps=8)
    dom = VideoDomain({"fps": 8, "text_boxes": [[0.0, 0.0, 0.3, 0.3]]})
    m = dom.scan(tmp_path / "pan")
    top, left, h, w = dom.info(str(path)).fov
    assert abs(top - 8) <= 2 and abs(left - 8) <= 2 and abs(h - 64) <= 3 and abs(w - 64) <= 3
    first, last = (dom.load(i, m)["image"] for i in (m.items[0], m.items[-1]))
    assert first.shape[-2:] == (h, w) and not torch.allclose(first, last)  # the camera moved
    corner = first[:, : int(0.3 * 80) - top - 2, : int(0.3 * 80) - left - 2]
    assert corner.max() < 0.05 and first[:, -20:, -20:].mean() > 0.1  # text box blacked out, rest kept
    assert sha(src) == before


def test_bad_inputs_quarantined_scan_continues(tmp_path):
    root = tmp_path / "mixed"
    good = write_video(root / "good.mp4", counter_frames(24), fps=12)
    full = write_video(tmp_path / "full.mp4", counter_frames(24, seed=3), fps=12)
    truncated_copy(full, root / "cut.mp4")
    unsupported_codec_avi(root / "odd.avi")
    (root / "empty.mp4").write_bytes(b"")
    write_video(root / "late.mp4", counter_frames(12), fps=12)
    (root / "late-phase.txt").write_text("Frame\tPhase\n0\tPreparation\n40\tDissection\n")
    hashes = {p: sha(p) for p in root.iterdir()}
    m = VideoDomain({"labels": "none", "crop_fov": False}).scan(root)
    assert {Path(i.path).name for i in m.items} == {"good.mp4", "late.mp4"}  # labels ignored here
    reasons = {Path(q.path).name: (q.reason, q.message) for q in m.quarantine}
    assert reasons["cut.mp4"][0] == "truncated video" and "last good frame is" in reasons["cut.mp4"][1]
    assert reasons["odd.avi"][0] == "unsupported codec" and "libx264" in reasons["odd.avi"][1]
    assert reasons["empty.mp4"][0] == "empty file"
    assert {p: sha(p) for p in root.iterdir()} == hashes and good.exists()
    # with phase labels, the annotation past the end quarantines that case only
    m = VideoDomain({"labels": "phases", "crop_fov": False}).scan(root)
    assert "late.mp4" in {Path(q.path).name for q in m.quarantine if q.reason == "annotation past end of video"}


def test_truncated_names_last_good_frame(tmp_path):
    full = write_video(tmp_path / "full.mp4", counter_frames(24), fps=12)
    cut = truncated_copy(full, tmp_path / "cut.mp4")
    with pytest.raises(VideoError, match=r"cut.mp4 is truncated: the header declares 24 frames.*last good frame is \d+"):
        probe_video(cut, VideoDomain.Options())
    with av.open(str(cut)) as c:  # the named frame is really the last that decodes
        n = 0
        with pytest.raises(av.FFmpegError):
            for _ in c.decode(video=0):
                n += 1
    with pytest.raises(VideoError, match=f"last good frame is {n - 1} "):
        probe_video(cut, VideoDomain.Options())


def test_phase_annotations_tools_and_csv_times(tmp_path):
    root = tmp_path / "cholec"
    write_video(root / "video01.mp4", counter_frames(20), fps=10)
    (root / "video01-phase.txt").write_text("Frame\tPhase\n0\tPreparation\n8\tCalotTriangleDissection\n15\tClipping\n")
    (root / "video01-tool.txt").write_text("Frame\tGrasper\tHook\n0\t1\t0\n10\t0\t1\n")
    write_video(root / "video02.mp4", counter_frames(20, seed=2), fps=10)
    (root / "video02-phase.csv").write_text("time,phase\n0.0,Clipping\n1.0,Preparation\n")
    dom = VideoDomain({"fps": 10, "crop_fov": False})
    m = dom.scan(root)
    assert m.class_names == ["Preparation", "CalotTriangleDissection", "Clipping"]
    v1 = [i for i in m.items if i.path.endswith("video01.mp4")]
    assert [i.label for i in v1] == [0] * 8 + [1] * 7 + [2] * 5
    assert v1[9].extra["tools"] == [1, 0] and v1[12].extra["tools"] == [0, 1]
    assert torch.equal(dom.load(v1[12], m)["tools"], torch.tensor([0.0, 1.0]))
    v2 = [i for i in m.items if i.path.endswith("video02.mp4")]
    assert [i.label for i in v2] == [2] * 10 + [0] * 10
    (root / "video02-phase.csv").write_text("time,phase\n0.0,Clipping\n9.5,Preparation\n")
    vmod._INFO.clear()
    m = dom.scan(root)
    assert any("9.500s is past the end" in q.message for q in m.quarantine)


def test_kvasir_pairs_for_segmentation(tmp_path):
    root = shared("endoscopy", "kvasir_seg").parent
    dom = VideoDomain({"decode_size": 48})
    m = dom.scan(root / "kvasir_seg")
    assert len(m.items) == 3 and all(i.extra["kind"] == "seg" for i in m.items)
    s = dom.load(m.items[0], m)
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == s["image"].shape[-2:]
    assert min(s["image"].shape[-2:]) == 48 and set(s["mask"].unique().tolist()) == {0, 1}
    assert 0.01 < s["mask"].float().mean() < 0.9  # a polyp, not an empty or full mask
    clips = VideoDomain({"mode": "clips"})
    with pytest.raises(EmptyDatasetError):  # pairs are no clips; nothing else is there
        clips.scan(root / "kvasir_seg")


def test_writers_phase_csv_and_overlay(tmp_path):
    frames = counter_frames(6, size=32)
    masks = np.zeros((6, 32, 32), np.int64)
    masks[:, 8:24, 20:30] = 1
    phases = ["Preparation"] * 3 + ["Clipping"] * 3
    out = write_overlay(tmp_path / "overlay.mp4", frames, fps=6, masks=masks, phases=phases)
    with av.open(str(out)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 6
    assert decoded[0][14:20, 22:28, 0].mean() > decoded[0][14:20, 22:28, 2].mean() + 30  # red tint on the mask
    assert decoded[0][:1].mean() < decoded[0][20:].mean()  # dark banner on top
    csv_path = write_phase_csv(tmp_path / "pred.csv", [0.0, 0.5], [0, 1], ["Preparation", "Clipping"])
    assert csv_path.read_text().splitlines() == ["frame,time_s,phase_index,phase", "0,0.000,0,Preparation", "1,0.500,1,Clipping"]


def test_source_weights_drive_a_weighted_sampler(tmp_path):
    root = tmp_path / "sources"
    for i in range(3):
        write_video(root / "general" / f"g{i}.mp4", counter_frames(8, seed=i), fps=8)
    write_video(root / "cholecystectomy" / "c0.mp4", counter_frames(8, seed=9), fps=8)
    opts = {"fps": 8, "crop_fov": False, "source_weights": {"cholecystectomy": 3.0, "general": 1.0}}
    from insitu.config import DataConfig

    data = ScannedData.scan(DataConfig(domain="video", root=root, options=opts))
    weights = data.domain.sample_weights(data.manifest.items)
    by_source: dict[str, float] = {}
    for item, w in zip(data.manifest.items, weights, strict=True):
        by_source[item.extra["source"]] = by_source.get(item.extra["source"], 0) + w
    assert by_source == pytest.approx({"cholecystectomy": 3.0, "general": 1.0})
    dm = PretrainDataModule(SampleDataset(data, data.manifest.items, None, image_size=16), batch_size=4, num_workers=0)
    sampler = dm.sampler()
    assert sampler is not None and torch.allclose(sampler.weights, torch.tensor(weights, dtype=torch.double))
    with pytest.raises(ConfigError, match="source_weights names \\['cholec'\\]"):
        VideoDomain({**opts, "source_weights": {"cholec": 1.0}}).scan(root)


def test_cli_scan_video(tmp_path, videos, capsys):
    (videos / "empty.mp4").write_bytes(b"")
    assert main(["scan", str(videos), "--domain", "video", "--out", str(tmp_path / "scan"), "--option", "fps=4"]) == 0
    assert "empty.mp4" in (tmp_path / "scan" / "quarantine.csv").read_text()
    assert len((tmp_path / "scan" / "manifest.csv").read_text().splitlines()) == 1 + 13
    (tmp_path / "none").mkdir()
    assert main(["scan", str(tmp_path / "none"), "--domain", "video", "--out", str(tmp_path / "s2")]) == 1
    assert main(["scan", str(videos), "--domain", "video", "--out", str(tmp_path / "s3"), "--option", "mode=movie"]) == 2


def test_reading_in_order_decodes_each_gop_once(videos, monkeypatch):
    dom = VideoDomain({"fps": 12, "crop_fov": False})
    m = dom.scan(videos)
    case1 = [i for i in m.items if i.path.endswith("case1.mp4")]
    assert dom.info(case1[0].path).keyframes == [0, 6, 12, 18]  # written with a keyframe every 6
    calls = []
    real = vmod.decode_frames
    monkeypatch.setattr("insitu.domains.video.domain.decode_frames", lambda *a: calls.append(a[1]) or real(*a))
    got = [frame_index((dom.load(i, m)["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in case1]
    assert got == list(range(24)) and calls == [[0], [6], [12], [18]]


def test_mucosa_demo_clips_pan_and_differ_in_colour():
    from insitu.domains.video.demo import MUCOSA, MUCOSA_COLOURS, mucosa_frames

    rng = np.random.default_rng(5)
    chroma = lambda c: c / c.sum(-1, keepdims=True)  # noqa: E731
    for label in range(len(MUCOSA)):
        clips = np.stack([mucosa_frames(rng, label, 32, n_frames=4) for _ in range(6)]).astype(np.float64) / 255
        assert clips.shape == (6, 4, 32, 32, 3)
        assert not np.array_equal(clips[0, 0], clips[0, -1])  # the camera moves
        mean = chroma(clips.mean((0, 1, 2, 3)))
        assert np.abs(mean[None] - chroma(MUCOSA_COLOURS)).sum(-1).argmin() == label
