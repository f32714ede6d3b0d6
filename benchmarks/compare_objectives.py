"""GLARE's protocol rows on real data, several seeds, one table (issue 7).

Rows: (1) frozen backbone, no adapters; (2) GLARE global only; (3) global + local;
(4) global + local + regional; (5) full fine-tuning of the backbone with the global objective.
Datasets: PneumoniaMNIST (its train split pretrains, probes fit on a spread subset of train and
score on val) and BUSI (seeded stratified near-duplicate-aware split, `insitu.domains.near_duplicates`;
only the train side pretrains). Plus a segmentation proxy: a linear 1×1-conv probe on patch
tokens for foreground/background of the quickstart shapes generator, before/after GLARE.

Every training run goes through `insitu.pipelines.pretrain.pretrain` in its own forked process,
so the peak resident memory printed is that run's (it includes the ~0.4 GB of imported
libraries that every row shares). Step time is the run's wall time over its optimizer steps
(data loading included). The backbone is either the shipped fractal base (``--base
fractal_vit_tiny``, the best pretrained base inside the repository; ViT-Tiny depth 6, patch 8, run
at its native 64 px) or, without ``--base``, the random-init tiny ViT family of
configs/medical/pneumoniamnist.yaml scaled by the flags below to fit a shared 2-core CPU.

    python benchmarks/compare_objectives.py --base fractal_vit_tiny --seeds 0 1 2 --steps 100
    python benchmarks/compare_objectives.py --seeds 0 1 2 --steps 100          # random-init ViT
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medical"
PNEUMONIA = DATA / "pneumoniamnist" / "pneumoniamnist_balanced_trainval.npz"
BUSI = DATA / "busi"

ROWS: dict[str, dict[str, Any]] = {
    "glare global": {"global_term": True, "local": {"enabled": False}, "regional": {"enabled": False}},
    "glare global+local": {"global_term": True, "local": {"enabled": True}, "regional": {"enabled": False}},
    "glare global+local+regional": {"global_term": True, "local": {"enabled": True}, "regional": {"enabled": True}},
    "full fine-tune (global)": {"global_term": True, "local": {"enabled": False}, "regional": {"enabled": False}},
}


def backbone_spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.base:  # the shipped base fixes its own architecture (its card); only size and bands vary
        return {"weights": f"insitu:{args.base}", "img_size": args.size, "in_chans": 1}
    heads = max(1, args.embed_dim // 32)
    return {
        "name": "vit_tiny_patch16_224",
        "patch_size": 8,
        "img_size": args.size,
        "in_chans": 1,
        "kwargs": {"depth": args.depth, "embed_dim": args.embed_dim, "num_heads": heads},
    }


def run_config(args: argparse.Namespace, data: dict[str, Any], row: str, seed: int, out_dir: Path) -> dict[str, Any]:
    """One protocol row as a full run config (same backbone, steps, lr and views for every row)."""
    options = {
        "out_dim": 1024,
        "views": {"global_crops": 2, "local_crops": 2, "global_scale": [0.5, 1.0], "local_scale": [0.2, 0.5]},
        **ROWS[row],
    }
    return {
        "name": f"{row.replace(' ', '_')}_s{seed}",
        "seed": seed,
        "out_dir": str(out_dir),
        "data": {**data, "image_size": args.size},
        "backbone": backbone_spec(args),
        "adapter": {"name": "bottleneck", "options": {"blocks": "all", "bottleneck_dim": 32, "scale": 0.1}},
        "objective": {"name": "glare", "options": options},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "warmup_steps": max(1, args.steps // 10),
            "ema_momentum": args.ema,
            "checkpoint_every": args.steps,
            "full_finetune": row.startswith("full"),
        },
        "trainer": {"accelerator": "cpu"},
    }


# ---------------------------------------------------------------- data sides


def pneumonia_sides(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from insitu.config import DataConfig
    from insitu.pipelines.data import ScannedData

    train = ScannedData.scan(
        DataConfig(domain="images", root=PNEUMONIA, options={"split": "train", "channels": 1}, max_items=args.probe_train)
    )
    test = ScannedData.scan(DataConfig(domain="images", root=PNEUMONIA, options={"split": "val", "channels": 1}))
    pretrain_data = {"domain": "images", "root": str(PNEUMONIA), "options": {"split": "train", "channels": 1}}
    return {"pretrain": pretrain_data, "train": (train, train.manifest.items), "test": (test, test.manifest.items)}


def busi_sides(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """BUSI split; the pretraining root is a folder of links to the train side only (sources untouched)."""
    from insitu.domains import create_domain
    from insitu.domains.near_duplicates import split_class_folders
    from insitu.pipelines.data import ScannedData

    manifest, train, test = split_class_folders(BUSI, test_fraction=0.3, seed=0)
    link_root = tmp / "busi_train_links"
    for item in train:
        src = Path(item.path)
        dst = link_root / manifest.class_names[item.label] / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src)
    data = ScannedData(create_domain("images", {"channels": 1, "labels": "folders"}), manifest)
    pretrain_data = {"domain": "images", "root": str(link_root), "options": {"channels": 1}}
    return {"pretrain": pretrain_data, "train": (data, train), "test": (data, test)}


# ---------------------------------------------------------------- one run (in a child process)


def load_trained(result: Any, cfg: Any) -> tuple[Any, Any]:
    """The trained model (adapters, plus the fine-tuned backbone for full fine-tuning) and its normaliser."""
    from safetensors.torch import load_file

    from insitu.adapters.package import apply_package, load_package
    from insitu.backbones import create_backbone
    from insitu.domains.normalize import Normalizer

    backbone = create_backbone(cfg.backbone)
    pkg = load_package(result.adapter_dir)
    model = apply_package(pkg, backbone)
    tuned = result.run_dir / "backbone.safetensors"
    if tuned.exists():
        backbone.vit.load_state_dict(load_file(str(tuned)))
    return model, Normalizer.from_dict(pkg.meta.normalizer)


def probe_scores(model: Any, norm: Any, sides: dict[str, Any], size: int) -> dict[str, float]:
    from insitu.heads import knn_accuracy, linear_probe_accuracy
    from insitu.pipelines.data import SampleDataset
    from insitu.pipelines.probe import extract_features

    (tr_data, tr_items), (te_data, te_items) = sides["train"], sides["test"]
    x_tr, y_tr = extract_features(model, SampleDataset(tr_data, tr_items, norm, image_size=size), 128)
    x_te, y_te = extract_features(model, SampleDataset(te_data, te_items, norm, image_size=size), 128)
    return {"linear": linear_probe_accuracy(x_tr, y_tr, x_te, y_te), "knn": knn_accuracy(x_tr, y_tr, x_te, y_te, 20)}


def frozen_job(args: argparse.Namespace, sides: dict[str, Any]) -> dict[str, Any]:
    from insitu.adapters import AdaptedBackbone
    from insitu.backbones import create_backbone
    from insitu.pipelines.data import fit_normalizer

    data, items = sides["train"]
    model = AdaptedBackbone(create_backbone(backbone_spec(args)), None)
    scores = probe_scores(model, fit_normalizer(data, items), sides, args.size)
    return {**scores, "trainable": 0, "step_s": 0.0}


def train_job(args: argparse.Namespace, sides: dict[str, Any], row: str, seed: int, out_dir: Path) -> dict[str, Any]:
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain

    cfg = load_config(run_config(args, sides["pretrain"], row, seed, out_dir))
    result = pretrain(cfg, quiet=True, overwrite=True)
    model, norm = load_trained(result, cfg)
    scores = probe_scores(model, norm, sides, args.size)
    collapse = final_metric(result.run_dir, "train/collapse_std")
    return {**scores, "trainable": result.trainable_params, "step_s": result.wall_s / max(1, result.steps), "collapse": collapse}


def final_metric(run_dir: Path, name: str) -> float | None:
    import csv

    path = run_dir / "logs" / "metrics.csv"
    rows = [r for r in csv.DictReader(path.open()) if r.get(name)] if path.exists() else []
    return float(rows[-1][name]) if rows else None


def in_child(fn: Any, *fn_args: Any) -> dict[str, Any]:
    """Run ``fn`` in a forked process; return its result plus that process's peak RSS (MB)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target() -> None:
        torch.set_num_threads(1)  # the machine is shared: 1 thread per run gives steadier timings
        out = fn(*fn_args)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child.send(out)

    proc = ctx.Process(target=target)
    proc.start()
    child.close()  # so that a crashed child shows up as EOFError instead of a hang
    out = parent.recv()
    proc.join()
    return out


