"""What the embedded fractal base buys: random init vs fractal base vs fractal base + GLARE adapters.

PneumoniaMNIST (real chest X-rays, upsampled to 64 px): linear-probe and kNN accuracy on the
validation split, features from the frozen backbone (and with adapters trained on the training
split). Landsat (real 3-band scene, 64 px tiles): no labels exist, so the label-free check is
instance retrieval: two random crops/flips of every tile, and how often a view's nearest
neighbour among all other tiles' second views is its own tile (chance = 1 / tiles).

    python benchmarks/bench_base.py                  # from the repository root, ../shared/data present
    python benchmarks/bench_base.py --steps 50       # quicker adapter training
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import apply_package
from insitu.backbones import create_backbone
from insitu.config import load_config
from insitu.objectives.views import random_resized_crop_box
from insitu.pipelines.data import ScannedData, fit_normalizer
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe

PNEUMONIA = "configs/medical/pneumoniamnist_glare.yaml"
LANDSAT = "configs/remote_sensing/landsat_tiles.yaml"
BASE = "backbone.weights=insitu:fractal_vit_tiny"
RANDOM = "backbone.weights=null"  # the same architecture (vit_tiny, depth 6, patch 8), random init seed 0
# GLARE (global + local + regional) for the Landsat run too, with the PneumoniaMNIST config's options
GLARE = [
    "objective.name=glare",
    "objective.options={out_dim: 1024, teacher_temp: 0.07, warmup_teacher_temp: 0.04, warmup_teacher_temp_steps: 30, "
    "views: {global_crops: 2, local_crops: 2}, local: {enabled: true, ratio: 0.3}, regional: {enabled: true, regions: 4}}",
]


def pneumonia_rows(steps: int, out: Path) -> list[tuple[str, float, float, float]]:
    rows = []
    start = time.perf_counter()
    cfg = load_config(PNEUMONIA, [f"out_dir={out}", RANDOM])
    r = run_probe(cfg)[0]
    rows.append(("random init (frozen)", r.linear_acc, r.knn_acc, time.perf_counter() - start))
    cfg = load_config(PNEUMONIA, [f"out_dir={out}", BASE, f"train.max_steps={steps}", "name=pneu_fractal"])
    start = time.perf_counter()
    result = pretrain(cfg, quiet=True)
    frozen, adapted = run_probe(cfg, [result.adapter_dir])
    wall = time.perf_counter() - start
    rows.append(("fractal base (frozen)", frozen.linear_acc, frozen.knn_acc, wall))
    rows.append((f"fractal base + GLARE adapters ({steps} steps)", adapted.linear_acc, adapted.knn_acc, wall))
    return rows


@torch.no_grad()
def retrieval_top1(model: AdaptedBackbone | None, images: list[torch.Tensor], seed: int = 0) -> float:
    """Top-1 instance retrieval; ``model=None`` embeds a view by its mean colour only (a control)."""
    random.seed(seed)

    def view(img: torch.Tensor) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], (0.5, 1.0))
        x = F.interpolate(img[None, :, top : top + h, left : left + w], size=(64, 64), mode="bilinear", align_corners=False)[0]
        return x.flip(-1) if random.random() < 0.5 else x

    def embed(batch: torch.Tensor) -> torch.Tensor:
        if model is None:
            return F.normalize(batch.mean((2, 3)), dim=1)
        cls, patches, _ = model.forward_tokens(batch)
        return F.normalize(torch.cat([cls, patches.mean(1)], 1), dim=1)

    a = torch.cat([embed(torch.stack([view(i) for i in images[k : k + 64]])) for k in range(0, len(images), 64)])
    b = torch.cat([embed(torch.stack([view(i) for i in images[k : k + 64]])) for k in range(0, len(images), 64)])
    return float(((a @ b.T).argmax(1) == torch.arange(len(images))).float().mean())


def landsat_rows(steps: int, out: Path) -> tuple[list[tuple[str, float]], int]:
    cfg = load_config(LANDSAT, [f"out_dir={out}", RANDOM])
    data = ScannedData.scan(cfg.data)
    items = data.manifest.items
    norm = fit_normalizer(data, items)
    images = [norm(data.domain.load(i, data.manifest)["image"].float()) for i in items]
    random_model = AdaptedBackbone(create_backbone(cfg.backbone))
    rows = [("random init (frozen)", retrieval_top1(random_model, images))]
    # controls: how much of the task is colour alone, and both backbones on grey views
    grey = [i.mean(0, keepdim=True).expand_as(i) for i in images]
    rows.append(("control: mean colour of the view only (3 numbers)", retrieval_top1(None, images)))
    rows.append(("control: random init (frozen), grey views", retrieval_top1(random_model, grey)))
    fractal = load_config(LANDSAT, [f"out_dir={out}", BASE, f"train.max_steps={steps}", "name=landsat_fractal", *GLARE])
    base = create_backbone(fractal.backbone)
    rows.append(("fractal base (frozen)", retrieval_top1(AdaptedBackbone(base), images)))
    rows.append(("control: fractal base (frozen), grey views", retrieval_top1(AdaptedBackbone(base), grey)))
    result = pretrain(fractal, quiet=True)
    rows.append((f"fractal base + GLARE adapters ({steps} steps)", retrieval_top1(apply_package(result.adapter_dir, base), images)))
    return rows, len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="adapter pretraining steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pneu = pneumonia_rows(args.steps, Path(tmp))
        land, n_tiles = landsat_rows(args.steps, Path(tmp))
    print("PneumoniaMNIST (train 2428 / val 270, 64 px, vit_tiny depth 6 patch 8)")
    print("| backbone | linear probe acc | kNN acc | wall s |")
    print("|---|---|---|---|")
    for name, lin, knn, wall in pneu:
        print(f"| {name} | {lin:.3f} | {knn:.3f} | {wall:.0f} |")
    print(f"\nLandsat 7 crop, {n_tiles} tiles of 64 px: instance-retrieval top-1 between two random crops/flips (chance {1 / n_tiles:.3f})")
    print("| backbone | top-1 retrieval |")
    print("|---|---|")
    for name, top1 in land:
        print(f"| {name} | {top1:.3f} |")


if __name__ == "__main__":
    main()
