"""LVM-Med graph matching on PneumoniaMNIST: frozen baseline vs graph matching vs no edge term (issue 9).

Rows: (1) the frozen random-init backbone, no adapters; (2) graph matching (second-order QAP,
IMLE gradients); (3) graph matching without the edge term (first-order: exact LAP by scipy).
The train split pretrains; the probes (logistic-regression linear probe and kNN, k = 20, on
CLS + mean patch token) fit on a spread subset of the train split and score on the val split.
Each training run goes through `insitu.pipelines.pretrain.pretrain` in its own forked process with
one torch thread. Also printed, from each run's logged metrics: the fraction of images matched
to themselves (identity matches) early, midway and late in training, and the solver's share of
the step time (solver seconds, forward + backward solves, over wall seconds per step; data
loading included in the step). The backbone is the random-init tiny ViT family of
configs/medical/pneumoniamnist.yaml (no pretrained base exists in the repository).

    python benchmarks/bench_graph_matching.py --seeds 0 1 2 --steps 150
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA = REPO.parent / "shared" / "data" / "medical" / "pneumoniamnist" / "pneumoniamnist_balanced_trainval.npz"
ROWS: dict[str, dict[str, Any]] = {
    "graph matching (vertex + edge, QAP)": {"edge_term": True},
    "graph matching, no edge term (LAP)": {"edge_term": False},
}


def backbone_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "vit_tiny_patch16_224",
        "patch_size": 8,
        "img_size": args.size,
        "in_chans": 1,
        "kwargs": {"depth": args.depth, "embed_dim": args.embed_dim, "num_heads": max(1, args.embed_dim // 32)},
    }


def data_side(split: str, max_items: int | None = None) -> dict[str, Any]:
    return {"domain": "images", "root": str(PNEUMONIA), "options": {"split": split, "channels": 1}, "max_items": max_items}


def run_config(args: argparse.Namespace, row: str, seed: int, out_dir: Path) -> dict[str, Any]:
    """One row as a full run config: same backbone, steps, lr and views for both trained rows."""
    return {
        "name": f"gm_{'qap' if ROWS[row]['edge_term'] else 'lap'}_s{seed}",
        "seed": seed,
        "out_dir": str(out_dir),
        "data": {**data_side("train"), "image_size": args.size},
        "backbone": backbone_spec(args),
        "adapter": {"name": "bottleneck", "options": {"blocks": "all", "bottleneck_dim": 32, "scale": 0.1}},
        "objective": {"name": "graph_matching", "options": {"graph_size": 16, "knn": 5, **ROWS[row]}},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "warmup_steps": max(1, args.steps // 10),
            "checkpoint_every": args.steps,
            "log_every": 5,
        },
        "trainer": {"accelerator": "cpu"},
    }


def probe_scores(model: Any, norm: Any, args: argparse.Namespace) -> dict[str, float]:
    from insitu.config import DataConfig
    from insitu.heads import knn_accuracy, linear_probe_accuracy
    from insitu.pipelines.data import SampleDataset, ScannedData
    from insitu.pipelines.probe import extract_features

    feats = []
    for split, limit in (("train", args.probe_train), ("val", None)):
        data = ScannedData.scan(DataConfig(**data_side(split, limit)))
        feats.append(extract_features(model, SampleDataset(data, data.manifest.items, norm, image_size=args.size), 128))
    (x_tr, y_tr), (x_te, y_te) = feats
    return {"linear": linear_probe_accuracy(x_tr, y_tr, x_te, y_te), "knn": knn_accuracy(x_tr, y_tr, x_te, y_te, 20)}


def frozen_job(args: argparse.Namespace) -> dict[str, Any]:
    from insitu.adapters import AdaptedBackbone
    from insitu.backbones import create_backbone
    from insitu.config import DataConfig
    from insitu.pipelines.data import ScannedData, fit_normalizer

    torch.manual_seed(0)
    data = ScannedData.scan(DataConfig(**data_side("train")))
    model = AdaptedBackbone(create_backbone(backbone_spec(args)), None)
    return probe_scores(model, fit_normalizer(data, data.manifest.items), args)


def logged(run_dir: Path, name: str) -> list[float]:
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return [float(r[name]) for r in rows if r.get(name)]


def train_job(args: argparse.Namespace, row: str, seed: int, out_dir: Path) -> dict[str, Any]:
    from insitu.adapters.package import apply_package, load_package
    from insitu.backbones import create_backbone
    from insitu.config import load_config
    from insitu.domains.normalize import Normalizer
    from insitu.pipelines.pretrain import pretrain

    cfg = load_config(run_config(args, row, seed, out_dir))
    result = pretrain(cfg, quiet=True, overwrite=True)
    pkg = load_package(result.adapter_dir)
    model = apply_package(pkg, create_backbone(cfg.backbone))
    scores = probe_scores(model, Normalizer.from_dict(pkg.meta.normalizer), args)
    ident, solver = logged(result.run_dir, "train/identity_fraction"), logged(result.run_dir, "train/solver_s")
    third = max(1, len(ident) // 3)
    step_s = result.wall_s / max(1, result.steps)
    return {
        **scores,
        "trainable": result.trainable_params,
        "step_s": step_s,
        "solver_share": statistics.mean(solver[1:] or solver) / step_s,  # the first logged step has no backward yet
        "identity_early": statistics.mean(ident[:third]),
        "identity_mid": statistics.mean(ident[third:-third] or ident),
        "identity_late": statistics.mean(ident[-third:]),
    }


def in_child(fn: Any, *fn_args: Any) -> dict[str, Any]:
    """Run ``fn`` in a forked process with one torch thread (the machine is shared)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target() -> None:
        torch.set_num_threads(1)
        child.send(fn(*fn_args))

    proc = ctx.Process(target=target)
    proc.start()
    child.close()  # a crashed child shows up as EOFError, not a hang
    out = parent.recv()
    proc.join()
    return out


