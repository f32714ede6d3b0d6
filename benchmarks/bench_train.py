"""Training throughput against the hardware: model FLOPs per step, FLOP/s, MFU against a peak measured in the same run.

Rows, each in its own process (so its peak memory is its own):

- ``mode`` rows: for each ViT (``--models``) and training mode (full fine-tuning, bottleneck
  adapters in all blocks, bottleneck adapters in the last 4 blocks, LoRA r=8 on qkv, head only), one
  supervised step on a fixed batch: forward, cross-entropy, backward, AdamW.
- ``dino`` / ``glare`` rows: a real pretraining step of ``insitu pretrain`` (DINO: 2 global + 2 local views
  from the real view pipeline, the EMA teacher's pass, the student's backward, AdamW, EMA update) on
  bottleneck adapters in all blocks, plus the loader alone (views built from PNG files through
  the same ``SampleDataset`` and ``DataLoader`` the pipeline uses), in images/s: if the loader's
  rate is below the step's, the loader is the bottleneck.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one step as executed
(forward + backward; the optimizer's elementwise work is not counted). The peak is a large matmul
on the same device in the same run, before and after the rows (fp32 on a CPU, bf16 on a GPU, where
training also runs in bf16 autocast); MFU = achieved model FLOP/s / the higher of the two peaks (a
shared machine's speed drifts: 108 and 131 GFLOP/s were measured 40 minutes apart on this CPU). Memory: peak RSS on a CPU, peak CUDA allocation
on a GPU. A CSV (``--csv``) and a markdown table are printed.

    python benchmarks/bench_train.py                                   # ViT-Ti and ViT-S at 224 px, batch 32
    python benchmarks/bench_train.py --models vit_base_patch16_224 --batch 64   # a GPU
    python benchmarks/bench_train.py --models vit_tiny_patch16_224 --size 64 --batch 8 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {
    "full fine-tuning": {"mode": "full"},
    "bottleneck, all blocks": {"mode": "adapter", "adapter": {"kind": "bottleneck", "blocks": "all", "bottleneck_dim": 64}},
    "bottleneck, last 4": {"mode": "adapter", "adapter": {"kind": "bottleneck", "blocks": 4, "bottleneck_dim": 64}},
    "LoRA r=8 (qkv), all blocks": {"mode": "adapter", "adapter": {"kind": "lora", "blocks": "all", "rank": 8}},
    "head only": {"mode": "head"},
}


LEVERS = {
    "baseline": "fp32 on a CPU (bf16 autocast on a GPU), eager, AdamW (foreach)",
    "bf16": "bf16 autocast on the CPU too (trainer.precision: bf16-mixed)",
    "fused_adamw": "AdamW(fused=True) (train.fused_optimizer: true)",
    "compile": "torch.compile(mode='default') of the forward (and loss)",
    "compile_max_autotune": "torch.compile(mode='max-autotune') of the forward (and loss)",
    "channels_last": "input and weights in channels-last layout",
    "device_views": "pretraining rows only: views built from whole batches on the training device "
    "(objective.options.views.device: true); the loader only decodes, normalises and resizes",
}


def autocast_of(device: Any, lever: str) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or lever == "bf16")


def optimizer_of(params: list, lever: str) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=1e-4, fused=True if lever == "fused_adamw" else None)


def maybe_compile(fn: Any, lever: str) -> Any:
    import torch

    if lever.startswith("compile"):
        return torch.compile(fn, mode="max-autotune" if lever.endswith("autotune") else "default")
    return fn


def device_of(args: argparse.Namespace) -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def matmul_peak(device: Any, seconds: float = 3.0) -> dict[str, Any]:
    """The device's dense matmul rate in FLOP/s: fp32 2048² on a CPU, bf16 8192² on a GPU (best of repeated runs)."""
    import torch

    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return {"peak_flops": best, "peak_kind": f"{str(dtype).removeprefix('torch.')} matmul {n}²"}


