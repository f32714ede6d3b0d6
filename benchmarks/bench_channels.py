"""Channel adaptation on real multispectral data: EuroSAT-MS (13 Sentinel-2 bands) through an RGB base.

Primary endpoint (declared before the first run): kNN accuracy at full labels (``knn@1.0``, standardised
features, k = 10), each channel choice minus ``mean`` on the same base, paired over the same test items
(percentile bootstrap over patches and repeats, 95 %). Everything else (linear probe, 10 % labels, the
choices against each other) is secondary and Holm-adjusted within its table.

Part 1, frozen: for each shipped base (``insitu:colour_vit_tiny``, ``insitu:fractal_vit_tiny``; both RGB) and each
``backbone.channel_init`` (``mean``, ``repeat``, ``rgb_map``, ``rgb_nearest``), `insitu.pipelines.probe.run_probe`
scores the frozen backbone with the repeated protocol: 5 stratified folds by patch (every patch is its own
group) × ``--repeats``, linear probe and standardised kNN, full labels and 10 %. Each choice runs in its own
spawned process (wall time and peak RSS are its own). The paired difference to ``mean`` is computed from the
probe's per-item counts (`insitu.heads.stats.bootstrap_differences`, the same bootstrap the probe uses).

Part 2, adapters (inductive, insitu.pipelines.holdout): on the best frozen (base, choice) by the primary
endpoint, DINO with bottleneck adapters and DINO with ``spectral`` adapters (bottleneck + a trainable,
zero-initialised per-band patch-embedding delta: the choice that keeps every band distinct and learns from
unlabelled pixels), seeds ``--seeds``; with ``--random-delta`` also each spectral package with its delta replaced by
Gaussian noise of the same norm (`random_delta_job`: what the learned directions buy over any band-distinct change
of that size). The probe holds out a class-stratified 30 % of the patches
(``probe.split_seed`` 0, the same 60 patches for every seed and model); pretraining never sees them; the
frozen backbone is scored on the same items. Per seed the probe's own paired CI and verdict; over seeds a
two-way bootstrap (patches × seeds).

What 200 patches can resolve: a fold of 40 patches moves by 2.5 points per patch; the held-out side of 60 by
1.7 points; differences of a few points are within the noise; only large effects (≳ 5-8 points) resolve.

    OMP_NUM_THREADS=1 python benchmarks/bench_channels.py --out /work/bench-out/eurosat
    python benchmarks/bench_channels.py --stats-only          # per-band statistics of the 200 patches
    python benchmarks/bench_channels.py --steps 2 --seeds 0 --repeats 1 --bootstrap 200 --out /tmp/bc  # smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EUROSAT = REPO.parent / "shared" / "data" / "satellite" / "eurosat_ms"
BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
CHOICES = ["mean", "repeat", "rgb_map", "rgb_nearest"]
BASES = ["insitu:colour_vit_tiny", "insitu:fractal_vit_tiny"]
PRIMARY = "knn@1.0"
REFERENCE = "mean"


def data_section(max_items: int | None = None) -> dict[str, Any]:
    options = {"band_names": BANDS, "scale": 1e-4, "tile_size": None, "labels": "folders"}
    return {"domain": "geotiff", "root": str(EUROSAT), "options": options, "image_size": 64, "max_items": max_items}


def run_config(args: argparse.Namespace, base: str, choice: str, seed: int = 0, adapter: str = "bottleneck", frozen: bool = False) -> dict[str, Any]:
    """A pretraining run with its inductive probe or, with ``frozen``, the frozen probe's config (folds over all patches)."""
    probe = {
        "folds": 5,
        "repeats": args.repeats,
        "label_fractions": [1.0, 0.1],
        "knn_k": 10,
        "bootstrap": args.bootstrap,
        "primary": PRIMARY,
        "shortcut_check": False,
        "label_free_baseline": "whitened",
        "test_fraction": 0.3,
        # no pretraining in the frozen part: folds over all 200 patches (no item can have been trained on); for
        # a pretraining run the inductive hold-out applies (insitu.pipelines.holdout)
        "transductive": frozen,
    }
    raw: dict[str, Any] = {
        "name": f"{base.split(':')[-1]}_{choice}_{adapter}_s{seed}",
        "seed": seed,
        "out_dir": str(args.out / "runs"),
        "data": data_section(args.max_items),
        "backbone": {"weights": base, "img_size": 64, "in_chans": len(BANDS), "channel_init": choice, "bands": BANDS},
        "adapter": {"name": adapter, "options": {"blocks": "all", "bottleneck_dim": 32, "scale": 0.1}},
        "objective": {
            "name": "dino",
            "options": {"out_dim": 1024, "views": {"global_crops": 2, "local_crops": 2, "global_scale": [0.5, 1.0], "local_scale": [0.2, 0.5]}},
        },
        "train": {"max_steps": args.steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": max(1, args.steps // 10), "checkpoint_every": args.steps},
        "trainer": {"accelerator": "cpu"},
        "probe": probe,
    }
    return raw


# ---------------------------------------------------------------- child processes


def in_child(fn: Any, *fn_args: Any) -> dict[str, Any]:
    """``fn`` in a fresh spawned process; its result plus that process's peak RSS (MB) and wall time."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, fn_args))
    proc.start()
    child.close()
    out = parent.recv()
    proc.join()
    return out


def _child(conn: Any, fn: Any, fn_args: tuple) -> None:
    start = time.perf_counter()
    out = fn(*fn_args)
    out["wall_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    conn.send(out)


def probe_job(raw: dict[str, Any], adapters: list[str]) -> dict[str, Any]:
    from dataclasses import asdict

    from insitu.config import load_config
    from insitu.pipelines.probe import run_probe

    rows = run_probe(load_config(raw), [Path(a) for a in adapters])
    return {"rows": [asdict(r) for r in rows]}


def pretrain_job(raw: dict[str, Any]) -> dict[str, Any]:
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain

    result = pretrain(load_config(raw), quiet=True, overwrite=True)
    return {"adapter": str(result.adapter_dir), "items": result.items, "final_loss": result.final_loss, "params": result.trainable_params}


def random_delta_job(src: str, dst: str, seed: int, backbone: dict[str, Any]) -> dict[str, Any]:
    """The control for a trained ``spectral`` package: the same package with its per-band ``delta`` replaced by a
    seeded Gaussian filter bank of the same Frobenius norm (the trained bottleneck adapters kept). It separates what
    the learned delta's *directions* buy from what any band-distinct perturbation of that size buys.
    ``backbone``: the run's backbone spec (a package's stored config hides local weight paths)."""
    import torch

    from insitu.adapters.package import apply_package, load_package, save_package
    from insitu.backbones import create_backbone

    pkg = load_package(src)
    model = apply_package(pkg, create_backbone(backbone))
    delta = model.adapters.delta
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        delta.copy_(noise * (delta.norm() / noise.norm()))
    m = pkg.meta
    training = {**m.training, "control": f"delta replaced by Gaussian noise of the trained norm {float(delta.norm()):.4g} (seed {10_000 + seed})"}
    save_package(Path(dst), model.backbone, model.adapters, input_info=m.input, normalizer=m.normalizer, objective=m.objective, training=training, config=m.config)
    return {"adapter": dst, "delta_norm": float(delta.norm())}


def stats_job() -> dict[str, Any]:
    from insitu.config import DataConfig
    from insitu.pipelines.data import ScannedData, fit_normalizer

    data = ScannedData.scan(DataConfig.model_validate(data_section()))
    norm = fit_normalizer(data, data.manifest.items)
    return {"items": len(data.manifest.items), "classes": data.manifest.class_names, **norm.to_dict()}


# ---------------------------------------------------------------- paired differences from the probe's counts


def row_of(rows: list[dict[str, Any]], model: str, probe: str, labels: float) -> dict[str, Any]:
    return next(r for m in rows if m["name"] == model for r in m["results"] if r["probe"] == probe and r["labels"] == labels)


def paired(a: dict[str, Any], b: dict[str, Any], n_boot: int) -> tuple[float, float | None, float | None, float | None]:
    """(Δ = a − b pooled, CI low, CI high, bootstrap p) from two probe rows on the same items and evaluations."""
    from insitu.heads.stats import accuracy_from_counts, bootstrap_differences, bootstrap_p_value, percentile_interval

    delta, diffs = bootstrap_differences(np.asarray(a["counts"]), np.asarray(b["counts"]), accuracy_from_counts, b["units"], n_boot, 0)
    if diffs is None:
        return delta, None, None, None
    lo, hi = percentile_interval(diffs)
    return delta, lo, hi, bootstrap_p_value(diffs)


def with_verdicts(entries: list[dict[str, Any]]) -> None:
    """Primary rows: CI excludes 0; every other row: Holm-adjusted p < 0.05 (within the list)."""
    from insitu.heads.stats import holm, verdict

    secondary = [e for e in entries if not e["primary"] and e["p"] is not None]
    for e, adj in zip(secondary, holm([e["p"] for e in secondary]), strict=True):
        e["p_adj"] = float(adj)
    for e in entries:
        if e["lo"] is None:
            e["verdict"] = "no CI"
        elif e["primary"]:
            e["verdict"] = verdict(e["lo"], e["hi"])
        else:
            e["verdict"] = "resolved" if e.get("p_adj", 1.0) < 0.05 else "not resolved"


def table(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def ci(e: dict[str, Any]) -> str:
    return f"{e['delta']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]" if e["lo"] is not None else f"{e['delta']:+.3f} (no CI)"


# ---------------------------------------------------------------- the two parts


def frozen_part(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for base in args.bases:
        for choice in args.choices:
            out = in_child(probe_job, run_config(args, base, choice, frozen=True), [])
            runs[(base, choice)] = out
            print(f"frozen {base} {choice}: {out['wall_s']:.0f} s, {out['peak_rss_mb']} MB", flush=True)
    cells, entries = [], []
    for (base, choice), out in runs.items():
        rows = out["rows"]
        for probe, labels in (("knn", 1.0), ("linear", 1.0), ("knn", 0.1), ("linear", 0.1)):
            r = row_of(rows, "frozen backbone", probe, labels)
            e = {"base": base, "choice": choice, "probe": probe, "labels": labels, "mean": r["mean"], "std": r["std"], "evals": r["evaluations"]}
            e["primary"] = f"{probe}@{labels}" == PRIMARY and choice != REFERENCE
            if choice != REFERENCE and (base, REFERENCE) in runs:
                ref = row_of(runs[(base, REFERENCE)]["rows"], "frozen backbone", probe, labels)
                e["delta"], e["lo"], e["hi"], e["p"] = paired(r, ref, args.bootstrap)
            entries.append(e)
            cells.append(e)
    with_verdicts([e for e in entries if "delta" in e])
    headers = ["base", "channel_init", "probe", "labels", "acc mean ± std (folds × repeats)", "Δ vs mean [95% CI]", "p", "p Holm", "verdict", "wall s", "peak RSS MB"]
    out_cells = []
    for e in sorted(cells, key=lambda e: (e["base"], e["probe"] != "knn", -e["labels"], args.choices.index(e["choice"]))):
        run = runs[(e["base"], e["choice"])]
        has = "delta" in e
        out_cells.append(
            [
                e["base"].split(":")[-1], e["choice"], e["probe"], f"{e['labels']:.0%}", f"{e['mean']:.3f} ± {e['std']:.3f} ({e['evals']})",
                ci(e) if has else "reference", f"{e['p']:.3g}" if has and e["p"] is not None else "",
                f"{e.get('p_adj', e.get('p') or 0):.3g}" if has and e["p"] is not None else "",
                (e["verdict"] + (" (primary)" if e["primary"] else "")) if has else "", f"{run['wall_s']:.0f}", str(run["peak_rss_mb"]),
            ]
        )  # fmt: skip
    primary = [e for e in entries if e["probe"] == "knn" and e["labels"] == 1.0]
    best = max(primary, key=lambda e: e["mean"])
    return table(headers, out_cells), {"best": (best["base"], best["choice"]), "runs": {f"{b} {c}": v for (b, c), v in runs.items()}}


def adapted_row(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The probe row of the package pretrained with adapter ``kind`` (its run folder is ``..._<kind>_s<seed>``)."""
    return next(m for m in rows if m["name"].startswith("+ adapters") and f"_{kind}_s" in m["name"])


