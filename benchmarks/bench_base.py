"""What an embedded base buys: frozen features of random init, the shipped ``fractal_vit_tiny`` and candidate bases.

Every backbone is the same architecture (ViT-Tiny, 6 blocks, width 192, patch 8, 64 px) and stays
frozen; only the weights differ. Random init is measured for three init seeds; a candidate base
is a ``.safetensors`` file written by ``insitu base pretrain`` (same architecture). Four measurements,
all on real data from ``../shared/data``:

- PneumoniaMNIST (chest X-rays, 2 classes): linear probe and kNN on CLS + mean patch token, the
  library's repeated protocol (stratified 5-fold × repeats, 100 % and 10 % of the labels).
- BUSI (breast ultrasound, 3 classes): the same, folds grouped by near-duplicate hash; plus the
  segmentation proxy: a linear 1×1 probe on patch tokens scored by lesion Dice and mIoU against
  ``busi_masks``.
- Landsat 7 (a real 3-band scene cut into 64 px tiles; no labels): instance retrieval, two random
  crops/flips of every tile, top-1 = how often a view's nearest neighbour among all tiles' second
  views is its own tile (chance = 1 / tiles); three view seeds, each seed's views drawn once (one
  `torch.Generator`) and shared by every backbone.

Differences are paired against the first backbone listed (``fractal_vit_tiny``): for the probes a
percentile bootstrap over test items and repeats (``insitu.heads.stats.paired_bootstrap``), for
retrieval the per-seed differences.

    python benchmarks/bench_base.py                  # from the repository root, ../shared/data present
    python benchmarks/bench_base.py --bases fractal_vit_tiny insitu-runs/base/procedural_vit_tiny/procedural_vit_tiny.safetensors
    python benchmarks/bench_base.py --repeats 1 --pneumonia-items 400   # quicker
    python benchmarks/bench_base.py --bases fractal_vit_tiny a.safetensors b.safetensors c.safetensors --seed-group colour
                                   # a, b, c = one recipe trained with three seeds: also pooled over seeds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from insitu.adapters import AdaptedBackbone
from insitu.backbones import create_backbone
from insitu.config import load_config, validate_config
from insitu.heads.stats import format_delta, seed_interval, verdict
from insitu.objectives.views import random_resized_crop_box
from insitu.pipelines.data import ScannedData, fit_normalizer
from insitu.pipelines.probe import classification_results
from insitu.pipelines.probe_dense import dense_results
from insitu.pipelines.probe_plan import Model, ProbeResult

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medical"
PNEUMONIA = DATA / "pneumoniamnist" / "pneumoniamnist_balanced_trainval.npz"
BUSI, BUSI_MASKS = DATA / "busi", DATA / "busi_masks"
LANDSAT = REPO / "configs" / "remote_sensing" / "landsat_tiles.yaml"
ARCH = {"name": "vit_tiny_patch16_224", "patch_size": 8, "img_size": 64, "kwargs": {"depth": 6}}


def base_name(base: str) -> str:
    """A base's name in every table: a shipped base's name, a ``.safetensors`` file's stem."""
    return Path(base).stem if base.endswith(".safetensors") else base


def backbones(bases: list[str], init_seeds: list[int], in_chans: int) -> list[tuple[str, dict[str, Any]]]:
    """(name, backbone mapping): the shipped bases first (the first is the reference), then random init per seed."""
    out = [
        (
            base_name(b),
            {**ARCH, "weights": b if b.endswith(".safetensors") else f"insitu:{b}", "in_chans": in_chans},
        )
        for b in bases
    ]
    out += [(f"random init (seed {s})", {**ARCH, "weights": None, "init_seed": s, "in_chans": in_chans}) for s in init_seeds]
    return out


