"""Probe frozen features: the untouched backbone versus backbone + adapter packages, side by side.

The evaluation is repeated so that it can resolve a change: stratified, group-disjoint folds (or a
fixed train/test split) times ``probe.repeats``, at every ``probe.label_fractions`` share of the
training labels, with the same folds and label subsets for every model. Each adapted model's
difference to the frozen backbone gets a paired bootstrap CI and a verdict (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import DataConfig, ProbeConfig, RunConfig
from insitu.domains import ManifestItem, split_by_group
from insitu.domains.normalize import Normalizer
from insitu.errors import DataError
from insitu.heads.metrics import dense_counts, fg_dice_from_counts, miou_from_counts
from insitu.heads.probe import dense_linear_probe, knn_predict, linear_probe_predict
from insitu.heads.stats import accuracy_from_counts, group_folds, label_subset, mean_std, paired_bootstrap, verdict
from insitu.io import write_csv, write_json
from insitu.pipelines.data import SampleDataset, ScannedData, collate, fit_normalizer
from insitu.sharing.signing import trust_of


@dataclass
class ProbeResult:
    """One model × probe × label share × metric: mean ± std over evaluations, and the paired difference."""

    model: str
    probe: str  # linear | knn | dense
    labels: float  # share of the training labels used
    metric: str  # accuracy | mIoU | dice
    mean: float
    std: float
    evaluations: int  # folds × repeats
    n_train: int  # mean training items per evaluation
    n_test: int  # distinct test items scored
    delta: float | None = None  # adapted − frozen, pooled over every evaluation
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: str = ""


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


@dataclass
class Split:
    """One evaluation: the training indices (after the label subset) and the test indices of a pool."""

    repeat: int
    fold: int
    fraction: float
    train: np.ndarray
    test: np.ndarray


@dataclass
class Model:
    name: str
    model: AdaptedBackbone
    normalizer: Normalizer | None  # None: fit on the probe data (the frozen backbone without packages)
    trainable: int


# ---------------------------------------------------------------- data and splits


def probe_splits(cfg: RunConfig) -> tuple[ScannedData, list, ScannedData, list]:
    """(train data, train items, test data, test items) from ``probe.train``/``probe.test`` or a group split."""
    train_cfg: DataConfig = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    if cfg.probe.test is not None:
        test = ScannedData.scan(cfg.probe.test)
        train_items, test_items = train.manifest.items, test.manifest.items
    else:
        parts = split_by_group(train.manifest.items, {"train": 1 - cfg.probe.test_fraction, "test": cfg.probe.test_fraction}, seed=cfg.seed)
        test, train_items, test_items = train, parts["train"], parts["test"]
    for name, items in (("train", train_items), ("test", test_items)):
        _check_labels(items, f"probe {name} set under {train_cfg.root}")
    return train, train_items, test, test_items


def _check_labels(items: list[ManifestItem], what: str) -> None:
    labels = {i.label for i in items}
    if None in labels or len(labels) < 2:
        raise DataError(
            f"{what} needs labels of at least 2 classes (class subfolders, or *_labels arrays in an .npz); set probe.train/probe.test."
        )


@dataclass
class Pool:
    """The labelled items a probe draws on: per side (data, items), plus a fixed split when one is given."""

    sides: list[tuple[ScannedData, list[ManifestItem]]]
    fixed: tuple[np.ndarray, np.ndarray] | None

    @property
    def items(self) -> list[ManifestItem]:
        return [i for _, items in self.sides for i in items]


def classification_pool(cfg: RunConfig) -> Pool:
    """``probe.train`` (or ``data``) to cut into folds, or ``probe.train`` + ``probe.test`` as a fixed split."""
    train_cfg = cfg.probe.train or cfg.data
    train = ScannedData.scan(train_cfg)
    _check_labels(train.manifest.items, f"probe train set under {train_cfg.root}")
    if cfg.probe.test is None:
        return Pool([(train, _grouped(train.manifest.items, cfg.probe))], None)
    test = ScannedData.scan(cfg.probe.test)
    _check_labels(test.manifest.items, f"probe test set under {cfg.probe.test.root}")
    if cfg.probe.pool_test:  # fold over both sets: every item is tested once per repeat
        return Pool([(train, _grouped(train.manifest.items, cfg.probe)), (test, _grouped(test.manifest.items, cfg.probe))], None)
    n_tr, n_te = len(train.manifest.items), len(test.manifest.items)
    return Pool([(train, train.manifest.items), (test, test.manifest.items)], (np.arange(n_tr), np.arange(n_tr, n_tr + n_te)))


def _grouped(items: list[ManifestItem], probe: ProbeConfig) -> list[ManifestItem]:
    """Items regrouped by a perceptual hash when ``probe.group_near_duplicates`` (BUSI-style sets)."""
    if not probe.group_near_duplicates:
        return items
    from insitu.domains.near_duplicates import thumbnail_hash

    return [replace(i, group=thumbnail_hash(i.path)) if Path(i.path).suffix.lower() != ".npz" else i for i in items]


def evaluation_plan(
    labels: np.ndarray,
    groups: np.ndarray,
    probe: ProbeConfig,
    seed: int,
    fixed: tuple[np.ndarray, np.ndarray] | None = None,
    fractions: list[float] | None = None,
    classify: bool = True,
) -> list[Split]:
    """Every (repeat, fold, label share) evaluation, built once from labels and groups so all models share it.

    Repeat r uses seed ``seed + r`` for its folds; the label subset of (repeat, fold, share) is drawn
    with the seed sequence (seed + r, fold, share · 10⁶). ``classify``: every training side must hold
    two classes (the dense probe only stratifies by label).
    """
    plan = []
    for r in range(probe.repeats):
        if fixed is not None:
            folds = [fixed]
        else:
            try:
                fold_of = group_folds(labels, groups, probe.folds, seed + r)
            except ValueError as exc:
                raise DataError(f"probe.folds={probe.folds}: {exc}; lower probe.folds or add labelled items.") from None
            folds = [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(probe.folds)]
        for k, (train, test) in enumerate(folds):
            for f in fractions or probe.label_fractions:
                if classify and len(np.unique(labels[train])) < 2:
                    raise DataError(f"probe fold {k} (repeat {r}) trains on a single class; lower probe.folds or add labelled items.")
                sub = label_subset(train, labels, f, [seed + r, k, round(f * 1e6)])
                plan.append(Split(r, k, f, sub, test))
    return plan


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
def pool_features(model: Model, pool: Pool, size: int, cfg: ProbeConfig, fallback: Normalizer) -> dict[tuple[int, str], np.ndarray]:
    """(side, item id) -> feature vector over every side of the pool (items that fail to load are absent).

    Keyed by side too: two sets scanned from different roots can give the same relative ids.
    """
    out: dict[tuple[int, str], np.ndarray] = {}
    for side, (data, items) in enumerate(pool.sides):
        x, _, ids = _extract(
            model.model, SampleDataset(data, items, model.normalizer or fallback, image_size=size), cfg.batch_size, cfg.features
        )
        out.update(zip([(side, i) for i in ids], x, strict=True))
    return out


def build_models(cfg: RunConfig, adapter_paths: list[Path] | None) -> list[Model]:
    """The frozen backbone, then backbone + each package; all share the frozen weights and one normaliser policy."""
    backbone = create_backbone(cfg.backbone)
    trust = trust_of(cfg)
    packages = [load_package(p, trust) for p in adapter_paths or []]
    base = Normalizer.from_dict(packages[0].meta.normalizer) if packages and packages[0].meta.normalizer else None
    models = [Model("frozen backbone", AdaptedBackbone(backbone, None), base, 0)]
    for path, pkg in zip(adapter_paths or [], packages, strict=True):
        norm = Normalizer.from_dict(pkg.meta.normalizer) if pkg.meta.normalizer else base
        adapted = apply_package(pkg, backbone)
        trainable = sum(p.numel() for p in adapted.adapters.parameters()) if adapted.adapters is not None else 0
        models.append(Model(f"+ adapters ({Path(path).parent.name or Path(path).name})", adapted, norm, trainable))
    return models


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


def summarise(
    scored: dict[str, dict[tuple[str, float], dict[str, Any]]],
    metrics: dict[str, Any],
    units: np.ndarray,
    probe: ProbeConfig,
    seed: int,
) -> dict[str, list[ProbeResult]]:
    """ProbeResults per model; models after the first also get adapted − frozen with its bootstrap CI."""
    names = list(scored)
    out: dict[str, list[ProbeResult]] = {n: [] for n in names}
    for key, frozen in scored[names[0]].items():
        for metric, fn in metrics[key[0]].items():
            for name in names:
                entry = scored[name][key]
                seen = entry["counts"][..., -1].sum(0) > 0 if metric == "accuracy" else entry["seen"]
                scores = [s[metric] if isinstance(s, dict) else s for s in entry["scores"]]
                mean, std = mean_std(scores)
                row = ProbeResult(
                    name, key[0], key[1], metric, mean, std, len(scores), round(float(np.mean(entry["n_train"]))), int(seen.sum())
                )
                if name != names[0]:
                    d, lo, hi = paired_bootstrap(
                        entry["counts"][:, seen], frozen["counts"][:, seen], fn, units[seen], probe.bootstrap, seed, probe.confidence
                    )
                    row.delta, row.ci_low, row.ci_high, row.verdict = d, lo, hi, verdict(lo, hi) if probe.bootstrap else ""
                out[name].append(row)
    return out


def classification_results(cfg: RunConfig, models: list[Model]) -> tuple[dict[str, list[ProbeResult]], dict[str, tuple[int, int]]]:
    """Linear and kNN results per model, and each model's (n_train, n_test) at full labels."""
    pool = classification_pool(cfg)
    size = (cfg.probe.train or cfg.data).image_size
    items = pool.items
    fallback = fit_normalizer(pool.sides[0][0], pool.sides[0][1])
    feats = {m.name: pool_features(m, pool, size, cfg.probe, fallback) for m in models}
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