# ---------------------------------------------------------------- segmentation proxy


def shapes_set(root: Path, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey textured shapes (the quickstart generator) as PNGs under ``root`` and (images, fg masks) arrays."""
    from PIL import Image

    from insitu.domains.synthetic import SHAPES, make_shape_image

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        label = i % len(SHAPES)
        img, mask = make_shape_image(rng, label, size, channels=1)
        (root / SHAPES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / SHAPES[label] / f"{i:04d}.png")
        images.append(img[..., 0])
        masks.append(mask > 0)
    return np.stack(images), np.stack(masks)


def seg_probe_miou(model: Any, norm: Any, images: np.ndarray, masks: np.ndarray, n_train: int, patch: int) -> float:
    """Fit a 1×1 conv (per-token logistic regression) on patch tokens; pixel mIoU (bg, fg) on the rest."""
    x = norm(torch.from_numpy(images).float()[:, None])
    with torch.no_grad():
        tokens = model.forward_tokens(x)[1]  # B×N×D
    b, n, d = tokens.shape
    side = int(n**0.5)
    target = torch.from_numpy(masks).float()[:, None]
    patch_fg = torch.nn.functional.avg_pool2d(target, patch).flatten(1) > 0.5  # majority label per patch
    conv = torch.nn.Linear(d, 2)
    opt = torch.optim.Adam(conv.parameters(), lr=0.01)
    feats = (tokens - tokens[:n_train].mean((0, 1))) / (tokens[:n_train].std((0, 1)) + 1e-6)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(conv(feats[:n_train]).flatten(0, 1), patch_fg[:n_train].flatten().long())
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = conv(feats[n_train:]).transpose(1, 2).reshape(b - n_train, 2, side, side)
        pred = torch.nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear").argmax(1)
    truth = torch.from_numpy(masks[n_train:]).long()
    ious = [((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum().clamp(min=1) for c in (0, 1)]
    return float(torch.stack(ious).mean())


def seg_job(args: argparse.Namespace, row: str | None, seed: int, tmp: Path) -> dict[str, Any]:
    from insitu.adapters import AdaptedBackbone
    from insitu.backbones import create_backbone
    from insitu.config import load_config
    from insitu.domains.normalize import Normalizer
    from insitu.pipelines.pretrain import pretrain

    root = tmp / "shapes"
    images, masks = shapes_set(root, args.seg_items, args.size, seed=123)
    n_train = args.seg_items * 2 // 3
    if row is None:
        norm = Normalizer.fit([torch.from_numpy(im).float()[None] for im in images[:n_train]])
        model = AdaptedBackbone(create_backbone(backbone_spec(args)), None)
        return {"miou": seg_probe_miou(model, norm, images, masks, n_train, 8)}
    raw = run_config(args, {"domain": "images", "root": str(root), "options": {"channels": 1}}, row, seed, tmp / "seg_runs")
    raw["train"]["max_steps"] = args.seg_steps
    cfg = load_config(raw)
    result = pretrain(cfg, quiet=True, overwrite=True)
    model, norm = load_trained(result, cfg)
    return {"miou": seg_probe_miou(model, norm, images, masks, n_train, 8)}


# ---------------------------------------------------------------- table


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_table(title: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n### {title}\n")
    print("| row | linear acc | kNN acc | trainable params | s/step | peak RSS MB | final collapse_std |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        collapse = [r["collapse"] for r in runs if r.get("collapse") is not None]
        print(
            f"| {name} | {mean_std([r['linear'] for r in runs])} | {mean_std([r['knn'] for r in runs])} | "
            f"{runs[0]['trainable']:,} | {statistics.mean(r['step_s'] for r in runs):.2f} | "
            f"{max(r['peak_rss_mb'] for r in runs):.0f} | {mean_std(collapse) if collapse else '-'} |"
        )
    sys.stdout.flush()


def run_dataset(args: argparse.Namespace, name: str, sides: dict[str, Any], tmp: Path) -> None:
    rows: dict[str, list[dict[str, Any]]] = {"frozen backbone (no adapters)": [in_child(frozen_job, args, sides)]}
    for row in ROWS:
        rows[row] = []
        for seed in args.seeds:
            start = time.perf_counter()
            rows[row].append(in_child(train_job, args, sides, row, seed, tmp / name))
            print(f"[{name}] {row} seed {seed}: {json.dumps(rows[row][-1])} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(f"{name}: {len(args.seeds)} seeds, {args.steps} steps", rows)


def run_seg(args: argparse.Namespace, tmp: Path) -> None:
    print(f"\n### segmentation proxy: linear 1x1-conv probe on patch tokens, shapes fg/bg, {args.seg_steps} steps\n")
    print("| row | pixel mIoU |")
    print("|---|---|")
    frozen = in_child(seg_job, args, None, 0, tmp)
    print(f"| frozen backbone | {frozen['miou']:.3f} |", flush=True)
    for row in ("glare global", "glare global+local+regional"):
        runs = [in_child(seg_job, args, row, seed, tmp) for seed in args.seeds]
        print(f"| {row} | {mean_std([r['miou'] for r in runs])} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--base", default=None, help="a shipped base (insitu:<name>), e.g. fractal_vit_tiny")
    p.add_argument("--size", type=int, default=None, help="image size (default: 64 with --base, else 48)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--probe-train", type=int, default=800, help="PneumoniaMNIST train items the probes fit on")
    p.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "busi"], choices=["pneumoniamnist", "busi"])
    p.add_argument("--seg-items", type=int, default=150)
    p.add_argument("--seg-steps", type=int, default=60)
    p.add_argument("--no-seg", action="store_true")
    args = p.parse_args()
    args.size = args.size or (64 if args.base else 48)
    origin = f"shipped base insitu:{args.base}" if args.base else "random init, seed 0"
    print(f"backbone: {json.dumps(backbone_spec(args))} ({origin})")
    print(f"steps {args.steps}, batch {args.batch}, lr {args.lr}, ema {args.ema}, seeds {args.seeds}, 1 torch thread per run")
    with tempfile.TemporaryDirectory(prefix="insitu_glare_") as tmp_name:
        tmp = Path(tmp_name)
        builders = {"pneumoniamnist": pneumonia_sides, "busi": busi_sides}
        for name in args.datasets:
            run_dataset(args, name, builders[name](args, tmp), tmp)
        if not args.no_seg:
            run_seg(args, tmp)


if __name__ == "__main__":
    main()
