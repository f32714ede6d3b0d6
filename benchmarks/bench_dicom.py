"""DICOM throughput: scan+decode slices/s per transfer syntax, and first vs cached epoch slices/s.

Writes seeded 512x512 CT-like series (uncompressed, JPEG-LS lossless, JPEG 2000 lossless) into a
temporary folder, then measures, in the same run:
  scan    a fresh `DicomDomain.scan` (header read + full pixel decode of every file, worker pool)
  epoch 1 loading every slice through `load` (decode the series, convert to HU, window, write cache)
  epoch 2 the same with a fresh reader over the same cache (memory-mapped arrays, no DICOM decode)

    python benchmarks/bench_dicom.py [--slices 32] [--size 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from insitu.domains.dicom import DicomDomain, write_ct_series

SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "JPEG-LS lossless": JPEGLSLossless, "JPEG 2000 lossless": JPEG2000Lossless}


def make_series(folder: Path, syntax: str, slices: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.35 * size)) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 20, (slices, size, size))
    paths = write_ct_series(folder, hu.astype(np.float32), patient_id=f"bench-{syntax}")
    if syntax != ExplicitVRLittleEndian:
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.compress(syntax)
            ds.save_as(p)


def run(name: str, root: Path, workers: int) -> dict[str, float]:
    options = {"cache_dir": str(root.parent / f"cache-{root.name}"), "workers": workers, "windows": ["lung", "mediastinum", "bone"]}
    t0 = time.perf_counter()
    domain = DicomDomain(options)
    manifest = domain.scan(root)
    scan_s = time.perf_counter() - t0
    n = len(manifest.items)
    t0 = time.perf_counter()
    for item in manifest.items:
        domain.load(item, manifest)
    first_s = time.perf_counter() - t0
    cached = DicomDomain(options)
    manifest = cached.scan(root)  # resumed: every record comes from the cache
    t0 = time.perf_counter()
    for item in manifest.items:
        cached.load(item, manifest)
    cached_s = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in root.rglob("*.dcm")) / 1e6
    return {"name": name, "n": n, "mb": mb, "scan": n / scan_s, "first": n / first_s, "cached": n / cached_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="insitu-bench-dicom-"))
    try:
        rows = []
        for name, syntax in SYNTAXES.items():
            root = tmp / name.replace(" ", "_")
            make_series(root / "series", syntax, args.slices, args.size)
            rows.append(run(name, root, args.workers))
        print(f"{args.slices} slices of {args.size}x{args.size} per series, {args.workers} scan workers, 3 HU windows as channels")
        print(
            "| transfer syntax | MB on disk | scan+decode slices/s | epoch 1 slices/s (decode+cache) | cached epoch slices/s | cached / epoch 1 |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['name']} | {r['mb']:.1f} | {r['scan']:.1f} | {r['first']:.1f} | {r['cached']:.1f} | {r['cached'] / r['first']:.1f}x |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
