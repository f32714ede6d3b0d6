"""The measurement protocol for SSL objectives on the shipped base: pretrain, then a probe that can resolve a gain.

For each dataset (``pneumoniamnist`` | ``busi``), objective (``dino``, ``glare``,
``graph_matching``, ``convirt``) and seed, adapters are pretrained with
`insitu.pipelines.pretrain.pretrain` on the shipped fractal base (``backbone.weights:
insitu:fractal_vit_tiny``, 1 channel, 64 px), each run in its own spawned process so its peak RSS
is its own. Then `insitu.pipelines.probe.run_probe` scores frozen vs adapted with the repeated
protocol of docs/evaluation.md: stratified group k-fold × repeats (the pretraining seed s seeds the
folds and label subsets), full labels, 10 % and 1 %, linear probe and kNN, and on BUSI a dense
linear 1×1 probe on patch tokens scored by mIoU and lesion Dice against ``busi_masks``; each
adapted − frozen difference gets a paired bootstrap 95 % CI and a verdict.

Data sides (inductive by default, insitu.pipelines.holdout). PneumoniaMNIST: the probe's pool is
a spread subset of ``--probe-items`` train images; a group-disjoint, class-stratified third of it
(``probe.split_seed`` 0: the same items for every seed) is the probe's test side, and pretraining
runs on the rest of the train split. BUSI: a third of the 622 images (near-duplicate clusters kept
together) is the test side; pretraining and the probe's training side share the other two thirds.
``--transductive`` restores the in-situ setting (pretrain on every image, fold over all of them;
the tables say so). Every probe scores the frozen backbone, frozen + PCA whitening (a label-free
transform any user could apply), the student adapters and, for objectives with an EMA teacher,
the teacher's adapters (exported with ``insitu.adapters.package.export_package(weights="teacher")``);
the packages are kept under ``--out``/adapters/. The primary endpoint per dataset is ``PRIMARY``,
declared in docs/results/objectives.md before the first run.
ConVIRT needs text: none
ships with this data, so each image is paired with SYNTHETIC report text written from its label
(as in configs/medical/pneumoniamnist_convirt.yaml) and a tiny random-weight BERT (tests/data/
text_fixtures.py) unless ``--text-encoder`` names a local one; the label leaks into pretraining
through that text, so ConVIRT rows are mechanics, not evidence.

Per run the table shows wall time, peak RSS, first/last loss, and whatever health the objective
logs, read generically from logs/metrics.csv and summary.json: every ``health/...`` column (teacher
entropy ratio, ``health/rankme``, ...) first/last, and ``train/identity_fraction`` first/last.

Full protocol (hours on a 2-core CPU; minutes on a GPU):

    python benchmarks/bench_objectives.py --datasets pneumoniamnist busi \\
        --objectives dino glare graph_matching convirt --seeds 0 1 2 --steps 300 --out bench-objectives

A variant of an objective: ``--set objective.options.margin=3`` (dotted, repeatable) overrides every
run's config, and the tables name those runs ``graph_matching [objective.options.margin=3]`` so they
never pool with the default's.

Smoke test (a minute): ``python benchmarks/bench_objectives.py --steps 2 --seeds 0 --max-items 64``.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from insitu.raw_config import apply_override

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.data.text_fixtures builds the offline tiny BERT for ConVIRT
DATA = REPO.parent / "shared" / "data" / "medical"
PNEUMONIA = DATA / "pneumoniamnist" / "pneumoniamnist_balanced_trainval.npz"
BUSI, BUSI_MASKS = DATA / "busi", DATA / "busi_masks"
POLYPGEN = REPO.parent / "shared" / "data" / "endoscopy" / "polypgen"
VIDEO_DATASETS = {"polypgen_A": ("centre_A", "centre_B"), "polypgen_B": ("centre_B", "centre_A")}  # pretrain on, probe on

OBJECTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "dino": {"out_dim": 1024},
    "glare": {"out_dim": 1024},
    "graph_matching": {"graph_size": 16, "knn": 5},
    "convirt": {"trainable_layers": 1, "pooling": "mean", "proj_dim": 256, "temperature": 0.1, "lam": 0.75, "mask_duplicates": True},
    # video objectives: 4-frame views of 8-frame clips; rsp's speed 2 needs (4 - 1) * 2 + 1 = 7 <= 8 frames
    "rsp": {"speeds": [1, 2], "views": {"frames": 4}},
    "cvrl": {"views": {"frames": 4}},
}
VIDEO_OBJECTIVES = {"rsp", "cvrl"}
# the primary endpoint per dataset, declared in docs/results/objectives.md (committed in 14985cf) before any run of this protocol
PRIMARY = {"pneumoniamnist": "knn@0.1", "busi": "dense@1.0:mIoU", "polypgen_A": "knn@0.1", "polypgen_B": "knn@0.1"}
BASELINE = "frozen + PCA whitening"
REPORTS = {  # synthetic report text per class, for ConVIRT only
    "pneumoniamnist": {
        0: ["FINDINGS: Heart size is normal. The lungs are clear. IMPRESSION: No acute cardiopulmonary abnormality."],
        1: ["FINDINGS: Patchy airspace opacity in the right lower lobe. IMPRESSION: Findings consistent with pneumonia."],
    },
    "busi": {
        0: ["FINDINGS: Oval circumscribed hypoechoic mass, parallel orientation. IMPRESSION: Probably benign."],
        1: ["FINDINGS: Irregular mass with spiculated margins and posterior shadowing. IMPRESSION: Suspicious for malignancy."],
        2: ["FINDINGS: Normal fibroglandular tissue, no mass. IMPRESSION: Negative."],
    },
}


# ---------------------------------------------------------------- configs


def image_data(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The unlabelled pretraining side as an ``images`` data config (PolypGen: the probe centre's frames)."""
    if dataset in VIDEO_DATASETS:  # polyp / no-polyp folders; no-polyp frames grouped by sequence (seqN_imgK)
        probe_root = POLYPGEN / VIDEO_DATASETS[dataset][1]
        # aspect crop: centre B's no-polyp frames are all 384×216 and its polyp frames 384×284–307 (docs/surgical_video.md)
        options = {"channels": 3, "labels": "folders", "group_pattern": r"^(seq\d+)_", "aspect": "crop"}
        return {"domain": "images", "root": str(probe_root), "options": options, "max_items": args.max_items}
    if dataset == "pneumoniamnist":
        return {"domain": "images", "root": str(PNEUMONIA), "options": {"split": "train", "channels": 1}, "max_items": args.max_items}
    return {"domain": "images", "root": str(BUSI), "options": {"channels": 1, "labels": "folders"}, "max_items": args.max_items}


