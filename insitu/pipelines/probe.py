"""Probe frozen features: the untouched backbone versus backbone + adapter packages, side by side.

The evaluation is repeated so that it can resolve a change: stratified, group-disjoint folds (or a
fixed train/test split) times ``probe.repeats``, at every ``probe.label_fractions`` share of the
training labels, with the same folds and label subsets for every model. Next to the frozen backbone
and each adapter package, the label-free baseline "frozen + PCA whitening" (frozen features whitened
on each evaluation's training items) shows what a transform without training gives. Each model's
difference to the frozen backbone gets a paired bootstrap CI and p-value; the pre-registered primary
endpoint (``probe.primary``) decides the verdict, every other row is Holm-adjusted (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import ProbeConfig, RunConfig
from insitu.heads.probe import knn_predict, linear_probe_predict, pca_whiten
from insitu.heads.stats import accuracy_from_counts, format_delta, verdict
from insitu.io import write_csv, write_json
from insitu.pipelines.data import SampleDataset, collate
from insitu.pipelines.preprocess import Preprocessing, Stored, package_preprocessing, resolve_comparison
from insitu.pipelines.probe_dense import dense_results, stored_of
from insitu.pipelines.probe_plan import (
    BASELINE,
    Model,
    Pool,
    ProbeResult,
    Split,
    classification_pool,
    decide_verdicts,
    evaluation_plan,
    summarise,
)
from insitu.sharing.signing import trust_of


@dataclass
class ProbeRow:
    """One model: full-label linear and kNN accuracy (means over evaluations) plus every result row."""

    name: str
    linear_acc: float
    knn_acc: float
    trainable_params: int
    n_train: int
    n_test: int
    linear_std: float = 0.0
    knn_std: float = 0.0
    evaluations: int = 1
    results: list[ProbeResult] = field(default_factory=list)


# ---------------------------------------------------------------- features


def _extract(model: AdaptedBackbone, dataset: SampleDataset, batch_size: int, features: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    model.eval()
    xs, ys, ids = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if not batch["item_id"]:
            continue
        cls, patches, _ = model.forward_tokens(batch["image"])
        parts = {"cls": [cls], "mean": [patches.mean(1)], "cls+mean": [cls, patches.mean(1)]}[features]
        xs.append(torch.cat(parts, dim=1).float().numpy())
        ys.append(batch["label"].numpy())
        ids += batch["item_id"]
    return np.concatenate(xs), np.concatenate(ys), ids


@torch.no_grad()
def extract_features(
    model: AdaptedBackbone, dataset: SampleDataset, batch_size: int = 64, features: str = "cls+mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features (never an SSL projection head) and labels for every item of ``dataset``."""
    x, y, _ = _extract(model, dataset, batch_size, features)
    return x, y


@torch.no_grad()
def pool_features(model: Model, pool: Pool, prep: Preprocessing, cfg: ProbeConfig) -> dict[tuple[int, str], np.ndarray]:
    """(side, item id) -> feature vector over every side of the pool (items that fail to load are absent).

    Keyed by side too: two sets scanned from different roots can give the same relative ids.
    """
    out: dict[tuple[int, str], np.ndarray] = {}
    for side, (data, items) in enumerate(pool.sides):
        x, _, ids = _extract(model.model, prep.dataset(data, items), cfg.batch_size, cfg.features)
        out.update(zip([(side, i) for i in ids], x, strict=True))
    return out


def load_models(cfg: RunConfig, adapter_paths: list[Path] | None) -> tuple[list[Model], list[Stored]]:
    """The models (as `build_models`) and what each stores for `resolve_comparison`: None (frozen), then each package."""
    backbone = create_backbone(cfg.backbone)
    trust = trust_of(cfg)
    packages = [load_package(p, trust) for p in adapter_paths or []]
    models = [Model("frozen backbone", AdaptedBackbone(backbone, None), None, 0)]
    for path, pkg in zip(adapter_paths or [], packages, strict=True):
        adapted = apply_package(pkg, backbone)
        trainable = sum(p.numel() for p in adapted.adapters.parameters()) if adapted.adapters is not None else 0
        # Model.normalizer: what the package stores; the comparison's rule is applied on the data (resolve_comparison)
        stored = package_preprocessing(pkg).normalizer
        models.append(Model(f"+ adapters ({Path(path).parent.name or Path(path).name})", adapted, stored, trainable))
    return models, [None, *packages]