def timed_steps(step: Any, device: Any, steps: int) -> list[float]:
    import torch

    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def counted_flops(step: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def memory_mib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mode_row(model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from insitu.adapters import create_adapters
    from insitu.backbones import create_backbone

    spec, device = MODES[mode], device_of(args)
    backbone = create_backbone({"name": model, "img_size": args.size, "in_chans": 3}).to(device)
    adapters = create_adapters(backbone, spec["adapter"]).to(device) if spec["mode"] == "adapter" else None
    if spec["mode"] == "full":
        backbone.vit.requires_grad_(True)
    head = torch.nn.Linear(backbone.embed_dim, 10).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    params += list(adapters.parameters()) if adapters is not None else []
    opt = optimizer_of(params, args.lever)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    if args.lever == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        backbone.to(memory_format=torch.channels_last)
    amp = autocast_of(device, args.lever)

    def loss_of() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(backbone.forward_tokens(x, adapters)[0]).float(), y)

    flops = counted_flops(make_step(loss_of, opt, amp))  # the model's math, counted eagerly
    times = timed_steps(make_step(maybe_compile(loss_of, args.lever), opt, amp), device, args.steps)
    return {"trainable": sum(p.numel() for p in params), "flops": flops, "times": times, "memory_mib": memory_mib(device)}


def make_step(loss_of: Any, opt: Any, amp: Any, after: Any = None) -> Any:
    """forward under ``amp`` + backward + optimizer step (+ ``after``, e.g. the EMA update)."""

    def step() -> None:
        with amp:
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after()

    return step


def write_pngs(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


PRETRAIN_ROWS = {"dino": {"out_dim": 4096, "views": {"global_crops": 2, "local_crops": 2}}, "glare": {"out_dim": 4096}}


def pretrain_row(model: str, objective: str, args: argparse.Namespace) -> dict[str, Any]:
    """A real pretraining step (views from files, teacher pass, backward, AdamW, EMA) and the loader alone."""
    import torch
    from lightly.models.utils import update_momentum

    from insitu.config import load_config
    from insitu.pipelines.data import PretrainDataModule, SampleDataset, ScannedData, fit_normalizer
    from insitu.pipelines.pretrain import PretrainModule

    device = device_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_pngs(Path(tmp) / "images", max(4 * args.batch, 64), args.size)
        raw = {
            "data": {"root": str(root), "image_size": args.size, "num_workers": args.workers},
            "backbone": {"name": model, "img_size": args.size, "in_chans": 3},
            "adapter": {"kind": "bottleneck", "blocks": "all", "bottleneck_dim": 64},
            "objective": {"name": objective, "options": PRETRAIN_ROWS[objective]},
            "train": {"batch_size": args.batch, "max_steps": 100},
        }
        cfg = load_config(raw)
        module = PretrainModule(cfg).to(device)
        data = ScannedData.scan(cfg.data)
        items = data.manifest.items
        recipe = module.objective.view_transform()
        on_device = args.lever == "device_views"  # the step builds its views from the batch's images
        if on_device:
            recipe.opts = recipe.opts.model_copy(update={"device": True})
        dataset = SampleDataset(data, items, fit_normalizer(data, items), None if on_device else recipe, args.size)
        loader = PretrainDataModule(dataset, args.batch, args.workers).train_dataloader()
        batches, start = 0, time.perf_counter()
        for _ in loader:  # the loader alone
            batches += 1
        loader_ips = batches * args.batch / (time.perf_counter() - start)
        batch = next(iter(loader))
        images = batch.pop("image").to(device) if on_device else None
        batch["views"] = [] if on_device else [v.to(device) for v in batch["views"]]
        params = module.trainable_parameters()
        opt = optimizer_of(params, args.lever)
        amp = autocast_of(device, args.lever)

        def loss_of() -> torch.Tensor:
            if images is not None:
                batch["views"] = recipe.batch(images)
            return module.objective(batch, module.student_model(), module.teacher_model())["loss"]

        def ema() -> None:
            update_momentum(module.student, module.teacher, 0.996)
            module.objective.update_teacher(0.996)

        flops = counted_flops(make_step(loss_of, opt, amp, ema))
        times = timed_steps(make_step(maybe_compile(loss_of, args.lever), opt, amp, ema), device, args.steps)
    return {
        "trainable": sum(p.numel() for p in params),
        "flops": flops,
        "times": times,
        "memory_mib": memory_mib(device),
        "loader_ips": loader_ips,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    device = device_of(args)
    out = pretrain_row(args.model_name, args.row, args) if args.row in PRETRAIN_ROWS else mode_row(args.model_name, args.row, args)
    out["device"] = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps(out))


def run_row(model: str, row: str, lever: str, flags: list[str], batch: int) -> dict[str, Any]:
    """One row in its own process; a lever that fails (e.g. torch.compile without a compiler) is a row saying so."""
    cmd = [sys.executable, __file__, "--row", row, "--model-name", model, "--lever", lever, *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    name = f"{row.upper()} pretraining step (adapters, all blocks)" if row in PRETRAIN_ROWS else row
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
        print(f"[{model} / {name} / {lever}: failed: {reason}]", file=sys.stderr, flush=True)
        return {"model": model, "row": name, "lever": lever, "failed": reason}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    step_s = sum(out["times"]) / len(out["times"])
    print(f"[{model} / {name} / {lever}: {step_s:.3f} s/step]", file=sys.stderr, flush=True)
    return {
        "model": model,
        "row": name,
        "lever": lever,
        "trainable": out["trainable"],
        "gflop_per_step": out["flops"] / 1e9,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "gflops": out["flops"] / step_s / 1e9,
        "memory_mib": out["memory_mib"],
        "loader_images_per_s": out.get("loader_ips"),
        "device": out["device"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"])
    p.add_argument("--rows", nargs="+", default=[*MODES, "dino"], help="training modes and/or pretraining steps: 'dino', 'glare'")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the dino row's loader")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument("--levers", nargs="+", default=["baseline"], choices=list(LEVERS), help="run every row once per lever")
    p.add_argument("--lever", default="baseline", help=argparse.SUPPRESS)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        child(args)
        return
    import torch

    peak = matmul_peak(device_of(args))
    flags = ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps), "--workers", str(args.workers)]
    flags += ["--cpu"] if args.cpu else []
    rows = []
    for model in args.models:
        for row in args.rows:
            for lever in args.levers:
                if lever == "device_views" and row not in PRETRAIN_ROWS:
                    continue  # no views in a supervised step
                rows.append(run_row(model, row, lever, flags, args.batch))
    # the machine's speed drifts (a shared CPU); measure the peak again and divide by the higher of the two
    after = matmul_peak(device_of(args))
    top = max(peak["peak_flops"], after["peak_flops"])
    done = [r for r in rows if "failed" not in r]
    for r in done:
        r["mfu"] = r["gflops"] * 1e9 / top
    memory = "peak CUDA MiB" if done and "cpu" not in done[0]["device"] else "peak RSS MiB"
    device = done[0]["device"] if done else "?"
    print(
        f"\n{device}, torch {torch.__version__}; peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s before the rows and "
        f"{after['peak_flops'] / 1e9:.0f} after ({peak['peak_kind']}, this run; MFU against the higher); "
        f"{args.size} px, batch {args.batch}, mean of {args.steps} steps after 1 warm-up\n"
    )
    print(f"| model | row | lever | trainable | GFLOP/step | s/step | images/s | GFLOP/s | MFU | {memory} | loader alone, images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['model']} | {r['row']} | {r['lever']} | failed: {r['failed']} |||||||| ")
            continue
        loader = "—" if r["loader_images_per_s"] is None else f"{r['loader_images_per_s']:.0f}"
        print(
            f"| {r['model']} | {r['row']} | {r['lever']} | {r['trainable']:,} | {r['gflop_per_step']:.1f} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.1f} | {r['gflops']:.0f} | {r['mfu']:.0%} | {r['memory_mib']:.0f} | {loader} |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(next((r for r in rows if "failed" not in r), rows[0])) + ["failed"], restval="")
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
