"""Trainable parameters, step time and peak memory of adapter strategies on one frozen ViT.

Each row runs in its own process so that peak RSS (CPU) or peak CUDA memory belongs to that row
alone. The baseline (full fine-tuning) is measured in the same run.

    python benchmarks/bench_adapters.py                       # ViT-S/16, 224 px, batch 32
    python benchmarks/bench_adapters.py --batch 8 --steps 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ROWS = {
    "full fine-tuning": {"mode": "full"},
    "bottleneck, all blocks": {"mode": "adapter", "adapter": {"kind": "bottleneck", "blocks": "all", "bottleneck_dim": 64}},
    "bottleneck, last 4 (frozen prefix)": {"mode": "adapter", "adapter": {"kind": "bottleneck", "blocks": 4, "bottleneck_dim": 64}},
    "LoRA r=8 (qkv), all blocks": {"mode": "adapter", "adapter": {"kind": "lora", "blocks": "all", "rank": 8}},
    "head only": {"mode": "head"},
}


def run_row(spec: dict, args: argparse.Namespace) -> dict:
    import torch

    from insitu.adapters import create_adapters
    from insitu.backbones import create_backbone

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    backbone = create_backbone({"name": args.model, "img_size": args.size, "in_chans": 3}).to(device)
    adapters = None
    if spec["mode"] == "full":
        backbone.vit.requires_grad_(True)
    elif spec["mode"] == "adapter":
        adapters = create_adapters(backbone, spec["adapter"]).to(device)
    head = torch.nn.Linear(backbone.embed_dim, 10).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    params += list(adapters.parameters()) if adapters is not None else []
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            cls = backbone.forward_tokens(x, adapters)[0]
            loss = torch.nn.functional.cross_entropy(head(cls).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"trainable": sum(p.numel() for p in params), "step_s": sum(times) / len(times), "peak_mib": peak, "device": device_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(ROWS[args.row], args)))
        return
    results = {}
    for name in ROWS:
        cmd = [
            sys.executable,
            __file__,
            "--row",
            name,
            "--model",
            args.model,
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        cmd += ["--cpu"] if args.cpu else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    device = next(iter(results.values()))["device"]
    memory = "peak CUDA MiB" if "cpu" not in device else "peak RSS MiB"
    print(f"{args.model}, {args.size} px, batch {args.batch}, mean of {args.steps} steps after 1 warm-up, device: {device}")
    print(f"| strategy | trainable params | step time (s) | {memory} | vs full FT step time |")
    print("|---|---|---|---|---|")
    base = results["full fine-tuning"]["step_s"]
    for name, r in results.items():
        print(f"| {name} | {r['trainable']:,} | {r['step_s']:.3f} | {r['peak_mib']:.0f} | {r['step_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
