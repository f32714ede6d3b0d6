"""The dense probe's fit on frozen BUSI features: fixed 100 unweighted steps (before issue 38) against the
converging probe with each class weighting, on the same token maps and evaluations.

    OMP_NUM_THREADS=1 python benchmarks/bench_dense_probe.py --repeats 3 --out /work/bench-out/dense_probe

The shipped base ``insitu:fractal_vit_tiny`` (1 channel, 64 px) is frozen; BUSI and its lesion masks come
from ../shared/data/medical (the BUSI setup of bench_objectives.py: inductive hold-out, near-duplicate
groups). Prints, per variant, mIoU and lesion Dice (mean ± std over evaluations), the steps used, how many
fits converged and the final training loss; writes the same as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_objectives import parse_args as bench_args  # noqa: E402
from bench_objectives import run_config  # noqa: E402

from insitu.config import DenseProbeConfig, load_config  # noqa: E402
from insitu.pipelines.probe import build_models  # noqa: E402
from insitu.pipelines.probe_dense import dense_inputs, score_dense  # noqa: E402

CAP = DenseProbeConfig.model_fields["steps"].default  # bench_objectives sets steps (its --dense-steps; 100 when this was measured)
VARIANTS = {  # name: probe.dense overrides
    "fixed 100, unweighted (before)": {"steps": 100, "tolerance": 0.0, "class_weight": "none"},
    "converged, unweighted": {"steps": CAP, "class_weight": "none"},
    "converged, sqrt (default)": {"steps": CAP, "class_weight": "sqrt"},
    "converged, balanced": {"steps": CAP, "class_weight": "balanced"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    bench = bench_args(
        ["--datasets", "busi", "--repeats", str(args.repeats), "--bootstrap", "0"]
        + (["--max-items", str(args.max_items)] if args.max_items else [])
    )
    raw = run_config(bench, "busi", "dino", args.seed, Path("/tmp/bench-dense-probe"), None)
    cfg = load_config(raw)
    models = build_models(cfg, None)
    start = time.perf_counter()
    inputs = dense_inputs(cfg, models)
    maps, masks = inputs["maps"][models[0].name]
    print(
        f"token maps {tuple(maps.shape)}, masks {tuple(masks.shape)}, {len(inputs['plan'])} evaluations ({time.perf_counter() - start:.0f} s)"
    )
    report = {}
    for name, overrides in VARIANTS.items():
        dense = cfg.probe.dense.model_copy(update=overrides)
        start = time.perf_counter()
        entry = score_dense(maps, masks, inputs["plan"], dense, cfg.seed)[("dense", 1.0)]
        miou = [s["mIoU"] for s in entry["scores"]]
        dice = [s["dice"] for s in entry["scores"]]
        fit = entry["fit"]
        report[name] = {"mIoU": miou, "dice": dice, "fit": fit, "seconds": time.perf_counter() - start}
        print(
            f"{name}: mIoU {np.mean(miou):.4f} ± {np.std(miou):.4f}, lesion Dice {np.mean(dice):.4f} ± {np.std(dice):.4f}, "
            f"steps {fit['steps']}, converged {fit['converged_evaluations']}/{len(fit['steps'])}, final loss {fit['final_loss']}, "
            f"rel. change {fit['relative_change']}, weights {fit['class_weights'][0]}, {report[name]['seconds']:.0f} s"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dense_probe.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
