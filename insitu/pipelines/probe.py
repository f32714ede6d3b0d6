"""Probe frozen features: the untouched backbone versus backbone + adapter packages, side by side.

The evaluation is repeated so that it can resolve a change: stratified, group-disjoint folds (or a
fixed train/test split) times ``probe.repeats``, at every ``probe.label_fractions`` share of the
training labels, with the same folds and label subsets for every model. Each adapted model's
difference to the frozen backbone gets a paired bootstrap CI and a verdict (docs/evaluation.md).
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
from insitu.heads.probe import knn_predict, linear_probe_predict
from insitu.heads.stats import accuracy_from_counts, format_delta
from insitu.io import write_csv, write_json
from insitu.pipelines.data import SampleDataset, collate
from insitu.pipelines.preprocess import Preprocessing, Stored, package_preprocessing, resolve_comparison
from insitu.pipelines.probe_dense import dense_results, stored_of
from insitu.pipelines.probe_plan import (
    Model,
    Pool,
    ProbeResult,
    Split,
    classification_pool,
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


def score_classification(x: np.ndarray, labels: np.ndarray, plan: list[Split], knn_k: int) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (probe, share): per-evaluation accuracies and per-repeat, per-item (correct, seen) counts (R × N × 2)."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    repeats = max(s.repeat for s in plan) + 1
    for s in plan:
        preds = {
            "linear": linear_probe_predict(x[s.train], labels[s.train], x[s.test]),
            "knn": knn_predict(x[s.train], labels[s.train], x[s.test], knn_k),
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
        scored[m.name] = score_classification(x, labels, plan, cfg.probe.knn_k)
    metrics = {p: {"accuracy": accuracy_from_counts} for p in ("linear", "knn")}
    full = [s for s in plan if s.fraction == max(cfg.probe.label_fractions)]
    sizes = (round(np.mean([len(s.train) for s in full])), round(np.mean([len(s.test) for s in full])))
    return summarise(scored, metrics, groups, cfg.probe, cfg.seed), {m.name: sizes for m in models}


def run_probe(cfg: RunConfig, adapter_paths: list[Path] | None = None) -> list[ProbeRow]:
    """Repeated linear-probe, kNN (and dense) evaluation of the frozen backbone and each adapter package."""
    L.seed_everything(cfg.seed, verbose=False)
    models, stored = load_models(cfg, adapter_paths)
    results, sizes = classification_results(cfg, models, stored)
    if cfg.probe.dense is not None:
        for name, rows in dense_results(cfg, models, stored).items():
            results[name] += rows
    full = max(cfg.probe.label_fractions)
    out = []
    for m in models:
        lin = next(r for r in results[m.name] if r.probe == "linear" and r.labels == full)
        knn = next(r for r in results[m.name] if r.probe == "knn" and r.labels == full)
        n_train, n_test = sizes[m.name]
        out.append(ProbeRow(m.name, lin.mean, knn.mean, m.trainable, n_train, n_test, lin.std, knn.std, lin.evaluations, results[m.name]))
    return out


# ---------------------------------------------------------------- output


PROBE_NOTE = (
    "mean ± std over the evaluations (stratified group folds × repeats, or a fixed split × repeats); labels: the share "
    "of training labels used (the same items for every model). Δ: adapted − frozen pooled over all evaluations, with a "
    "paired percentile bootstrap CI over test items (groups) and repeats; a difference counts as resolved only when its CI excludes 0."
)

CSV_COLUMNS = [
    "model", "probe", "labels", "metric", "mean", "std", "evaluations", "n_train", "n_test",
    "delta", "ci_low", "ci_high", "verdict",
]  # fmt: skip


def _as_dict(row: Any) -> dict[str, Any]:
    return asdict(row) if is_dataclass(row) else dict(row)


def result_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """Every ProbeResult of every model, as dicts (ProbeRow objects or their ``asdict`` form)."""
    return [_as_dict(r) for row in rows for r in _as_dict(row).get("results", [])]


def probe_table(rows: list[Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the human-readable probe table: mean ± std, Δ vs frozen [CI], verdict."""
    headers = ["features", "probe", "labels", "mean ± std", "Δ vs frozen [95% CI]", "verdict", "train per eval / test items × evals"]
    models = [_as_dict(r)["name"] for r in rows]
    order = {"linear": 0, "knn": 1, "dense": 2}
    names = {"linear": "linear", "knn": "kNN", "dense": "dense", "accuracy": "acc"}
    cells = []
    for r in sorted(result_rows(rows), key=lambda r: (order.get(r["probe"], 3), -r["labels"], r["metric"], models.index(r["model"]))):
        delta = format_delta(r["delta"], r["ci_low"], r["ci_high"]) if r["delta"] is not None else "—"
        probe = f"{names.get(r['probe'], r['probe'])} {names.get(r['metric'], r['metric'])}"
        size = f"{r['n_train']}/{r['n_test']} × {r['evaluations']}"
        cells.append([r["model"], probe, f"{r['labels']:.0%}", f"{r['mean']:.3f} ± {r['std']:.3f}", delta, r["verdict"] or "—", size])
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
    write_json(json_path, {"protocol": protocol, "rows": [asdict(r) for r in rows]}, default=str)
    return csv_path, json_path