def probe_section(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The repeated probe: folds over the labelled side; BUSI adds the dense probe on its lesion masks."""
    side = image_data(dataset, args)
    if dataset == "pneumoniamnist":
        side["max_items"] = min(args.probe_items, args.max_items or args.probe_items)
    probe: dict[str, Any] = {
        "train": {**side, "image_size": args.size},
        "folds": args.folds,
        "repeats": args.repeats,
        "label_fractions": [1.0, 0.1, 0.01],
        "bootstrap": args.bootstrap,
        "knn_k": 20,
        "group_near_duplicates": dataset == "busi",
        "transductive": args.transductive,
        "test_fraction": 0.3,  # the inductive hold-out: round(1 / 0.3) = 3 group folds, the first is the test side
    }
    if dataset == "busi" and not args.no_dense:
        masks = {**side, "options": {**side["options"], "masks": str(BUSI_MASKS)}, "image_size": args.size}
        probe["dense"] = {"data": masks, "steps": args.dense_steps}
    primary = PRIMARY.get(dataset, "knn@0.1")
    if primary.startswith("dense") and "dense" not in probe:
        primary = "knn@0.1"
    probe["primary"] = primary
    return probe


def video_data(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """PolypGen's ordered no-polyp sequences of one centre as unlabelled 8-frame clips (the other centre probes)."""
    root = POLYPGEN / VIDEO_DATASETS[dataset][0] / "negative"
    options = {"mode": "clips", "clip_frames": 8, "stride": 1, "clip_step": 2, "decode_size": 96, "labels": "none"}
    return {"domain": "video", "root": str(root), "options": options, "image_size": args.size, "max_items": args.max_items}


def run_config(
    args: argparse.Namespace, dataset: str, objective: str, seed: int, out_dir: Path, text_encoder: str | None
) -> dict[str, Any]:
    """One run: the shipped base, bottleneck adapters, the objective's options, and the probe protocol."""
    video = dataset in VIDEO_DATASETS
    if video != (objective in VIDEO_OBJECTIVES):
        raise SystemExit(f"{objective} does not run on {dataset}: video objectives (rsp, cvrl) go with polypgen_A/B only.")
    data = video_data(dataset, args) if video else {**image_data(dataset, args), "image_size": args.size}
    options = dict(OBJECTIVE_OPTIONS[objective])
    if objective == "convirt":
        names = ["normal", "pneumonia"] if dataset == "pneumoniamnist" else ["benign", "malignant", "normal"]
        data = {**data, "domain": "pairs"}
        data["options"] = {**data["options"], "label_text": REPORTS[dataset], "class_names": names, "sampling": "first"}
        data["options"].pop("labels", None)
        options["text_encoder"] = text_encoder
    return {
        "name": f"{dataset}_{objective}_s{seed}",
        "seed": seed,
        "out_dir": str(out_dir),
        "data": data,
        "backbone": {"weights": "insitu:fractal_vit_tiny", "img_size": args.size, "in_chans": 3 if video else 1},
        "adapter": {"name": "bottleneck", "options": {"blocks": "all", "bottleneck_dim": 32, "scale": 0.1}},
        "objective": {"name": objective, "options": options},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "warmup_steps": max(1, args.steps // 10),
            "checkpoint_every": args.steps,
            "log_every": max(1, min(5, args.steps // 2)),
        },
        "trainer": {"accelerator": args.accelerator},
        "probe": probe_section(dataset, args),
    }


# ---------------------------------------------------------------- one run (in a child process)


def in_child(fn: Any, *fn_args: Any) -> dict[str, Any]:
    """Run ``fn`` in a fresh (spawned) process; return its result plus that process's peak RSS (MB).

    Spawned, not forked: a fork taken after torch has started its thread pools can deadlock, and
    a fresh process's peak RSS is its own run's (imports included).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, fn_args))
    proc.start()
    child.close()  # a crashed child shows up as EOFError instead of a hang
    out = parent.recv()
    proc.join()
    return out


def _child(conn: Any, fn: Any, fn_args: tuple) -> None:
    out = fn(*fn_args)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    conn.send(out)


def pretrain_job(raw: dict[str, Any]) -> dict[str, Any]:
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain

    start = time.perf_counter()
    result = pretrain(load_config(raw), quiet=True, overwrite=True)
    out = {
        "adapter": str(result.adapter_dir),
        "run_dir": str(result.run_dir),
        "steps": result.steps,
        "wall_s": time.perf_counter() - start,
        "items": result.items,
    }
    teacher = export_teacher(Path(result.adapter_dir), Path(result.run_dir).parent / f"{Path(result.run_dir).name}_teacher" / "adapter")
    if teacher is not None:
        out["teacher_adapter"] = str(teacher)
    return out


def export_teacher(adapter: Path, dst: Path) -> Path | None:
    """The EMA teacher's adapters as a package of their own (None for objectives without a teacher)."""
    from insitu.adapters.package import export_package
    from insitu.errors import ConfigError

    try:
        return export_package(adapter, dst, weights="teacher", overwrite=True)
    except ConfigError:
        return None


def probe_job(raw: dict[str, Any], adapters: list[str]) -> dict[str, Any]:
    """The probe of frozen, frozen + PCA whitening, the student adapters and (where there is one) the teacher's, in one plan."""
    from dataclasses import asdict

    from insitu.config import load_config
    from insitu.pipelines.probe import run_probe

    start = time.perf_counter()
    rows = run_probe(load_config(raw), [Path(a) for a in adapters])
    return {"rows": [asdict(r) for r in rows], "probe_s": time.perf_counter() - start}


def model_role(name: str) -> str:
    """frozen | whitened | student | teacher, from a probe row's model name."""
    if name == BASELINE:
        return "whitened"
    if name.startswith("trivial statistics"):
        return "shortcut"
    if not name.startswith("+ adapters"):
        return "frozen"
    return "teacher" if name.rstrip(")").endswith("_teacher") else "student"


def text_encoder_job(folder: str) -> dict[str, Any]:
    from tests.data.text_fixtures import build_tiny_bert

    return {"path": str(build_tiny_bert(Path(folder)))}


def first_last(run_dir: Path) -> dict[str, Any]:
    """First/last value of the loss, every ``health/`` column and ``train/identity_fraction`` in logs/metrics.csv (+ summary.json)."""
    path = run_dir / "logs" / "metrics.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    columns = [c for c in (rows[0].keys() if rows else []) if wanted(c)]
    out: dict[str, Any] = {}
    for col in columns:
        values = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
        if values:
            out[f"{col} first"], out[f"{col} last"] = values[0], values[-1]
    summary = run_dir / "summary.json"
    if summary.exists():
        for key, value in json.loads(summary.read_text()).items():
            if wanted(key) and key != "train/loss" and isinstance(value, int | float):
                out[f"{key} (summary)"] = value
    return out


def wanted(column: str) -> bool:
    return column == "train/loss" or column.startswith("health/") or "/health/" in column or column == "train/identity_fraction"


# ---------------------------------------------------------------- tables


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    extra = sorted({k for r in runs for k in r["logs"]}, key=lambda k: (not k.startswith("train/loss"), k))
    headers = ["dataset", "objective", "seed", "steps", "wall s", "peak RSS MB", *extra]
    cells = [[r["dataset"], r["objective"], str(r["seed"]), str(r["steps"]), f"{r['wall_s']:.0f}", str(r["peak_rss_mb"])] for r in runs]
    for row, r in zip(cells, runs, strict=True):
        row += [fmt(r["logs"].get(k, "")) for k in extra]
    return headers, cells


def _p(value: Any) -> str:
    return "" if value is None else f"{value:.3g}"


def probe_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Every non-frozen model's rows per run: mean, Δ vs frozen [CI], Δ vs frozen + PCA whitening, p, Holm p, verdict."""
    from insitu.heads.stats import format_delta

    headers = [
        "dataset", "objective", "seed", "model", "probe", "labels", "metric", "primary", "frozen", "model mean",
        "Δ vs frozen [95% CI]", "Δ vs whitened [95% CI]", "p", "p Holm", "verdict", "transductive",
    ]  # fmt: skip
    cells = []
    for r in runs:
        frozen = {(p["probe"], p["labels"], p["metric"]): p for p in r["probe"][0]["results"]}
        for model in r["probe"][1:]:
            for p in model["results"]:
                f = frozen.get((p["probe"], p["labels"], p["metric"]), {"mean": float("nan")})  # a shortcut row has no frozen twin
                vs = format_delta(p["vs_baseline_delta"], p.get("vs_baseline_ci_low"), p.get("vs_baseline_ci_high")) if p.get("vs_baseline_delta") is not None else ""
                probe = p["probe"] + (f" ({p['knn_features']})" if p.get("knn_features") else "")
                cells.append(
                    [
                        r["dataset"], r["objective"], str(r["seed"]), model_role(model["name"]), probe, f"{p['labels']:.0%}", p["metric"],
                        "yes" if p.get("primary") else "", f"{f['mean']:.3f}", f"{p['mean']:.3f} ± {p['std']:.3f}",
                        format_delta(p["delta"], p["ci_low"], p["ci_high"]) if p["delta"] is not None else "", vs, _p(p.get("p_value")), _p(p.get("p_adjusted")),
                        p["verdict"], str(p.get("transductive", "")),
                    ]
                )  # fmt: skip
    return headers, cells


def _summed(row: dict[str, Any]) -> Any:
    """A probe row's per-repeat counts summed over repeats: N × C."""
    import numpy as np

    return np.asarray(row["counts"], dtype=float).sum(0)


def seed_table(runs: list[dict[str, Any]], n_boot: int = 2000) -> tuple[list[str], list[list[str]]]:
    """Per (dataset, objective, steps, model, probe, labels, metric) over seeds: Δ per seed and a two-way interval.

    The interval resamples the test items' groups (the same weights for every seed) and the training
    seeds together (`insitu.heads.stats.two_way_bootstrap`), so it covers both the images and the
    retraining; the p-values of each (dataset, objective, steps) family's secondary rows are Holm-adjusted,
    the declared primary endpoint of the student adapters is not."""
    import numpy as np

    from insitu.heads.metrics import fg_dice_from_counts, miou_from_counts
    from insitu.heads.stats import accuracy_from_counts, bootstrap_differences, bootstrap_p_value, percentile_interval

    metric_fn = {"accuracy": accuracy_from_counts, "mIoU": miou_from_counts, "dice": fg_dice_from_counts}
    groups: dict[tuple, list[tuple[int, dict[str, Any], dict[str, Any], dict[str, Any] | None]]] = {}
    for r in runs:
        frozen = {(p["probe"], p["labels"], p["metric"]): p for p in r["probe"][0]["results"]}
        base = next((m for m in r["probe"] if m["name"] == BASELINE), None)
        based = {(p["probe"], p["labels"], p["metric"]): p for p in base["results"]} if base else {}
        for model in r["probe"][1:]:
            role = model_role(model["name"])
            if role == "shortcut":  # listed per run in the probe table; not a comparison with the frozen model
                continue
            for p in model["results"]:
                k = (p["probe"], p["labels"], p["metric"])
                key = (r["dataset"], r["objective"], r["steps"], role, *k)
                groups.setdefault(key, []).append((r["seed"], p, frozen[k], based.get(k) if role != "whitened" else None))
    headers = [
        "dataset", "objective", "steps", "model", "probe", "labels", "metric", "primary", "seeds", "Δ per seed",
        "pooled Δ [two-way 95% CI: items × seeds]", "Δ vs whitened [two-way 95% CI]", "p", "p Holm", "verdict",
    ]  # fmt: skip
    rows = []
    for key, entries in groups.items():
        dataset, objective, steps, role, probe, labels, metric = key
        fn = metric_fn[metric]
        items = [e[2].get("items") for e in entries]
        if any(it is None or it != items[0] for it in items) or any(e[1].get("counts") is None for e in entries):
            continue  # runs from before per-item counts, or on different test items: no joint interval
        units = entries[0][2]["units"]
        adapted = np.stack([_summed(e[1]) for e in entries])
        frozen = np.stack([_summed(e[2]) for e in entries])
        delta, diffs = bootstrap_differences(adapted, frozen, fn, units, n_boot, 0)
        lo, hi = percentile_interval(diffs)
        vs = ""
        if all(e[3] is not None for e in entries):
            based = np.stack([_summed(e[3]) for e in entries])
            d_b, diffs_b = bootstrap_differences(adapted, based, fn, units, n_boot, 0)
            lo_b, hi_b = percentile_interval(diffs_b)
            vs = f"{d_b:+.3f} [{lo_b:+.3f}, {hi_b:+.3f}]" if diffs_b is not None else f"{d_b:+.3f} (no CI)"
        primary = role == "student" and bool(entries[0][1].get("primary"))
        rows.append(
            {
                "family": (dataset, objective, steps),
                "primary": primary,
                "p": bootstrap_p_value(diffs) if diffs is not None else None,
                "cells": [
                    dataset, objective, str(steps), role, probe + (f" ({entries[0][1]['knn_features']})" if entries[0][1].get("knn_features") else ""),
                    f"{labels:.0%}", metric, "yes" if primary else "", " ".join(str(e[0]) for e in entries),
                    ", ".join(f"{e[1]['delta']:+.3f}" for e in entries),
                    f"{delta:+.3f} [{lo:+.3f}, {hi:+.3f}]" if diffs is not None else f"{delta:+.3f} (no CI)", vs,
                ],
                "ci": (lo, hi) if diffs is not None else None,
            }
        )  # fmt: skip
    return headers, with_holm(rows)


def versus_table(runs: list[dict[str, Any]], a: str, b: str, n_boot: int = 2000) -> tuple[list[str], list[list[str]]]:
    """Objective (variant) ``a`` against ``b`` directly, paired by dataset, steps and seed: per (model, probe,
    labels, metric), Δ = a − b per seed and pooled with a two-way interval (test items' groups × seeds).

    Both must be probed on the same test items with the same seed (the seed fixes the folds), so the
    only difference is the adapters; secondaries are Holm-adjusted within each dataset, the row
    matching the dataset's declared primary endpoint (student adapters) is not."""
    import numpy as np

    from insitu.heads.metrics import fg_dice_from_counts, miou_from_counts
    from insitu.heads.stats import accuracy_from_counts, bootstrap_differences, bootstrap_p_value, percentile_interval

    metric_fn = {"accuracy": accuracy_from_counts, "mIoU": miou_from_counts, "dice": fg_dice_from_counts}
    by = {(r["dataset"], r["steps"], r["seed"], r["objective"]): r for r in runs}
    missing = {label for label in (a, b) if not any(k[3] == label for k in by)}
    if missing:
        raise SystemExit(f"--versus: no runs of {sorted(missing)}; objectives present: {sorted({k[3] for k in by})}")
    pairs: dict[tuple, list[tuple[int, dict[str, Any], dict[str, Any]]]] = {}
    for (dataset, steps, seed, objective), ra in by.items():
        rb = by.get((dataset, steps, seed, b))
        if objective != a or rb is None:
            continue
        rows_b = {(model_role(m["name"]), p["probe"], p["labels"], p["metric"]): p for m in rb["probe"] for p in m["results"]}
        for m in ra["probe"]:
            role = model_role(m["name"])
            if role not in ("student", "teacher"):
                continue
            for p in m["results"]:
                q = rows_b.get((role, p["probe"], p["labels"], p["metric"]))
                if q is not None and p.get("counts") is not None and q.get("counts") is not None and p.get("items") == q.get("items"):
                    pairs.setdefault((dataset, steps, role, p["probe"], p["labels"], p["metric"]), []).append((seed, p, q))
    headers = ["dataset", "steps", "model", "probe", "labels", "metric", "primary", "seeds", "Δ per seed", f"{a} − {b} [two-way 95% CI: items × seeds]", "p", "p Holm", "verdict"]
    rows = []
    for (dataset, steps, role, probe, labels, metric), entries in pairs.items():
        units = entries[0][1]["units"]
        fa, fb = np.stack([_summed(e[1]) for e in entries]), np.stack([_summed(e[2]) for e in entries])
        delta, diffs = bootstrap_differences(fa, fb, metric_fn[metric], units, n_boot, 0)
        lo, hi = percentile_interval(diffs)
        primary = role == "student" and bool(entries[0][1].get("primary"))
        rows.append(
            {
                "family": dataset,
                "primary": primary,
                "p": bootstrap_p_value(diffs) if diffs is not None else None,
                "ci": (lo, hi) if diffs is not None else None,
                "cells": [
                    dataset, str(steps), role, probe + (f" ({entries[0][1]['knn_features']})" if entries[0][1].get("knn_features") else ""),
                    f"{labels:.0%}", metric, "yes" if primary else "", " ".join(str(e[0]) for e in entries),
                    ", ".join(f"{metric_fn[metric](_summed(e[1]).sum(0)) - metric_fn[metric](_summed(e[2]).sum(0)):+.3f}" for e in entries),
                    f"{delta:+.3f} [{lo:+.3f}, {hi:+.3f}]" if diffs is not None else f"{delta:+.3f} (no CI)",
                ],
            }
        )  # fmt: skip
    return headers, with_holm(rows)


def with_holm(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Each row's cells plus p, Holm-adjusted p and verdict: secondaries are Holm-adjusted within their
    ``family``; the declared primary keeps its own p and is judged by its interval alone."""
    from insitu.heads.stats import holm, verdict

    for family in {r["family"] for r in rows}:
        secondary = [r for r in rows if r["family"] == family and not r["primary"] and r["p"] is not None]
        for r, adj in zip(secondary, holm([r["p"] for r in secondary]), strict=True):
            r["p_adj"] = float(adj)
    cells = []
    for r in rows:
        p_adj = r["p"] if r["primary"] else r.get("p_adj")
        word = "no CI" if r["ci"] is None else verdict(*r["ci"]) if r["primary"] else _holm_word(p_adj, r["ci"])
        cells.append([*r["cells"], _p(r["p"]), _p(p_adj), word])
    return cells


def _holm_word(p_adj: float | None, ci: tuple[float, float]) -> str:
    if p_adj is None or p_adj >= 0.05:
        return "not resolved (Holm-adjusted)"
    return "resolved gain" if ci[0] + ci[1] > 0 else "resolved loss"


def markdown(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def write_csv(path: Path, headers: list[str], cells: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(cells)


# ---------------------------------------------------------------- main


def run_all(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Every (dataset, objective, seed): pretrain in one process, probe in another (the parent runs no torch)."""
    text_encoder = args.text_encoder
    if "convirt" in args.objectives and text_encoder is None:
        text_encoder = in_child(text_encoder_job, str(tmp / "tiny_bert"))["path"]
    runs = []
    for dataset in args.datasets:
        for objective in args.objectives:
            if (dataset in VIDEO_DATASETS) != (objective in VIDEO_OBJECTIVES):
                continue  # image objectives on image sets, video objectives on PolypGen's sequences
            label = variant_label(objective, args.set)
            for seed in args.seeds:
                raw = run_config(args, dataset, objective, seed, tmp / "runs", text_encoder)
                for override in args.set:
                    apply_override(raw, override)
                trained = in_child(pretrain_job, raw)
                adapters = [trained["adapter"], *([trained["teacher_adapter"]] if "teacher_adapter" in trained else [])]
                probed = in_child(probe_job, raw, adapters)
                run = {"dataset": dataset, "objective": label, "seed": seed, **trained, "probe_s": probed["probe_s"]}
                run["overrides"] = list(args.set)
                run["logs"] = first_last(Path(trained["run_dir"]))
                run["probe"] = probed["rows"]
                runs.append(run)
                if args.out:  # each finished run at once: a stopped benchmark keeps what it measured
                    args.out.mkdir(parents=True, exist_ok=True)
                    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}_{label}_s{seed}")
                    run["metrics_csv"] = keep_metrics(Path(trained["run_dir"]), args.out, name)
                    run["kept_adapters"] = keep_adapters(adapters, args.out / "adapters" / name)
                    with open(args.out / "runs.jsonl", "a") as f:
                        f.write(json.dumps(run, default=str) + "\n")
                print(f"[{dataset}] {label} seed {seed}: {trained['wall_s']:.0f} s pretrain, {run['probe_s']:.0f} s probe", flush=True)
    return runs


def reprobe(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A finished run probed again from its kept packages (``--from-runs ... --reprobe``): same data sides and seed,
    this invocation's probe settings and ``--set`` overrides; nothing is trained."""
    if not run.get("kept_adapters"):
        raise SystemExit(f"{run['dataset']} {run['objective']} seed {run['seed']}: no kept packages (runs before --out kept them)")
    raw = run_config(args, run["dataset"], run["objective"].split(" [")[0], run["seed"], Path(tempfile.gettempdir()), None)
    for override in [*run.get("overrides", []), *args.set]:
        apply_override(raw, override)
    staged = Path(tempfile.mkdtemp(prefix="insitu_reprobe_"))  # <run name>[_teacher]/adapter: the probe names models by folder
    adapters = [str(shutil.copytree(k, staged / Path(k).name / "adapter")) for k in run["kept_adapters"]]
    probed = in_child(probe_job, raw, adapters)
    shutil.rmtree(staged)
    out = {**run, "probe": probed["rows"], "probe_s": probed["probe_s"], "objective": variant_label(run["objective"], args.set)}
    print(f"[{run['dataset']}] {run['objective']} seed {run['seed']}: probed again in {probed['probe_s']:.0f} s", flush=True)
    return out


def variant_label(objective: str, overrides: list[str]) -> str:
    """The objective's name in every table; a run with ``--set`` overrides carries them, so its rows never pool with the default's."""
    return f"{objective} [{', '.join(overrides)}]" if overrides else objective


def keep_metrics(run_dir: Path, out: Path, name: str) -> str | None:
    """Copy the run's per-step metrics.csv (the run folder is temporary) to ``out/metrics/``, never over a file."""
    src = run_dir / "logs" / "metrics.csv"
    if not src.is_file():
        return None
    dst, n = out / "metrics" / f"{name}.csv", 1
    while dst.exists():  # a rerun into the same --out keeps the earlier run's file
        dst, n = out / "metrics" / f"{name}_{n}.csv", n + 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst)


def keep_adapters(adapters: list[str], dst: Path) -> list[str]:
    """Copy the run's packages (student, teacher) out of the temporary run folder, never over a folder: they can be probed again."""
    kept = []
    for src in adapters:  # named by run (<run>, <run>_teacher): the probe names each model by its package's folder
        target, n = dst / Path(src).parent.name, 1
        while target.exists():
            target, n = dst / f"{Path(src).parent.name}_{n}", n + 1
        shutil.copytree(src, target)
        kept.append(str(target))
    return kept


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "busi"], choices=["pneumoniamnist", "busi", *VIDEO_DATASETS])
    p.add_argument("--objectives", nargs="+", default=["dino", "glare", "graph_matching", "convirt"], choices=list(OBJECTIVE_OPTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds; seed s also seeds the probe folds")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=64, help="input size (the shipped base's native 64 px)")
    p.add_argument("--max-items", type=int, default=None, help="cap every data side (smoke tests)")
    p.add_argument("--probe-items", type=int, default=1000, help="PneumoniaMNIST train images the probes fold")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="fold assignments per run; repeats enter the bootstrap CI")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--dense-steps", type=int, default=2000, help="the dense probe's cap on steps (it stops at its loss plateau; 100 was the fixed count before issue 38)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense probe on BUSI")
    p.add_argument("--text-encoder", default=None, help="a local text encoder folder for ConVIRT (default: a tiny random BERT)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument(
        "--transductive",
        action="store_true",
        help="probe on the pretraining images (the in-situ setting); default: a held-out third that pretraining never sees",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted override of every run's config, e.g. objective.options.margin=3 (repeatable); the tables label those runs with it",
    )
    p.add_argument(
        "--from-runs", type=Path, nargs="+", default=None, help="runs.jsonl files of finished benchmarks: print their tables, train nothing"
    )
    p.add_argument(
        "--reprobe",
        action="store_true",
        help="with --from-runs: probe the kept packages again under this invocation's probe flags and --set (e.g. probe.knn_features=raw)",
    )
    p.add_argument(
        "--versus",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help='with --from-runs: also compare two objectives (as the tables label them, e.g. "glare" "glare [objective.options.regional.match_features=raw]") directly, paired by seed',
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for runs.jsonl, runs.csv, probe.csv, seeds.csv, results.json and each run's metrics/*.csv (default: print only)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_items is not None:  # a smoke run: small folds and few resamples keep it to a minute
        args.folds, args.repeats = min(args.folds, 3), 1
    print(f"protocol: {json.dumps({k: str(v) for k, v in vars(args).items()})}", flush=True)
    if args.from_runs:  # re-tabulate finished runs (several benchmark invocations) without training
        runs = [json.loads(line) for path in args.from_runs for line in path.read_text().splitlines() if line.strip()]
        if args.reprobe:  # probe the kept packages again under this invocation's probe settings (e.g. --set probe.knn_features=raw)
            runs = [reprobe(run, args) for run in runs]
    else:
        with tempfile.TemporaryDirectory(prefix="insitu_bench_objectives_") as tmp:
            runs = run_all(args, Path(tmp))
    tables = {"runs": run_table(runs), "probe": probe_table(runs), "seeds": seed_table(runs, args.bootstrap)}
    print("\n### runs\n\n" + markdown(*tables["runs"]))
    print("\n### probe: adapted vs frozen (mean ± std over folds × repeats; paired bootstrap 95 % CI)\n\n" + markdown(*tables["probe"]))
    print(
        "\n### over seeds: Δ per seed, pooled Δ with a two-way bootstrap interval (test items' groups × training seeds), Holm-adjusted secondaries\n\n"
        + markdown(*tables["seeds"])
    )
    if args.versus:
        tables["versus"] = versus_table(runs, *args.versus, n_boot=args.bootstrap)
        print(f"\n### {args.versus[0]} vs {args.versus[1]}, paired by seed (two-way bootstrap over test items' groups × seeds)\n\n" + markdown(*tables["versus"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (headers, cells) in tables.items():
            write_csv(args.out / f"{name}.csv", headers, cells)
        (args.out / "results.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2, default=str))
        print(f"\nwrote {args.out}/runs.csv, probe.csv, seeds.csv, results.json")


if __name__ == "__main__":
    main()
