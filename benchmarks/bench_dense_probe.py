"""The dense probe's fit on frozen features: fixed 100 unweighted steps (before issue 38) against the
converging probe with each class weighting, on the same token maps and evaluations.

    OMP_NUM_THREADS=1 python benchmarks/bench_dense_probe.py --repeats 3 --out /work/bench-out/dense_probe
    OMP_NUM_THREADS=1 python benchmarks/bench_dense_probe.py --dataset busi --inner --out /work/bench-out/dense_inner
    OMP_NUM_THREADS=1 python benchmarks/bench_dense_probe.py --dataset kvasir --repeats 3 --out /work/bench-out/dense_kvasir

``--dataset busi`` (default): the shipped base ``insitu:fractal_vit_tiny`` (1 channel, 64 px) frozen;
BUSI and its lesion masks from ../shared/data/medical (the BUSI setup of bench_objectives.py: inductive
hold-out, near-duplicate groups). ``--inner`` scores BUSI on an inner split of the hold-out's training
side only (a seeded 25 % of its near-duplicate groups as the validation side; the reported test side is
not read), so a class weighting can be chosen without the figures the evidence protocol reports.
``--dataset kvasir``: the shipped base ``insitu:colour_vit_tiny`` (3 channels, 64 px) frozen on the
Kvasir-SEG image/mask pairs of ../shared/data/endoscopy/kvasir_seg (the video domain's frame
segmentation, as configs/downstream/kvasir_segmentation.yaml), leave-one-image-out: the folder holds
only 3 frames, so it shows the mechanics, not a precise score.
Prints, per variant, mIoU and lesion Dice (mean ± std over evaluations), the steps used, how many fits
converged and the final training loss; writes the same as JSON to ``--out``.
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
from insitu.pipelines.data import ScannedData  # noqa: E402
from insitu.pipelines.preprocess import resolve_comparison  # noqa: E402
from insitu.pipelines.probe import build_models  # noqa: E402
from insitu.pipelines.probe_dense import dense_inputs, score_dense, stored_of, token_maps  # noqa: E402
from insitu.pipelines.probe_plan import Split  # noqa: E402

CAP = DenseProbeConfig.model_fields["steps"].default  # bench_objectives sets steps (its --dense-steps; 100 when this was measured)
VARIANTS = {  # name: probe.dense overrides
    "fixed 100, unweighted (before)": {"steps": 100, "tolerance": 0.0, "class_weight": "none"},
    "converged, unweighted": {"steps": CAP, "class_weight": "none"},
    "converged, sqrt (default)": {"steps": CAP, "class_weight": "sqrt"},
    "converged, balanced": {"steps": CAP, "class_weight": "balanced"},
}
KVASIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "endoscopy" / "kvasir_seg"
INNER_SHARE = 0.25  # of the hold-out training side's groups, the inner validation side (--inner)


def busi_inputs(args: argparse.Namespace):
    """BUSI as bench_objectives sets it up: (dense config, token maps, masks, evaluations, what was scored)."""
    bench = bench_args(
        ["--datasets", "busi", "--repeats", str(args.repeats), "--bootstrap", "0"]
        + (["--max-items", str(args.max_items)] if args.max_items else [])
    )
    raw = run_config(bench, "busi", "dino", args.seed, Path("/tmp/bench-dense-probe"), None)
    cfg = load_config(raw)
    models = build_models(cfg, None)
    inputs = dense_inputs(cfg, models)
    maps, masks = inputs["maps"][models[0].name]
    plan = inputs["plan"]
    if not args.inner:
        return cfg, maps, masks, plan, f"BUSI, the inductive hold-out ({len(plan)} evaluations)"
    train = plan[0].train  # the hold-out's training side; every repeat shares it
    groups = inputs["groups"][train]
    names = np.unique(groups)
    rng = np.random.default_rng(args.seed)
    val_groups = set(rng.permutation(names)[: round(INNER_SHARE * len(names))])
    is_val = np.array([g in val_groups for g in groups])
    inner = [Split(s.repeat, 0, 1.0, train[~is_val], train[is_val]) for s in plan]
    what = f"BUSI inner split of the hold-out's training side: {int((~is_val).sum())} train / {int(is_val.sum())} validation images"
    return cfg, maps, masks, inner, what


def kvasir_inputs(args: argparse.Namespace):
    """Kvasir-SEG frames through the video domain, the frozen colour base; leave-one-image-out × ``repeats`` head seeds."""
    if not (KVASIR / "images").is_dir():
        raise SystemExit(f"{KVASIR.resolve()} not found: --dataset kvasir needs ../shared/data/endoscopy/kvasir_seg (images/ + masks/).")
    data = {"domain": "video", "root": str(KVASIR.resolve()), "image_size": 64, "options": {"crop_fov": False, "decode_size": 128}}
    raw = {
        "name": "kvasir_dense_probe",
        "seed": args.seed,
        "out_dir": "/tmp/bench-dense-probe",
        "data": data,
        "backbone": {"weights": "insitu:colour_vit_tiny", "img_size": 64, "in_chans": 3},
        "adapter": {"name": "bottleneck", "options": {"blocks": "all", "bottleneck_dim": 32, "scale": 0.1}},
        "objective": {"name": "dino", "options": {}},
        "probe": {"dense": {"data": data}, "transductive": True},
    }
    cfg = load_config(raw)
    models = build_models(cfg, None)
    scanned = ScannedData.scan(cfg.probe.dense.data)
    items = scanned.manifest.items
    (prep,) = resolve_comparison(stored_of(models[:1], None), scanned, items, 64, cfg.backbone)
    maps, masks, _ = token_maps(models[0], scanned, items, prep, cfg.probe.batch_size)
    n = len(masks)
    plan = [Split(r, k, 1.0, np.delete(np.arange(n), k), np.array([k])) for r in range(args.repeats) for k in range(n)]
    fg = float((masks == 1).float().mean())
    return cfg, maps, masks, plan, f"Kvasir-SEG, leave-one-image-out over {n} frames × {args.repeats} head seeds (polyp pixels {fg:.1%})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["busi", "kvasir"], default="busi")
    p.add_argument("--inner", action="store_true", help="BUSI only: score an inner split of the hold-out's training side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.inner and args.dataset != "busi":
        p.error("--inner applies to --dataset busi")
    start = time.perf_counter()
    cfg, maps, masks, plan, what = (busi_inputs if args.dataset == "busi" else kvasir_inputs)(args)
    print(f"{what}; token maps {tuple(maps.shape)}, masks {tuple(masks.shape)}, {len(plan)} evaluations ({time.perf_counter() - start:.0f} s)")
    report = {}
    for name, overrides in VARIANTS.items():
        dense = cfg.probe.dense.model_copy(update=overrides)
        start = time.perf_counter()
        entry = score_dense(maps, masks, plan, dense, cfg.seed)[("dense", 1.0)]
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
        (args.out / "dense_probe.json").write_text(json.dumps({"data": what, "variants": report} if args.dataset != "busi" or args.inner else report, indent=1))


if __name__ == "__main__":
    main()
