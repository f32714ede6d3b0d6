"""Compare the untouched backbone with adapter packages on the same labelled data, over seeds.

One table (metric mean ± std over seeds, trainable parameters), few-shot prototype curves and kNN
for classification, CSV/JSON results, and a self-contained ``report.html`` (+ ``report.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from insitu.backbones import create_backbone
from insitu.config import RunConfig, dump_config
from insitu.domains.overlays import overlay_mask, save_png, to_rgb_uint8
from insitu.exports.html import write_html_report
from insitu.exports.plots import embedding_plot, few_shot_plot, metric_bars
from insitu.exports.report import markdown_table, write_report
from insitu.heads import few_shot_accuracy, knn_accuracy
from insitu.heads.stats import seed_interval, verdict
from insitu.io import claim_folder, write_csv, write_json
from insitu.pipelines.downstream import MAIN_METRIC
from insitu.pipelines.finetune import FinetuneResult, build_model, downstream_of, encode, fit_and_score, model_name, prepare, summarize
from insitu.privacy import shown_weights


@dataclass
class EvalRow:
    """One model's results over all seeds."""

    name: str
    metrics: dict[str, tuple[float, float]]
    trainable_params: int
    n_train: int
    n_test: int
    seeds: list[FinetuneResult] = field(default_factory=list)
    knn: float | None = None
    few_shot: list[tuple[int, float, float]] = field(default_factory=list)
    # main metric, this row − the first row, paired by seed: (mean, t-interval low, high, verdict)
    delta: tuple[float, float, float, str] | None = None


def evaluate(cfg: RunConfig, adapters: list[Path] | None = None, out_dir: Path | None = None, overwrite: bool = False) -> list[EvalRow]:
    """Fine-tune and score the configured head for the frozen backbone and each adapter package."""
    ds = downstream_of(cfg)
    out_dir = Path(out_dir or cfg.run_dir / "evaluate")
    folder = claim_folder(out_dir, "evaluate", overwrite)
    rows, embeddings, samples = [], {}, {}
    backbone = create_backbone(cfg.backbone)  # frozen: one for every package and seed
    for adapter in [None, *(adapters or [])]:
        data = prepare(cfg, adapter)
        train, test = data.train, data.test
        # frozen features do not depend on the seed: encode the train split once per package
        cached = ds.mode == "head" and ds.augment == "none"
        cache = encode(build_model(cfg, adapter, data.k, backbone), train.images) if cached else None
        results, model = [], None
        for seed in ds.seeds:
            model, result, logits = fit_and_score(cfg, adapter, data, seed, cache, backbone)
            results.append(result)
        row = EvalRow(model_name(adapter), summarize(results), results[0].trainable_params, len(train.images), len(test.images), results)
        if ds.task == "classification":
            x_tr, x_te = encode(model, train.images).numpy(), encode(model, test.images).numpy()
            y_tr, y_te = train.targets.numpy(), test.targets.numpy()
            row.knn = knn_accuracy(x_tr, y_tr, x_te, y_te, cfg.probe.knn_k)
            row.few_shot = [(s, *few_shot_accuracy(x_tr, y_tr, x_te, y_te, s, seed=cfg.seed)) for s in ds.shots]
            embeddings[row.name] = (x_te, y_te, test.class_names)
        elif ds.task == "segmentation":
            samples[row.name] = (test.images[:4], test.targets[:4], logits[:4].argmax(1))
        if rows:
            row.delta = paired_delta(rows[0], row, MAIN_METRIC[ds.task])
        rows.append(row)
    write_results(rows, out_dir)
    write_evaluate_report(cfg, rows, embeddings, samples, out_dir)
    folder.record()
    return rows


def paired_delta(base: EvalRow, row: EvalRow, metric: str) -> tuple[float, float, float, str]:
    """``row`` − ``base`` on ``metric``, paired by seed, with the Student-t 95 % interval over seeds and its verdict."""
    ref = {r.seed: r.metrics[metric] for r in base.seeds}
    mean, low, high = seed_interval([r.metrics[metric] - ref[r.seed] for r in row.seeds if r.seed in ref])
    return mean, low, high, verdict(low, high) if low == low else "one seed: no interval"