def mean_std(values: list[float], fmt: str = ".3f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def print_table(rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\n### PneumoniaMNIST: {len(args.seeds)} seeds, {args.steps} steps, batch {args.batch}, {args.size} px\n")
    print("| row | linear acc | kNN acc | trainable params | s/step | solver share of step | identity matches early → mid → late |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        if "step_s" not in runs[0]:
            print(f"| {name} | {mean_std([r['linear'] for r in runs])} | {mean_std([r['knn'] for r in runs])} | 0 | - | - | - |")
            continue
        ident = " → ".join(mean_std([r[f"identity_{k}"] for r in runs], ".2f") for k in ("early", "mid", "late"))
        print(
            f"| {name} | {mean_std([r['linear'] for r in runs])} | {mean_std([r['knn'] for r in runs])} | "
            f"{runs[0]['trainable']:,} | {statistics.mean(r['step_s'] for r in runs):.2f} | "
            f"{mean_std([r['solver_share'] for r in runs], '.1%')} | {ident} |"
        )
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--probe-train", type=int, default=800, help="train items the probes fit on (a spread subset)")
    args = p.parse_args()
    print(f"backbone: {json.dumps(backbone_spec(args))} (random init; no pretrained base in the repo)")
    print(f"steps {args.steps}, batch {args.batch} (graphs of 16), lr {args.lr}, seeds {args.seeds}, 1 torch thread per run")
    rows: dict[str, list[dict[str, Any]]] = {"frozen backbone (no adapters)": [in_child(frozen_job, args)]}
    print(f"frozen: {json.dumps(rows['frozen backbone (no adapters)'][0])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="insitu_gm_") as tmp:
        for row in ROWS:
            rows[row] = []
            for seed in args.seeds:
                start = time.perf_counter()
                rows[row].append(in_child(train_job, args, row, seed, Path(tmp)))
                print(f"{row} seed {seed}: {json.dumps(rows[row][-1])} ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
