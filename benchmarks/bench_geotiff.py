"""Windowed GeoTIFF reads: tiles/s and peak memory, grid and random windows, versus reading whole scenes.

Scenes: the real Landsat crop in ../shared/data (3 bands, 791x718) and synthetic 13-band uint16
scenes of growing size (1k², 2k², 4k² by default) written here with windowed writes. Each
measurement runs in a fresh process so its peak RSS (ru_maxrss) is its own; ``import RSS`` is the
same process right after imports, so ``peak - import`` is what the reads cost.

The baseline is the naive loader: read the whole scene with ``src.read()`` and crop tiles from the
array (its time includes the whole-scene read, amortised over the same tiles).

    python benchmarks/bench_geotiff.py [--tiles 200] [--tile-size 128] [--sizes 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LANDSAT = REPO.parent / "shared" / "data" / "satellite" / "rasterio" / "RGB.byte.tif"


def write_synthetic(path: Path, size: int, bands: int = 13, seed: int = 0) -> Path:
    """A tiled uint16 scene written block-row by block-row (the writer never holds the scene)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": bands, "dtype": "uint16", "nodata": 0,
        "crs": "EPSG:32633", "transform": from_origin(400000.0, 5300000.0, 10.0, 10.0),
        "tiled": True, "blockxsize": 256, "blockysize": 256,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 256):
            h = min(256, size - row)
            dst.write(rng.integers(1, 10000, (bands, h, size), dtype=np.uint16), window=Window(0, row, size, h))
    return path


def _windows(height: int, width: int, tile: int, n: int, mode: str) -> list[tuple[int, int]]:
    from insitu.domains.geotiff import grid_offsets

    if mode == "random":
        rng = np.random.default_rng(0)
        return [(int(rng.integers(0, height - tile + 1)), int(rng.integers(0, width - tile + 1))) for _ in range(n)]
    grid = [(r, c) for r in grid_offsets(height, tile, tile) for c in grid_offsets(width, tile, tile)]
    return [grid[i] for i in np.linspace(0, len(grid) - 1, min(n, len(grid))).round().astype(int)]


def _measure(path: str, options: dict, tile: int, n: int, mode: str, queue: mp.Queue) -> None:
    from rasterio.windows import Window

    from insitu.domains.geotiff import GeoTiffDomain, SceneRef, fill_invalid

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dom = GeoTiffDomain({**options, "tile_size": tile})
    scene = dom.open_scene(SceneRef(path))
    wins = _windows(scene.height, scene.width, tile, n, mode.split("-")[0])
    start = time.perf_counter()
    if mode.endswith("whole"):
        import rasterio

        with rasterio.open(path) as src:
            whole = src.read().astype(np.float32)
        tiles = [whole[:, r : r + tile, c : c + tile].copy() for r, c in wins]
        del tiles
    else:
        for r, c in wins:
            image, valid = dom.read_window(scene, Window(c, r, tile, tile))
            if valid.any():  # an all-nodata tile would be dropped by the scan
                fill_invalid(image, valid)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((len(wins) / wall, peak, import_rss, len(wins)))


def measure(path: Path, options: dict, tile: int, n: int, mode: str) -> tuple[float, float, float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(str(path), options, tile, n, mode, queue))
    proc.start()
    result = queue.get(timeout=900)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=200)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scenes: list[tuple[str, Path, dict]] = []
        if LANDSAT.exists():
            scenes.append(("Landsat crop 3x718x791 (real)", LANDSAT, {"band_names": ["red", "green", "blue"]}))
        for size in args.sizes:
            start = time.perf_counter()
            path = write_synthetic(Path(tmp) / f"s{size}.tif", size)
            print(f"wrote synthetic 13x{size}x{size} uint16 ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
            scenes.append((f"synthetic 13x{size}x{size}", path, {}))
        for label, path, options in scenes:
            for mode in ("grid-window", "random-window", "grid-whole"):
                rate, peak, base, n = measure(path, options, args.tile_size, args.tiles, mode)
                rows.append((label, mode, n, rate, base, peak))
                print(f"  {label:32s} {mode:14s} {n:4d} tiles {rate:8.1f} tiles/s  peak RSS {peak:7.0f} MiB", flush=True)
    print(f"\nTiles of {args.tile_size}x{args.tile_size}, all bands, float32 out, nodata filled; one process per row.\n")
    print("| scene | read | tiles | tiles/s | import RSS MiB | peak RSS MiB | peak - import MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, mode, n, rate, base, peak in rows:
        print(f"| {label} | {mode} | {n} | {rate:.1f} | {base:.0f} | {peak:.0f} | {peak - base:.0f} |")


if __name__ == "__main__":
    main()