def adapter_part(args: argparse.Namespace, base: str, choice: str) -> tuple[str, str, dict[str, Any]]:
    runs = []
    for seed in args.seeds:  # per seed: each kind pretrained, then one probe of frozen + every package on the same items
        trained = {}
        for kind in args.adapters:
            trained[kind] = in_child(pretrain_job, run_config(args, base, choice, seed, kind))
            print(f"{kind} seed {seed}: pretrain {trained[kind]['wall_s']:.0f} s {trained[kind]['peak_rss_mb']} MB", flush=True)
        kinds = list(args.adapters)
        if args.random_delta and "spectral" in trained:  # named <run>_spectral-random_s<seed>/adapter: its own row in the probe
            dst = args.out / "runs" / f"{base.split(':')[-1]}_{choice}_spectral-random_s{seed}" / "adapter"
            control = in_child(random_delta_job, trained["spectral"]["adapter"], str(dst), seed, run_config(args, base, choice, seed, "spectral")["backbone"])
            trained["spectral-random"] = {**trained["spectral"], "adapter": control["adapter"], "wall_s": 0.0, "peak_rss_mb": control["peak_rss_mb"]}
            print(f"spectral-random seed {seed}: delta norm {control['delta_norm']:.4g}", flush=True)
            kinds.append("spectral-random")
        raw = run_config(args, base, choice, seed, args.adapters[0])
        probed = in_child(probe_job, raw, [trained[k]["adapter"] for k in kinds])
        print(f"seed {seed}: probe {probed['wall_s']:.0f} s {probed['peak_rss_mb']} MB", flush=True)
        runs += [{"seed": seed, "kind": k, "train": trained[k], "probe": probed} for k in kinds]
    headers = ["adapters", "seed", "steps", "trainable params (adapters + DINO head)", "pretrain items", "probe", "labels", "frozen", "adapted", "Δ vs frozen [95% CI] (probe)", "verdict", "pretrain s", "pretrain peak RSS MB"]
    cells = []
    for r in runs:
        rows = r["probe"]["rows"]
        adapted = adapted_row(rows, r["kind"])
        for probe, labels in (("knn", 1.0), ("linear", 1.0), ("knn", 0.1)):
            a, f = row_of(rows, adapted["name"], probe, labels), row_of(rows, "frozen backbone", probe, labels)
            cells.append(
                [
                    r["kind"], str(r["seed"]), str(args.steps), str(r["train"]["params"]), str(r["train"]["items"]), probe, f"{labels:.0%}",
                    f"{f['mean']:.3f}", f"{a['mean']:.3f}", f"{a['delta']:+.3f} [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}]" if a["ci_low"] is not None else f"{a['delta']:+.3f}",
                    (a["verdict"] or "") + (" (primary)" if a.get("primary") else ""), f"{r['train']['wall_s']:.0f}",
                    str(r["train"]["peak_rss_mb"]),
                ]
            )  # fmt: skip
    return table(headers, cells), pooled_table(runs, args.bootstrap), {"runs": runs}


