"""Why GLARE does not beat the frozen random-init backbone on PneumoniaMNIST: lr and steps, seed 0.

Reuses the protocol of compare_objectives.py (same backbone, data sides and probes) for the
"glare global" row with the learning rate and the number of steps varied.

    python benchmarks/glare_sweep.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_objectives as co  # noqa: E402

SETTINGS = [(2e-3, 300), (1e-2, 100), (5e-4, 100)]


def main() -> None:
    p = argparse.Namespace(seeds=[0], steps=100, batch=32, lr=2e-3, ema=0.99, size=48, depth=6, embed_dim=96, probe_train=800, base=None)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sides = co.pneumonia_sides(p, tmp)
        print("frozen", json.dumps(co.in_child(co.frozen_job, p, sides)), flush=True)
        for lr, steps in SETTINGS:
            a = argparse.Namespace(**{**vars(p), "lr": lr, "steps": steps})
            r = co.in_child(co.train_job, a, sides, "glare global", 0, tmp / f"{lr}_{steps}")
            print(f"glare global, lr {lr}, {steps} steps:", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
