"""The pretraining run report with its probe parts: the probe table and a t-SNE of frozen vs adapted features.

:mod:`insitu.exports.report_html` lays the report out; this module computes what needs the
pipelines (probe rows as a table, features for the embedding plot) and passes it in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from insitu.adapters import AdaptedBackbone
from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import RunConfig
from insitu.exports import report_html
from insitu.exports.plots import embedding_plot, forest_plot
from insitu.exports.report import markdown_table
from insitu.exports.verdict import verdict_text
from insitu.pipelines.preprocess import resolve_comparison
from insitu.pipelines.probe import PROBE_NOTE, extract_features, result_rows
from insitu.pipelines.probe import probe_table as probe_cells
from insitu.pipelines.probe_plan import probe_splits

log = logging.getLogger("insitu")


def write_pretrain_report(cfg: RunConfig, result: Any, probe_rows: list[Any] | None = None) -> Path:
    """Write ``report.md`` and ``report.html`` for a finished pretraining run; returns the HTML path.

    With probe rows, the report opens with the primary endpoint's verdict and the forest plot of every Δ.
    """
    section = probe_table(probe_rows) if probe_rows else None
    embedding = verdict = forest = None
    if probe_rows:
        results = result_rows(probe_rows)
        verdict = verdict_text(results)
        forest = forest_plot(results, Path(result.run_dir) / "forest_plot.png")
    if probe_rows and result.adapter_dir:
        embedding = probe_embeddings(cfg, result.adapter_dir, Path(result.run_dir) / "embedding.png")
    return report_html.write_pretrain_report(cfg, result, section, embedding, verdict, forest)


def probe_table(rows: list[Any]) -> str:
    """The repeated-probe table (mean ± std, adapted − frozen with its CI and verdict) plus parameter counts."""
    params = markdown_table(["features", "trainable params"], [[r.name, f"{r.trainable_params:,}"] for r in rows])
    return markdown_table(*probe_cells(rows)) + "\n\n" + PROBE_NOTE + "\n\n" + params


def probe_embeddings(cfg: RunConfig, adapter_dir: Path, out: Path, max_items: int = 300) -> Path | None:
    """t-SNE of frozen and adapted features on the probe test split; None when it cannot be drawn."""
    try:
        train, train_items, test, items = probe_splits(cfg)
        pkg = load_package(adapter_dir)
        backbone = create_backbone(cfg.backbone)
        step = max(1, len(items) // max_items)
        size = (cfg.probe.test or cfg.probe.train or cfg.data).image_size
        # the probe's rule: both rows see the package's normaliser, else one fitted on the probe's training items
        # (a package without one, e.g. a federated package, used to be plotted on unnormalised data)
        preps = resolve_comparison([None, pkg], train, train_items, size, cfg.backbone)
        feats, labels = {}, None
        models = (("frozen backbone", AdaptedBackbone(backbone, None)), ("+ adapters", apply_package(pkg, backbone)))
        for (name, model), prep in zip(models, preps, strict=True):
            dataset = prep.dataset(test, items[::step][:max_items])
            feats[name], labels = extract_features(model, dataset, cfg.probe.batch_size, cfg.probe.features)
        return embedding_plot(feats, labels, out, cfg.seed, test.manifest.class_names)
    except Exception as exc:  # noqa: BLE001 - a missing figure must not fail a finished training run
        log.warning("report: no embedding plot (%s: %s)", type(exc).__name__, exc)
        return None