def pooled_table(runs: list[dict[str, Any]], n_boot: int) -> str:
    """Over seeds: two-way bootstrap (patches × seeds) of every kind − frozen and of spectral against bottleneck
    and against its random-delta control; p-values, Holm-adjusted over every row but the primary
    (``spectral`` − frozen at ``PRIMARY``)."""
    from insitu.heads.stats import accuracy_from_counts, bootstrap_differences, bootstrap_p_value, holm, percentile_interval, verdict

    pooled = []
    for probe, labels in (("knn", 1.0), ("linear", 1.0), ("knn", 0.1)):
        by_kind: dict[str, list[np.ndarray]] = {}
        frozen: dict[str, list[np.ndarray]] = {}  # per kind, in seed order (10 % label subsets differ by seed)
        units = None
        for r in runs:
            rows = r["probe"]["rows"]
            adapted = adapted_row(rows, r["kind"])
            by_kind.setdefault(r["kind"], []).append(np.asarray(row_of(rows, adapted["name"], probe, labels)["counts"]).sum(0))
            f = row_of(rows, "frozen backbone", probe, labels)
            frozen.setdefault(r["kind"], []).append(np.asarray(f["counts"]).sum(0))
            units = f["units"]
        comparisons = [(k, "frozen", np.stack(v), np.stack(frozen[k])) for k, v in by_kind.items()]
        for other in ("bottleneck", "spectral-random"):
            if {"spectral", other} <= set(by_kind):
                comparisons.append(("spectral", other, np.stack(by_kind["spectral"]), np.stack(by_kind[other])))
        for a_name, b_name, a, b in comparisons:
            delta, diffs = bootstrap_differences(a, b, accuracy_from_counts, units, n_boot, 0)
            lo, hi = percentile_interval(diffs) if diffs is not None else (None, None)
            primary = (a_name, b_name) == ("spectral", "frozen") and f"{probe}@{labels}" == PRIMARY
            pooled.append({"cells": [f"{a_name} − {b_name}", probe, f"{labels:.0%}", str(len(a)), f"{delta:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo is not None else f"{delta:+.3f}"],
                           "p": bootstrap_p_value(diffs) if diffs is not None else None, "ci": (lo, hi), "primary": primary})  # fmt: skip
    secondary = [r for r in pooled if not r["primary"] and r["p"] is not None]
    for r, adj in zip(secondary, holm([r["p"] for r in secondary]), strict=True):
        r["p_adj"] = float(adj)
    cells = []
    for r in pooled:
        lo, hi = r["ci"]
        if lo is None:
            word = "no CI"
        elif r["primary"]:
            word = verdict(lo, hi) + " (primary)"
        else:
            word = "not resolved (Holm-adjusted)" if r.get("p_adj", 1.0) >= 0.05 else ("resolved gain" if lo + hi > 0 else "resolved loss")
        p_adj = r["p"] if r["primary"] else r.get("p_adj")
        cells.append([*r["cells"], "" if r["p"] is None else f"{r['p']:.3g}", "" if p_adj is None else f"{p_adj:.3g}", word])
    return table(["comparison", "probe", "labels", "seeds", "pooled Δ [two-way 95% CI: patches × seeds]", "p", "p Holm", "verdict"], cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-channels"))
    parser.add_argument("--bases", nargs="+", default=BASES[:1])
    parser.add_argument("--choices", nargs="+", default=CHOICES)
    parser.add_argument("--adapters", nargs="+", default=["bottleneck", "spectral"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--skip-adapters", action="store_true")
    parser.add_argument("--adapters-on", default=None, help="skip the frozen part; adapters on this base:channel_init (e.g. insitu:colour_vit_tiny:mean)")
    parser.add_argument("--stats-only", action="store_true")
    parser.add_argument("--pooled-from", type=Path, default=None, help="a finished run's bench_channels.json: print its pooled table again, train nothing")
    parser.add_argument(
        "--random-delta",
        action="store_true",
        help="also probe each trained spectral package with its delta replaced by noise of the same norm (the control for the learned delta)",
    )
    args = parser.parse_args()
    if args.pooled_from:
        print(pooled_table(json.loads(args.pooled_from.read_text())["adapters"]["runs"], args.bootstrap))
        return
    if not EUROSAT.is_dir():
        sys.exit(f"{EUROSAT} is absent: this benchmark needs ../shared/data/satellite/eurosat_ms (see ../shared/data/README.md).")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stats_only:
        stats = in_child(stats_job)
        for key in ("mean", "std", "lo", "hi"):
            print(key, " ".join(f"{v:.4f}" for v in stats[key]))
        return
    start = time.perf_counter()
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    text = ""
    if args.adapters_on:  # the frozen part was run before (--skip-adapters): adapters on this base:channel_init
        base, _, choice = args.adapters_on.rpartition(":")
        frozen: dict[str, Any] = {"best": (base, choice)}
    else:
        frozen_md, frozen = frozen_part(args)
        print("\n## Frozen: channel_init per base (5 folds by patch × repeats; Δ vs mean paired)\n\n" + frozen_md, flush=True)
        report["frozen"] = frozen
        text = "## Frozen\n\n" + frozen_md
    if not args.skip_adapters:
        base, choice = frozen["best"]
        print(f"\nbest frozen by {PRIMARY}: {base} {choice}", flush=True)
        per_seed, pooled, adapters = adapter_part(args, base, choice)
        print(f"\n## DINO adapters on {base} {choice} (inductive: 60 held-out patches)\n\n" + per_seed + "\n\n" + pooled, flush=True)
        report["adapters"] = {"base": base, "choice": choice, **adapters}
        text += f"\n\n## DINO adapters on {base} {choice}\n\n{per_seed}\n\n{pooled}"
    total = time.perf_counter() - start
    print(f"\ntotal wall time {total:.0f} s", flush=True)
    (args.out / "bench_channels.md").write_text(text + f"\n\ntotal wall time {total:.0f} s\n")
    (args.out / "bench_channels.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