def probe_config(dataset: str, args: argparse.Namespace) -> Any:
    if dataset == "pneumoniamnist":
        side = {"domain": "images", "root": str(PNEUMONIA), "options": {"split": "train", "channels": 1}, "max_items": args.pneumonia_items}
    else:
        side = {"domain": "images", "root": str(BUSI), "options": {"channels": 1, "labels": "folders"}}
    side["image_size"] = 64
    probe: dict[str, Any] = {
        "train": side,
        "folds": 5,
        "repeats": args.repeats,
        "label_fractions": [1.0, 0.1],
        "bootstrap": args.bootstrap,
        "knn_k": 20,
        "group_near_duplicates": dataset == "busi",
    }
    if dataset == "busi":
        masks = {**side, "options": {**side["options"], "masks": str(BUSI_MASKS)}}
        probe["dense"] = {"data": masks, "steps": args.dense_steps}
    raw = {"name": f"bench_base_{dataset}", "seed": 0, "data": side, "backbone": {**ARCH, "in_chans": 1}, "probe": probe}
    return validate_config(raw, f"bench_base {dataset}")


def probe_rows(dataset: str, args: argparse.Namespace) -> list[ProbeResult]:
    cfg = probe_config(dataset, args)
    models = [Model(name, AdaptedBackbone(create_backbone(spec)), None, 0) for name, spec in backbones(args.bases, args.init_seeds, 1)]
    results, _ = classification_results(cfg, models)
    if cfg.probe.dense is not None:
        for name, rows in dense_results(cfg, models).items():
            results[name] += rows
    return [r for m in models for r in results[m.name]]


