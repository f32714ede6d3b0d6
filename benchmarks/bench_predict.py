"""Whole-scene prediction: peak memory of ``insitu predict`` on large synthetic GeoTIFFs versus their size.

Each measurement runs in a fresh process (spawn), so its peak RSS (``ru_maxrss``) is its own;
``import RSS`` is the same process after imports and model construction, so ``peak - import`` is
what the prediction itself costs. The model is a 2-block ViT with a linear segmentation head
(random init: memory, not accuracy, is measured here), tiles of 256 px resized to 64 px.

Baseline, measured in the same run: the naive whole-scene path, reading the scene with
``src.read()`` and predicting into a full K×H×W float32 score array (no model call, so the
baseline's numbers are a lower bound for that approach).

    python benchmarks/bench_predict.py [--sizes 2048 4096] [--bands 6] [--tile 256]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 4


def write_scene(path: Path, size: int, bands: int, seed: int = 0) -> Path:
    """A tiled uint16 GeoTIFF of ``bands`` × ``size``², written in strips (bench_geotiff's writer)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_geotiff import write_synthetic

    return write_synthetic(path, size, bands, seed)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _model(bands: int):  # noqa: ANN202 - a DownstreamModel (imported in the child)
    import torch

    from insitu.adapters import AdaptedBackbone
    from insitu.backbones import create_backbone
    from insitu.config import BackboneConfig
    from insitu.heads import create_head
    from insitu.pipelines.finetune import DownstreamModel

    torch.set_num_threads(2)
    spec = {
        "name": "vit_tiny_patch16_224",
        "patch_size": 8,
        "img_size": 64,
        "in_chans": bands,
        "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
    }
    backbone = create_backbone(BackboneConfig.model_validate(spec))
    return DownstreamModel(AdaptedBackbone(backbone), create_head("segmentation", "linear", 48, K), "segmentation", 1).eval()


def _child(mode: str, scene: str, bands: int, tile: int, out: str, queue: mp.Queue) -> None:
    from insitu.domains.geotiff import GeoTiffDomain
    from insitu.domains.geotiff.write import predict_scene
    from insitu.pipelines.predict import make_predictor

    model = _model(bands)
    import rasterio

    base = _rss_mb()
    start = time.perf_counter()
    if mode == "insitu predict (tiled)":
        domain = GeoTiffDomain({"tile_size": tile, "scale": 1e-4, "labels": "none"})
        batched = make_predictor(model, None, 64)
        predict_scene(domain, scene, lambda t: batched([t])[0], Path(out), K, tile_size=tile, overlap=tile // 4)
    else:
        with rasterio.open(scene) as src:
            image = src.read().astype(np.float32) * 1e-4
            scores = np.zeros((K, src.height, src.width), np.float32)
            scores[0] = image[0]  # touch the arrays so they are really allocated
    queue.put((base, _rss_mb(), time.perf_counter() - start))


def measure(mode: str, scene: Path, bands: int, tile: int, out: Path) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(mode, str(scene), bands, tile, str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--bands", type=int, default=6)
    ap.add_argument("--tile", type=int, default=256)
    args = ap.parse_args()
    print(
        f"{'scene':>12} {'decoded MB':>10} {'file MB':>8} | {'mode':<24} {'import RSS':>10} {'peak RSS':>9} {'peak-import':>11} {'time s':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            scene = write_scene(Path(tmp) / f"scene_{size}.tif", size, args.bands)
            decoded = size * size * args.bands * 2 / 2**20
            file_mb = scene.stat().st_size / 2**20
            for mode in ("naive whole-scene read", "insitu predict (tiled)"):
                base, peak, secs = measure(mode, scene, args.bands, args.tile, Path(tmp) / f"classes_{size}.tif")
                print(
                    f"{size:>5}²×{args.bands:<2}b  {decoded:>10.0f} {file_mb:>8.0f} | {mode:<24} {base:>10.0f} {peak:>9.0f} "
                    f"{peak - base:>11.0f} {secs:>7.1f}"
                )


if __name__ == "__main__":
    main()
