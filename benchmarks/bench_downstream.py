"""Downstream heads on the shipped base: linear vs smp decoders, head-only vs adapters + head, over seeds.

Tasks (real data under ../shared/data):

- ``busi_seg``: BUSI lesion segmentation (622 breast-ultrasound images with lesion masks), the
  committed split: stratified per class, near-duplicates grouped by a perceptual hash
  (``probe.group_near_duplicates``, split seed 0, 30 % test); heads ``linear``, ``fpn``, ``upernet``.
- ``busi_cls``: BUSI benign / malignant / normal classification on the same split; a linear head.
- ``polypgen_AB`` / ``polypgen_BA``: PolypGen polyp / no-polyp, trained on one centre and tested on
  the other (no-polyp frames grouped by sequence); a linear head.

Each (task, head, mode) runs in its own spawned process (its peak RSS is its own) and trains one
fresh head per seed on one shared frozen backbone (`insitu.pipelines.finetune`): ``mode: head``
trains on features cached once, ``mode: adapters`` trains zero-initialised bottleneck adapters in
every block with the head. Validation: 10 % of the training groups, every steps/4; the best
weights on it are kept (the test split is never looked at during training). The table gives the
test metric mean ± std over seeds, each row's paired difference to the baseline row of the same
task (linear head, head only) with a Student-t 95 % interval over seeds, trainable parameters,
seconds per training step (Lightning fit time / steps) and peak RSS.

BigEarthNet multi-label is not in the table: the data here holds 3 patches, too few for any metric.

    python benchmarks/bench_downstream.py --tasks busi_seg busi_cls polypgen_AB polypgen_BA --seeds 0 1 2 --out bench-downstream
    python benchmarks/bench_downstream.py --tasks busi_seg --heads fpn --modes head --seeds 0 --steps 2 --max-items 40   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_objectives import in_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BUSI, BUSI_MASKS = DATA / "medical" / "busi", DATA / "medical" / "busi_masks"
POLYPGEN = DATA / "endoscopy" / "polypgen"
TASK_HEADS = {"busi_seg": ["linear", "fpn", "upernet"], "busi_cls": ["linear"], "polypgen_AB": ["linear"], "polypgen_BA": ["linear"]}
MAIN = {"segmentation": "mIoU", "classification": "balanced_accuracy"}


def task_config(task: str, head: str, mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One run config: the shipped base at ``--size`` px, bottleneck adapters, the task's data and head."""
    seg = task == "busi_seg"
    if task.startswith("busi"):
        options: dict[str, Any] = {"channels": 1, "labels": "folders", **({"masks": str(BUSI_MASKS)} if seg else {})}
        data = {"domain": "images", "root": str(BUSI), "options": options, "image_size": args.size, "max_items": args.max_items}
        probe: dict[str, Any] = {"test_fraction": 0.3, "group_near_duplicates": True}
        chans = 1
    else:
        train, test = ("centre_A", "centre_B") if task.endswith("AB") else ("centre_B", "centre_A")
        # aspect crop: frame size gives the class away otherwise (docs/surgical_video.md, "Size and aspect shortcuts")
        options = {"channels": 3, "labels": "folders", "group_pattern": r"^(seq\d+)_", "aspect": "crop"}
        side = {"domain": "images", "options": options, "image_size": args.size, "max_items": args.max_items}
        data = {**side, "root": str(POLYPGEN / train)}
        probe = {"train": data, "test": {**side, "root": str(POLYPGEN / test)}}
        chans = 3
    return {
        "name": f"{task}_{head}_{mode}",
        "seed": 0,  # the split's seed; heads are seeded by downstream.seeds
        "out_dir": str(out),
        "data": data,
        "backbone": {"weights": "insitu:fractal_vit_tiny", "img_size": args.size, "in_chans": chans},
        "adapter": {"name": "bottleneck", "options": {"blocks": "all", "bottleneck_dim": 32, "scale": 0.1}},
        "trainer": {"accelerator": args.accelerator},
        "probe": probe,
        "downstream": {
            "task": "segmentation" if seg else "classification",
            "head": head,
            "mode": mode,
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": args.batch,
            "layers": 4,
            "decoder_dim": 64,
            "val_fraction": 0.1,
            "val_every": max(1, args.steps // 4),
            "augment": args.augment,
            "seeds": args.seeds,
        },
    }


def run_job(raw: dict[str, Any]) -> dict[str, Any]:
    """Every seed of one (task, head, mode): one backbone, the data loaded once, features cached once in head mode."""
    from insitu.backbones import create_backbone
    from insitu.config import load_config
    from insitu.pipelines.finetune import build_model, encode, predict_logits, prepare, task_metrics, train_downstream, trainable_count

    cfg = load_config(raw)
    ds = cfg.downstream
    data = prepare(cfg, None)
    backbone = create_backbone(cfg.backbone)
    cache_s, cache = 0.0, None
    if ds.mode == "head" and ds.augment == "none":
        start = time.perf_counter()
        cache = encode(build_model(cfg, None, data.k, backbone), data.train.images)
        cache_s = time.perf_counter() - start
    seeds = []
    for seed in ds.seeds:
        model = build_model(cfg, None, data.k, backbone)
        start = time.perf_counter()
        history, trainer = train_downstream(cfg, model, data, seed, cache)
        fit_s = time.perf_counter() - start
        metrics = task_metrics(ds, predict_logits(model, data.test.images), data.test.targets, data.k)
        seeds.append({"seed": seed, "metrics": metrics, "fit_s": fit_s, "steps": trainer.global_step, "loss_last": history[-1]})
    return {
        "name": cfg.name,
        "trainable_params": trainable_count(model, ds.mode),
        "n_train": len(data.train.images),
        "n_val": len(data.val.images) if data.val is not None else 0,
        "n_test": len(data.test.images),
        "cache_s": cache_s,
        "seeds": seeds,
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per run, the main metric mean ± std, Δ to the task's baseline with its t-interval, params, s/step, RSS."""
    import numpy as np

    from insitu.heads.stats import seed_interval

    lines = [
        "| task | head | mode | metric | mean ± std | Δ vs linear head-only [95 % CI] | trainable | s/step | peak RSS MB |",
        "|" + "---|" * 9,
    ]
    for run in runs:
        task, head, mode = run["task"], run["head"], run["mode"]
        metric = MAIN["segmentation" if task == "busi_seg" else "classification"]
        base = next(r for r in runs if r["task"] == task and r["head"] == "linear" and r["mode"] == "head")
        values = {s["seed"]: s["metrics"][metric] for s in run["seeds"]}
        ref = {s["seed"]: s["metrics"][metric] for s in base["seeds"]}
        v = np.array(list(values.values()))
        if run is base:
            delta = "baseline"
        else:
            diffs = [values[s] - ref[s] for s in values if s in ref]
            mean, lo, hi = seed_interval(diffs)
            delta = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        step = np.mean([s["fit_s"] / max(1, s["steps"]) for s in run["seeds"]])
        lines.append(
            f"| {task} | {head} | {mode} | {metric} | {v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f} | {delta} | "
            f"{run['trainable_params']:,} | {step:.3f} | {run['peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_HEADS), choices=list(TASK_HEADS))
    p.add_argument("--heads", nargs="+", default=None, help="restrict the heads (default: each task's own)")
    p.add_argument("--modes", nargs="+", default=["head", "adapters"], choices=["head", "adapters"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--augment", default="none")
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench-downstream"))
    p.add_argument("--from-runs", type=Path, help="reprint the table from a runs.jsonl without training")
    args = p.parse_args()
    if args.from_runs:
        print(table([json.loads(line) for line in args.from_runs.read_text().splitlines() if line.strip()]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    # a run already in --out's runs.jsonl (same task, head, mode) is kept, not repeated: an interrupted benchmark continues
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    done = {(r["task"], r["head"], r["mode"]) for r in runs}
    for task in args.tasks:
        heads = ["linear", *[h for h in TASK_HEADS[task] if h != "linear" and (args.heads is None or h in args.heads)]]
        for head in heads:  # the baseline (linear, head only) always runs, first
            for mode in ["head", *[m for m in args.modes if m != "head"]] if head == "linear" else args.modes:
                if (task, head, mode) in done:
                    continue
                raw = task_config(task, head, mode, args, args.out / "runs")
                result = in_child(run_job, raw) | {"task": task, "head": head, "mode": mode}
                runs.append(result)
                with open(log, "a") as f:
                    f.write(json.dumps(result) + "\n")
                s = result["seeds"]
                print(
                    f"{result['name']}: " + ", ".join(f"s{x['seed']} {x['metrics']}" for x in s) + f" ({sum(x['fit_s'] for x in s):.0f} s)",
                    flush=True,
                )
    print(table([r for r in runs if r["task"] in args.tasks]))


if __name__ == "__main__":
    main()