def retrieval_views(images: list[torch.Tensor], seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random crops/flips of every image, N×C×size×size each, drawn from one ``torch.Generator`` seeded ``seed``.

    Every random choice (crop box, flip) comes from that generator, never from torch's or Python's
    global state, so the same seed gives the same views whatever ran before: drawn once per seed and
    passed to every backbone, the retrieval comparison is paired (each backbone sees identical crops).
    """
    gen = torch.Generator().manual_seed(seed)

    def view(img: torch.Tensor) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], (0.5, 1.0), generator=gen)
        x = F.interpolate(img[None, :, top : top + h, left : left + w], size=(size, size), mode="bilinear", align_corners=False)[0]
        return x.flip(-1) if float(torch.rand((), generator=gen)) < 0.5 else x

    a = torch.stack([view(i) for i in images])
    b = torch.stack([view(i) for i in images])
    return a, b


@torch.no_grad()
def retrieval_top1(model: AdaptedBackbone, views: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Top-1 instance retrieval: how often a first view's nearest second view (cosine) is of its own image."""

    def embed(batch: torch.Tensor) -> torch.Tensor:
        out = [model.forward_tokens(batch[k : k + 64]) for k in range(0, len(batch), 64)]
        return F.normalize(torch.cat([torch.cat([cls, patches.mean(1)], 1) for cls, patches, _ in out]), dim=1)

    a, b = embed(views[0]), embed(views[1])
    return float(((a @ b.T).argmax(1) == torch.arange(len(a))).float().mean())


def retrieval_rows(models: dict[str, Any], images: list[torch.Tensor], seeds: list[int]) -> dict[str, list[float]]:
    """Per backbone, top-1 for each view seed; each seed's views are drawn once and shared by all backbones (paired)."""
    out: dict[str, list[float]] = {name: [] for name in models}
    for seed in seeds:
        views = retrieval_views(images, seed)
        for name, model in models.items():
            out[name].append(retrieval_top1(model, views))
    return out


def landsat_rows(args: argparse.Namespace) -> tuple[dict[str, list[float]], int]:
    cfg = load_config(LANDSAT, [])
    data = ScannedData.scan(cfg.data)
    items = data.manifest.items
    norm = fit_normalizer(data, items)
    images = [norm(data.domain.load(i, data.manifest)["image"].float()) for i in items]
    specs = backbones(args.bases, args.init_seeds, images[0].shape[0])
    models = {name: AdaptedBackbone(create_backbone(spec)).eval() for name, spec in specs}
    return retrieval_rows(models, images, args.view_seeds), len(images)


def print_probe(dataset: str, rows: list[ProbeResult], reference: str) -> None:
    print(f"\n### {dataset}: frozen features, mean ± std over folds × repeats; Δ vs {reference} [95 % CI]\n")
    print("| backbone | probe | labels | metric | mean ± std | Δ vs reference [CI] | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        delta = "—" if r.delta is None else format_delta(r.delta, r.ci_low, r.ci_high)
        print(f"| {r.model} | {r.probe} | {r.labels:.0%} | {r.metric} | {r.mean:.3f} ± {r.std:.3f} | {delta} | {r.verdict or '—'} |")


def print_landsat(rows: dict[str, list[float]], tiles: int, reference: str) -> None:
    print(f"\n### Landsat 7, {tiles} tiles: instance retrieval top-1 (chance {1 / tiles:.3f}), view seeds as columns\n")
    print("| backbone | per seed | mean ± std | Δ vs reference per seed (mean) |")
    print("|---|---|---|---|")
    ref = np.array(rows[reference])
    for name, vals in rows.items():
        v = np.array(vals)
        d = v - ref
        diff = "—" if name == reference else f"{', '.join(f'{x:+.3f}' for x in d)} ({d.mean():+.3f})"
        print(f"| {name} | {', '.join(f'{x:.3f}' for x in v)} | {v.mean():.3f} ± {v.std(ddof=1):.3f} | {diff} |")


def seed_groups(args: argparse.Namespace) -> dict[str, list[str]]:
    """Backbones pooled over seeds: ``--seed-group`` names the candidate bases (all but the first), plus random init."""
    names = [name for name, _ in backbones(args.bases, args.init_seeds, 1)]
    groups = {"random init": [n for n in names if n.startswith("random init")]}
    if args.seed_group and len(args.bases) > 1:
        groups[args.seed_group] = names[1 : len(args.bases)]
    return {k: v for k, v in groups.items() if v}


def print_seed_summary(values: dict[str, dict[str, float]], reference: str, groups: dict[str, list[str]]) -> None:
    """Per group: mean ± std over its seeds, and the mean Δ vs the reference with a Student-t interval over seeds.

    ``values`` maps a row key (probe, labels, metric) to {backbone: mean}.
    """
    print(f"\n#### pooled over seeds: mean ± std of the per-seed means; Δ vs {reference}, Student-t 95 % CI over seeds\n")
    print("| backbone (seeds) | row | mean ± std | Δ vs reference [t-CI] | verdict |")
    print("|---|---|---|---|---|")
    for key, per_model in values.items():
        for label, members in groups.items():
            v = np.array([per_model[m] for m in members])
            mean, lo, hi = seed_interval(v - per_model[reference])
            std = v.std(ddof=1) if len(v) > 1 else float("nan")
            print(f"| {label} ({len(v)}) | {key} | {v.mean():.3f} ± {std:.3f} | {format_delta(mean, lo, hi)} | {verdict(lo, hi) if len(v) > 1 else '—'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bases",
        nargs="+",
        default=["fractal_vit_tiny"],
        help="shipped base names or .safetensors files of the same ViT (first = reference)",
    )
    parser.add_argument("--init-seeds", nargs="*", type=int, default=[0, 1, 2], help="random-init seeds (none: no random-init rows)")
    parser.add_argument(
        "--datasets", nargs="+", default=["pneumoniamnist", "busi", "landsat"], choices=["pneumoniamnist", "busi", "landsat"]
    )
    parser.add_argument("--pneumonia-items", type=int, default=1000, help="PneumoniaMNIST train images the probe folds")
    parser.add_argument("--repeats", type=int, default=2, help="probe repeats (5 folds each)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--dense-steps", type=int, default=100)
    parser.add_argument("--view-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--seed-group", default="", help="label for the candidate bases (all but the first) when they are seeds of one recipe"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = base_name(args.bases[0])  # tables key every base by its name, a file by its stem
    for dataset in args.datasets:
        start = time.perf_counter()
        if dataset == "landsat":
            rows, tiles = landsat_rows(args)
            print_landsat(rows, tiles, reference)
            values = {"retrieval top-1": {name: float(np.mean(v)) for name, v in rows.items()}}
        else:
            probe_results = probe_rows(dataset, args)
            print_probe(dataset, probe_results, reference)
            values = {}
            for r in probe_results:
                values.setdefault(f"{r.probe} {r.labels:.0%} {r.metric}", {})[r.model] = r.mean
        print_seed_summary(values, reference, seed_groups(args))
        print(f"\n({dataset}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