@torch.no_grad()
def token_maps(model: Model, data: ScannedData, items: list[ManifestItem], size: int, batch_size: int, fallback: Normalizer):
    """(patch-token maps B×D×h×w, masks B×H×W, item ids) for items that carry masks."""
    model.model.eval()
    maps, masks, ids = [], [], []
    for batch in DataLoader(
        SampleDataset(data, items, model.normalizer or fallback, image_size=size), batch_size=batch_size, collate_fn=collate
    ):
        if not batch["item_id"]:
            continue
        if "mask" not in batch:
            raise DataError(
                f"probe.dense.data under {data.manifest.root} gives no masks; use domain images with options.masks "
                "(a mask folder mirroring the images) or a video folder with images/ + masks/."
            )
        _, patches, (h, w) = model.model.forward_tokens(batch["image"])
        maps.append(patches.float().transpose(1, 2).reshape(len(patches), -1, h, w))
        masks.append(batch["mask"])
        ids += batch["item_id"]
    return torch.cat(maps), torch.cat(masks), ids


def dense_results(cfg: RunConfig, models: list[Model]) -> dict[str, list[ProbeResult]]:
    """The dense probe per model: mIoU and foreground Dice over the same folds, adapted − frozen with CIs."""
    dense = cfg.probe.dense
    data = ScannedData.scan(dense.data)
    sides = [(data, _grouped(data.manifest.items, cfg.probe))]
    if dense.test is not None:
        test = ScannedData.scan(dense.test)
        sides.append((test, test.manifest.items))
    fallback = fit_normalizer(data, data.manifest.items)
    per_model = {}
    for m in models:
        parts = [token_maps(m, d, items, dense.data.image_size, cfg.probe.batch_size, fallback) for d, items in sides]
        per_model[m.name] = parts
    by_key = {(side, i.item_id): i for side, (_, its) in enumerate(sides) for i in its}
    ids = [(side, i) for side, part in enumerate(per_model[models[0].name]) for i in part[2]]
    labels = np.array([by_key[k].label if by_key[k].label is not None else 0 for k in ids])
    groups = np.array([f"{k[0]}:{by_key[k].group}" for k in ids])
    n_first = len(per_model[models[0].name][0][2])
    fixed = (np.arange(n_first), np.arange(n_first, len(ids))) if dense.test is not None else None
    plan = evaluation_plan(labels, groups, cfg.probe, cfg.seed, fixed, fractions=[1.0], classify=False)
    scored = {}
    for m in models:
        maps = torch.cat([p[0] for p in per_model[m.name]])
        masks = torch.cat([p[1] for p in per_model[m.name]])
        scored[m.name] = score_dense(maps, masks, plan, dense, cfg.seed)
    metrics = {"dense": {"mIoU": miou_from_counts, "dice": fg_dice_from_counts}}
    return summarise(scored, metrics, groups, cfg.probe, cfg.seed)