def table_rows(rows: list[EvalRow]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the comparison table: metric mean ± std over seeds, Δ to the first row, params, sizes."""
    metrics = list(rows[0].metrics)
    headers = ["model", *metrics, "Δ vs first row [95 % CI]", "kNN acc", "trainable params", "train/test"]
    cells = []
    for r in rows:
        knn = f"{r.knn:.3f}" if r.knn is not None else "-"
        values = [f"{m:.3f} ± {s:.3f}" for m, s in (r.metrics[k] for k in metrics)]
        delta = "-" if r.delta is None else f"{r.delta[0]:+.3f} [{r.delta[1]:+.3f}, {r.delta[2]:+.3f}] {r.delta[3]}"
        cells.append([r.name, *values, delta, knn, f"{r.trainable_params:,}", f"{r.n_train}/{r.n_test}"])
    return headers, cells


def write_results(rows: list[EvalRow], out_dir: Path) -> None:
    """``evaluate.csv`` (one line per model and metric), ``evaluate.json`` (everything), ``fewshot.csv``."""
    lines = []
    for r in rows:
        lines += [
            [r.name, k, f"{m:.5f}", f"{sd:.5f}", len(r.seeds), r.trainable_params, r.n_train, r.n_test] for k, (m, sd) in r.metrics.items()
        ]
        if r.knn is not None:
            lines.append([r.name, "knn_accuracy", f"{r.knn:.5f}", "", 1, 0, r.n_train, r.n_test])
    write_csv(out_dir / "evaluate.csv", ["model", "metric", "mean", "std", "seeds", "trainable_params", "n_train", "n_test"], lines)
    if any(r.few_shot for r in rows):
        few = [[r.name, s, f"{m:.5f}", f"{sd:.5f}"] for r in rows for s, m, sd in r.few_shot]
        write_csv(out_dir / "fewshot.csv", ["model", "shots", "accuracy_mean", "accuracy_std"], few)
    payload = [{**asdict(r), "seeds": [{**asdict(s), "out_dir": None, "history": s.history[-1:]} for s in r.seeds]} for r in rows]
    write_json(out_dir / "evaluate.json", payload, default=str)


def _prediction_grid(samples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], out: Path) -> Path | None:
    """Rows: test images; columns: image + truth, then each model's prediction, as tinted overlays."""
    if not samples:
        return None
    names = list(samples)
    images, truth, _ = samples[names[0]]
    tiles = []
    for i in range(len(images)):
        rgb = to_rgb_uint8(images[i])
        row = [overlay_mask(rgb, truth[i].numpy())] + [overlay_mask(rgb, samples[n][2][i].numpy()) for n in names]
        tiles.append(np.concatenate(row, axis=1))
    return save_png(np.concatenate(tiles, axis=0), out)


def write_evaluate_report(
    cfg: RunConfig, rows: list[EvalRow], embeddings: dict[str, tuple], samples: dict[str, tuple], out_dir: Path
) -> Path:
    """``report.md`` + self-contained ``report.html`` with the table and figures."""
    ds = downstream_of(cfg)
    dump_config(cfg, out_dir / "config.yaml")
    headers, cells = table_rows(rows)
    main_metric = MAIN_METRIC[ds.task]
    figures = [
        ("main metric over seeds", metric_bars([(r.name, *r.metrics[main_metric]) for r in rows], main_metric, out_dir / "metric.png"))
    ]
    if embeddings:
        first = next(iter(embeddings.values()))
        feats = {n: e[0] for n, e in embeddings.items()}
        figures.append(
            ("t-SNE of test features, coloured by label", embedding_plot(feats, first[1], out_dir / "embedding.png", cfg.seed, first[2]))
        )
        figures.append(("few-shot prototype accuracy", few_shot_plot({r.name: r.few_shot for r in rows}, out_dir / "fewshot.png")))
    grid = _prediction_grid(samples, out_dir / "predictions.png")
    if grid is not None:
        figures.append(("test images: ground truth, then " + ", ".join(samples) + " (tinted overlays)", grid))
    sections = [
        (
            "What ran",
            f"Task `{ds.task}`, head `{ds.head.name}`, mode `{ds.mode}` ({'adapters + head' if ds.mode == 'adapters' else 'head only'}), "
            f"{ds.steps} steps, seeds {ds.seeds}. Features come from the backbone (never an SSL projection head). "
            f"Backbone `{cfg.backbone.name}` ({shown_weights(cfg.backbone.weights) if cfg.backbone.weights else 'random init: no pretrained base'}).",
        ),
        ("Results (mean ± std over seeds)", markdown_table(headers, cells)),
        ("Files", "`evaluate.csv`, `evaluate.json`, `fewshot.csv` (classification), `config.yaml`, figures as PNG."),
    ]
    write_report(out_dir, f"insitu evaluate: {cfg.name}", sections, None)
    return write_html_report(out_dir / "report.html", f"insitu evaluate: {cfg.name}", sections, figures)
