"""Video decode throughput: sequential frames and random-access clips, first epoch vs cached epoch.

Writes a seeded 480p H.264 MP4 (moving texture, keyframe every ``--gop`` frames) into a temporary
folder, then measures in the same run:

- baseline: plain PyAV sequential decode to RGB (no crop, no resize, no cache);
- baseline: random clips by decoding from the start of the file (no index, no seeking);
- the video domain, frames mode (every frame), in order: first epoch (decode) vs second (cache);
- the video domain, clips mode (``--clip-frames`` at stride 2), shuffled: first epoch (seek +
  decode) vs second (cache).

Run: ``python benchmarks/bench_video.py [--seconds 10] [--decode-size 224]``.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from insitu.domains import Manifest
from insitu.domains import video as vmod
from insitu.domains.video import VideoDomain


def make_video(path: Path, seconds: float, fps: int, gop: int) -> int:
    """A 854x480 H.264 clip of a drifting seeded texture with a keyframe every ``gop``; returns its frame count."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (600, 1100, 3), dtype=np.uint8)
    n = int(seconds * fps)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 854, 480, "yuv420p"
        stream.options = {"g": str(gop), "crf": "23"}
        for t in range(n):
            frame = np.ascontiguousarray(texture[t % 100 : t % 100 + 480, 2 * t % 200 : 2 * t % 200 + 854])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return n


def timed(fn) -> float:  # noqa: ANN001 - a zero-argument callable
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_decode(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for f in c.decode(video=0) if f.to_ndarray(format="rgb24") is not None)


def decode_from_start(path: Path, wanted: list[int]) -> None:
    """Baseline random access without an index: decode from frame 0 up to the clip's last frame."""
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in wanted:
                f.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break


def domain_epoch(dom: VideoDomain, manifest: Manifest, order: list[int]) -> int:
    """Load every item once in ``order``; returns the number of frames delivered."""
    frames = 0
    for i in order:
        image = dom.load(manifest.items[i], manifest)["image"]
        frames += image.shape[0] if image.ndim == 4 else 1
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--gop", type=int, default=25)
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--decode-size", type=int, default=224)
    ap.add_argument("--baseline-clips", type=int, default=10)
    args = ap.parse_args()
    random.seed(0)
    # loading runs in DataLoader workers, where torch uses one thread; do the same here
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "surgery_480p.mp4"
        t_write = timed(lambda: make_video(path, args.seconds, args.fps, args.gop))
        n = int(args.seconds * args.fps)
        rows: list[tuple[str, str, float, float]] = []
        t = timed(lambda: plain_decode(path))
        rows.append(("PyAV sequential decode to RGB (baseline)", "-", n / t, t))

        opts = {"decode_size": args.decode_size, "crop_fov": True, "cache_mb": 4096}
        frames_dom = VideoDomain({**opts, "fps": float(args.fps)})
        m = frames_dom.scan(root)
        order = list(range(len(m.items)))
        for epoch in ("first (decode)", "second (cached)"):
            t = timed(lambda: domain_epoch(frames_dom, m, order))
            rows.append(("domain frames mode, in order", epoch, len(order) / t, t))

        vmod._frame_cache(4096).clear()
        clips_dom = VideoDomain({**opts, "mode": "clips", "clip_frames": args.clip_frames, "stride": 2, "clip_step": args.clip_frames})
        mc = clips_dom.scan(root)
        order = list(range(len(mc.items)))
        random.shuffle(order)
        for epoch in ("first (seek + decode)", "second (cached)"):
            t = timed(lambda: domain_epoch(clips_dom, mc, order))
            rows.append((f"domain clips mode ({args.clip_frames} fr, stride 2), shuffled", epoch, len(order) * args.clip_frames / t, t))
        sub = [mc.items[i].extra["indices"] for i in order[: args.baseline_clips]]
        t = timed(lambda: [decode_from_start(path, w) for w in sub])
        rows.append((f"random clips by decoding from frame 0 (baseline, {len(sub)} clips)", "-", len(sub) * args.clip_frames / t, t))
        cache = vmod._frame_cache(4096)

    print(f"video: 854x480 H.264, {n} frames at {args.fps} fps, keyframe every {args.gop}; written in {t_write:.1f} s")
    print(
        f"domain: decode_size {args.decode_size} (short side), crop_fov on; cache holds {cache.bytes / 2**20:.1f} MiB after the clips epochs"
    )
    print(f"machine: {os.cpu_count()} CPUs visible (shared), torch threads 1 (as in a DataLoader worker); PyAV {av.__version__}")
    print()
    print(f"| {'what':<62} | {'epoch':<22} | {'frames/s':>9} | {'wall s':>7} |")
    print(f"|{'-' * 64}|{'-' * 24}|{'-' * 11}|{'-' * 9}|")
    for what, epoch, fps, wall in rows:
        print(f"| {what:<62} | {epoch:<22} | {fps:>9.1f} | {wall:>7.2f} |")


if __name__ == "__main__":
    main()