def score_dense(
    maps: torch.Tensor, masks: torch.Tensor, plan: list[Split], dense: Any, seed: int
) -> dict[tuple[str, float], dict[str, Any]]:
    """Per-evaluation mIoU/Dice and per-repeat, per-image pixel counts (R × N × columns), for the dense probe."""
    counts = np.zeros((max(s.repeat for s in plan) + 1, len(masks), 3 * dense.num_classes + 3))
    entry: dict[str, Any] = {"scores": [], "counts": counts, "n_train": [], "seen": np.zeros(len(masks), dtype=bool)}
    for s in plan:
        train, test = torch.from_numpy(s.train), torch.from_numpy(s.test)
        pred = dense_linear_probe(
            maps[train], masks[train], maps[test], dense.num_classes, dense.steps, dense.lr, dense.ignore_index, seed + s.repeat
        )
        c = dense_counts(pred, masks[test], dense.num_classes, dense.ignore_index)
        total = c.sum(0)
        entry["scores"].append({"mIoU": float(miou_from_counts(total)), "dice": float(fg_dice_from_counts(total))})
        counts[s.repeat, s.test] += c
        entry["seen"][s.test] = True
        entry["n_train"].append(len(s.train))
    return {("dense", 1.0): entry}


def run_probe(cfg: RunConfig, adapter_paths: list[Path] | None = None) -> list[ProbeRow]:
    """Repeated linear-probe, kNN (and dense) evaluation of the frozen backbone and each adapter package."""
    L.seed_everything(cfg.seed, verbose=False)
    models = build_models(cfg, adapter_paths)
    results, sizes = classification_results(cfg, models)
    if cfg.probe.dense is not None:
        for name, rows in dense_results(cfg, models).items():
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
        delta = f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if r["delta"] is not None else "—"
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