def build_models(cfg: RunConfig, adapter_paths: list[Path] | None) -> list[Model]:
    """The frozen backbone, then backbone + each package; all share the frozen weights and one normaliser rule (preprocess)."""
    return load_models(cfg, adapter_paths)[0]


# ---------------------------------------------------------------- evaluation


def score_classification(
    x: np.ndarray, labels: np.ndarray, plan: list[Split], knn_k: int, knn_features: str = "standardised", whiten: bool = False
) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (probe, share): per-evaluation accuracies and per-repeat, per-item (correct, seen) counts (R × N × 2).

    ``knn_features``: 'standardised' (by each evaluation's training items) or 'raw' features for the
    cosine kNN. ``whiten``: the label-free baseline, features PCA-whitened on each evaluation's
    training items (`pca_whiten`) before both probes."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    repeats = max(s.repeat for s in plan) + 1
    for s in plan:
        x_train, x_test = pca_whiten(x[s.train], x[s.test]) if whiten else (x[s.train], x[s.test])
        preds = {
            "linear": linear_probe_predict(x_train, labels[s.train], x_test),
            "knn": knn_predict(x_train, labels[s.train], x_test, knn_k, standardise=knn_features == "standardised"),
        }
        for probe, pred in preds.items():
            entry = out.setdefault((probe, s.fraction), {"scores": [], "counts": np.zeros((repeats, len(labels), 2)), "n_train": []})
            correct = (pred == labels[s.test]).astype(float)
            entry["scores"].append(float(correct.mean()))
            entry["counts"][s.repeat, s.test, 0] += correct
            entry["counts"][s.repeat, s.test, 1] += 1
            entry["n_train"].append(len(s.train))
    return out


def classification_results(
    cfg: RunConfig, models: list[Model], stored: list[Stored] | None = None
) -> tuple[dict[str, list[ProbeResult]], dict[str, tuple[int, int]]]:
    """Linear and kNN results per model, and each model's (n_train, n_test) at full labels.

    Each model's input follows `resolve_comparison` on the pool's first set (``stored``: see `stored_of`).
    """
    pool = classification_pool(cfg)
    size = (cfg.probe.train or cfg.data).image_size
    items = pool.items
    preps = resolve_comparison(stored_of(models, stored), *pool.sides[0], size, cfg.backbone)
    feats = {m.name: pool_features(m, pool, prep, cfg.probe) for m, prep in zip(models, preps, strict=True)}
    keys = [(side, it.item_id) for side, (_, its) in enumerate(pool.sides) for it in its]
    keep = [i for i, key in enumerate(keys) if all(key in f for f in feats.values())]
    index = {old: new for new, old in enumerate(keep)}
    labels = np.array([items[i].label for i in keep])
    groups = np.array([f"{keys[i][0]}:{items[i].group}" for i in keep])  # groups are per set
    fixed = None
    if pool.fixed is not None:
        fixed = tuple(np.array([index[i] for i in part if i in index]) for part in pool.fixed)
    plan = evaluation_plan(labels, groups, cfg.probe, cfg.seed, fixed)
    scored = {}
    for m in models:
        x = np.stack([feats[m.name][keys[i]] for i in keep])
        scored[m.name] = score_classification(x, labels, plan, cfg.probe.knn_k, cfg.probe.knn_features)
    if cfg.probe.label_free_baseline == "whitened":  # the frozen (first) model's features, whitened per evaluation
        x = np.stack([feats[models[0].name][keys[i]] for i in keep])
        scored[BASELINE] = score_classification(x, labels, plan, cfg.probe.knn_k, cfg.probe.knn_features, whiten=True)
    metrics = {p: {"accuracy": accuracy_from_counts} for p in ("linear", "knn")}
    full = [s for s in plan if s.fraction == max(cfg.probe.label_fractions)]
    sizes = (round(np.mean([len(s.train) for s in full])), round(np.mean([len(s.test) for s in full])))
    ids = [f"{keys[i][0]}:{keys[i][1]}" for i in keep]  # side:item id (two sets can share relative ids)
    results = summarise(scored, metrics, groups, cfg.probe, cfg.seed, classes=labels, items=ids)
    return results, {name: sizes for name in scored}


def run_probe(cfg: RunConfig, adapter_paths: list[Path] | None = None) -> list[ProbeRow]:
    """Repeated linear-probe, kNN (and dense) evaluation of the frozen backbone and each adapter package."""
    L.seed_everything(cfg.seed, verbose=False)
    models, stored = load_models(cfg, adapter_paths)
    results, sizes = classification_results(cfg, models, stored)
    if cfg.probe.dense is not None:
        for name, rows in dense_results(cfg, models, stored).items():
            results[name] += rows
        decide_verdicts(results, cfg.probe)  # Holm over every secondary row of a model, dense included
    full = max(cfg.probe.label_fractions)
    out = []
    trainable = {m.name: m.trainable for m in models}
    for name in results:  # frozen, each package, then the label-free baseline (0 trainable parameters)
        lin = next(r for r in results[name] if r.probe == "linear" and r.labels == full)
        knn = next(r for r in results[name] if r.probe == "knn" and r.labels == full)
        n_train, n_test = sizes[name]
        out.append(ProbeRow(name, lin.mean, knn.mean, trainable.get(name, 0), n_train, n_test, lin.std, knn.std, lin.evaluations, results[name]))
    # -- shortcut check (insitu/pipelines/probe_shortcuts.py): trivial file statistics on the same folds; a row when above chance
    if cfg.probe.shortcut_check:
        from insitu.pipelines.probe_shortcuts import TRIVIAL, shortcut_result

        if (found := shortcut_result(cfg)) is not None:
            rows, c = found
            out.append(ProbeRow(TRIVIAL, c.accuracy, c.knn_accuracy, 0, c.n_train, c.n_test, c.std, c.knn_std, c.evaluations, rows))
    # -- end shortcut check
    return out


def primary_result(results: list[Any], model: str | None = None) -> ProbeResult | dict | None:
    """An adapted model's primary-endpoint row (``model``: that model; default the first adapted one), or None.

    ``results``: ProbeRows (or their dicts, with ``results``) or result rows directly; the frozen
    model and the label-free baseline are never returned."""
    flat = []
    for r in results:
        nested = r.results if isinstance(r, ProbeRow) else r.get("results") if isinstance(r, dict) else None
        flat += list(nested) if nested is not None else [r]
    for r in flat:
        d = _as_dict(r)
        if d.get("primary") and d.get("delta") is not None and d["model"] != BASELINE and model in (None, d["model"]):
            return r
    return None


def endpoint_label(row: dict[str, Any]) -> str:
    """'knn@0.1:accuracy', the form of ``probe.primary``."""
    return f"{row['probe']}@{row['labels']}:{row['metric']}"


def primary_summary(rows: list[Any]) -> list[str]:
    """One line per adapted model, decided by the primary endpoint alone: Δ vs frozen [CI] verdict; vs the baseline."""
    results = result_rows(rows)
    adapted = list(dict.fromkeys(r["model"] for r in results if r["delta"] is not None and r["model"] != BASELINE))
    lines = []
    for model in adapted:
        r = primary_result(results, model)
        if r is None:
            lines.append(f"{model}: no primary endpoint row (a probe.json from before probe.primary?)")
            continue
        v = r["verdict"] or "no bootstrap (probe.bootstrap: 0)"
        line = f"primary endpoint {endpoint_label(r)}, {model}: {format_delta(r['delta'], r['ci_low'], r['ci_high'])} {v} (adapted − frozen)"
        if r.get("vs_baseline_delta") is not None:
            low, high = r["vs_baseline_ci_low"], r["vs_baseline_ci_high"]
            base = verdict(low, high) if low is not None else "no CI"
            line += f"; vs {BASELINE}: {format_delta(r['vs_baseline_delta'], low, high)} {base}"
        lines.append(line)
    if not adapted:
        base = [r for r in results if r["model"] == BASELINE and r.get("primary")]
        what = f"; {BASELINE} − frozen: {format_delta(base[0]['delta'], base[0]['ci_low'], base[0]['ci_high'])}" if base else ""
        lines.append(f"no adapted model to judge on the primary endpoint{what}")
    return lines


# ---------------------------------------------------------------- output


PROBE_NOTE = (
    "mean ± std over the evaluations (stratified group folds × repeats, or a fixed split × repeats); labels: the share "
    "of training labels used (the same items for every model). Δ: adapted − frozen pooled over all evaluations, with a "
    "paired percentile bootstrap CI over test items (groups) and repeats. The verdict rests on the primary endpoint (probe.primary): "
    "resolved only when its CI excludes 0; every other row is secondary, resolved only when its Holm-adjusted p < 1 − confidence. "
    f"'{BASELINE}': the frozen features whitened on each evaluation's training items, no labels and no training."
)

CSV_COLUMNS = [
    "model", "probe", "labels", "metric", "mean", "std", "evaluations", "n_train", "n_test",
    "delta", "ci_low", "ci_high", "verdict",
    "primary", "p_value", "p_adjusted", "knn_features", "transductive", "vs_baseline_delta", "vs_baseline_ci_low", "vs_baseline_ci_high",
]  # fmt: skip


def _as_dict(row: Any) -> dict[str, Any]:
    return asdict(row) if is_dataclass(row) else dict(row)


def result_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """Every ProbeResult of every model, as dicts (ProbeRow objects or their ``asdict`` form)."""
    return [_as_dict(r) for row in rows for r in _as_dict(row).get("results", [])]


def probe_table(rows: list[Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the human-readable probe table: mean ± std, Δ vs frozen [CI], verdict."""
    headers = ["features", "probe", "labels", "mean ± std", "Δ vs frozen [95% CI]", "verdict", "train per eval / test items × evals"]
    names = [_as_dict(r)["name"] for r in rows]
    models = names[:1] + [n for n in names[1:] if n == BASELINE] + [n for n in names[1:] if n != BASELINE]  # baseline next to frozen
    order = {"linear": 0, "knn": 1, "dense": 2}
    names = {"linear": "linear", "knn": "kNN", "dense": "dense", "accuracy": "acc"}
    cells = []
    for r in sorted(result_rows(rows), key=lambda r: (order.get(r["probe"], 3), -r["labels"], r["metric"], models.index(r["model"]))):
        delta = format_delta(r["delta"], r["ci_low"], r["ci_high"]) if r["delta"] is not None else "—"
        probe = f"{names.get(r['probe'], r['probe'])} {names.get(r['metric'], r['metric'])}"
        size = f"{r['n_train']}/{r['n_test']} × {r['evaluations']}"
        primary = r.get("primary") and r["delta"] is not None and r["model"] != BASELINE  # the baseline's row there is context, not the verdict
        v = (r["verdict"] or "—") + (" (primary endpoint)" if primary else "")
        cells.append([r["model"], probe, f"{r['labels']:.0%}", f"{r['mean']:.3f} ± {r['std']:.3f}", delta, v, size])
    if not cells:  # rows from before the repeated evaluation (no results): one line per model
        for r in map(_as_dict, rows):
            acc = f"linear {r['linear_acc']:.3f} / kNN {r['knn_acc']:.3f}"
            cells.append([r["name"], "linear/kNN acc", "100%", acc, "—", "—", f"{r['n_train']}/{r['n_test']} × 1"])
    return headers, cells


def write_probe_outputs(rows: list[ProbeRow], out_dir: Path, cfg: RunConfig) -> tuple[Path, Path]:
    """``probe.csv`` (one line per model × probe × labels × metric) and ``probe.json`` (protocol + rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "probe.csv", out_dir / "probe.json"
    write_csv(csv_path, CSV_COLUMNS, result_rows(rows))  # None is written as an empty cell
    protocol = cfg.probe.model_dump(mode="json", exclude={"train", "test"})
    fixed = cfg.probe.test is not None and not cfg.probe.pool_test
    protocol |= {"seed": cfg.seed, "split": "fixed train/test" if fixed else f"{cfg.probe.folds}-fold stratified group folds"}
    protocol["primary"] = cfg.probe.primary_name()
    items: dict[str, list[str]] = {}
    units: dict[str, list[int]] = {}
    serialised = []
    for row in map(_as_dict, rows):
        for r in row.get("results", []):  # the test items and units once per probe kind, from the reference model's rows
            if r.get("units") is not None:
                units.setdefault(r["probe"], r["units"])
                if r.get("items") is not None:
                    items.setdefault(r["probe"], r["items"])
        serialised.append(row | {"results": [{k: v for k, v in r.items() if k not in ("items", "units")} for r in row.get("results", [])]})
    write_json(json_path, {"protocol": protocol, "items": items, "units": units, "rows": serialised}, default=str)
    return csv_path, json_path
