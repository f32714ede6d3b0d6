"""The pretraining run report: ``report.md`` + self-contained ``report.html`` in the run folder.

Config, data summary (items used, quarantined with reasons), loss and collapse curves, probe table
before/after, a t-SNE of frozen vs adapted features coloured by label, adapter size and parameters.
The probe parts are computed by :mod:`insitu.pipelines.report` and passed in: exports never import
the pipelines.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from insitu.config import RunConfig
from insitu.exports.html import write_html_report
from insitu.exports.plots import health_plot
from insitu.exports.report import markdown_table, plot_loss_curve, write_report
from insitu.privacy import DATA_ROOT, redact_config, shown_weights


def quarantine_summary(run_dir: Path) -> str:
    """Counts of quarantined files per reason, from the run's ``manifest/quarantine.csv``."""
    path = Path(run_dir) / "manifest" / "quarantine.csv"
    if not path.is_file():
        return "No quarantine list was written."
    with open(path, newline="") as f:
        reasons = Counter(row.get("reason", "?") for row in csv.DictReader(f))
    if not reasons:
        return "Nothing was quarantined."
    return markdown_table(["reason", "files"], sorted(reasons.items(), key=lambda kv: -kv[1]))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))


def health_section(health: dict[str, Any]) -> str:
    """The ``health`` entry of summary.json as a table, with what each metric means."""
    rows = [
        [f"`{name}`", _fmt(v.get("first")), _fmt(v.get("last")), _fmt(v.get("min")), _fmt(v.get("max"))]
        for name, v in health.items()
        if isinstance(v, dict)
    ]
    text = (
        "Label-free signs of learning. `teacher_entropy_ratio` is the teacher's entropy over ln K: near 1 the "
        "targets are uniform and nothing is learned. `student_teacher_kl`: how far the student is from the "
        "targets. `rankme`: effective rank of the features on a fixed batch (falls on collapse). "
        "`alignment` (lower: views of one image agree) and `uniformity` (lower: images spread on the sphere), "
        "Wang & Isola. `grad_norm`/`update_norm` per adapted block: which blocks learn."
    )
    alerts = health.get("alerts") or []
    guard = f"Collapse guard: `{health.get('guard')}`; " + (f"{len(alerts)} alert(s):" if alerts else "no alert.")
    parts = [text, markdown_table(["metric", "first", "last", "min", "max"], rows) if rows else "", guard]
    parts.append("\n".join(f"- {a}" for a in alerts))
    return "\n\n".join(p for p in parts if p)


FOREST_CAPTION = "Δ vs frozen for every probe row, 95 % CI (the primary endpoint highlighted; grey: label-free baseline)"


def write_pretrain_report(
    cfg: RunConfig,
    result: Any,
    probe_section: str | None = None,
    embedding_png: Path | None = None,
    verdict: str | None = None,
    forest_png: Path | None = None,
) -> Path:
    """Write ``report.md`` and ``report.html`` for a finished pretraining run; returns the HTML path.

    ``probe_section`` (the probe table as Markdown), ``embedding_png`` (a t-SNE figure), ``verdict``
    (the primary endpoint's paragraph) and ``forest_png`` (every Δ vs frozen) are made by the caller
    (:func:`insitu.pipelines.report.write_pretrain_report`), which knows the probe. The verdict and
    the forest plot open the report.
    """
    run_dir = Path(result.run_dir)
    sections, figures = _training_sections(cfg, result, run_dir)
    if verdict:
        sections.insert(0, ("Verdict", verdict))
    if probe_section:
        sections.append(("Probe before/after (frozen features)", probe_section))
        if embedding_png is not None:
            figures.append(("t-SNE of probe test features, coloured by label", embedding_png))
    sections.append(("Config", "```\n" + yaml.safe_dump(redact_config(cfg.model_dump(mode="json")), sort_keys=False) + "```"))
    title = f"insitu pretrain: {cfg.name}"
    lead = (FOREST_CAPTION, forest_png) if verdict and forest_png is not None else None
    write_report(run_dir, title, sections, figures[0][1], lead)
    return write_html_report(run_dir / "report.html", title, sections, [f for f in figures if f[1] is not None], lead)


def _training_sections(cfg: RunConfig, result: Any, run_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, Path | None]]]:
    s = result.summary
    adapter_bytes = (Path(result.adapter_dir) / "adapter.safetensors").stat().st_size if result.adapter_dir else 0
    loss_png = plot_loss_curve(run_dir, run_dir / "loss.png")
    collapse_png = plot_loss_curve(run_dir, run_dir / "collapse.png", metric="train/collapse_std")
    sections = [
        (
            "Training",
            f"Objective `{cfg.objective.name}`, adapters `{cfg.adapter.name}` on `{cfg.backbone.name}` "
            f"({shown_weights(cfg.backbone.weights)}). {s.get('steps')} steps, "
            f"final loss {s.get('final_loss')}, {s.get('wall_s')} s on {s.get('device')}.",
        ),
        (
            "Adapter",
            f"{s.get('trainable_params', 0):,} trainable vs {s.get('frozen_params', 0):,} frozen parameters; "
            f"`adapter.safetensors` is {adapter_bytes / 1024:.1f} KiB.",
        ),
        ("Data", f"{s.get('items')} items used from `{DATA_ROOT}` (domain `{cfg.data.domain}`), {s.get('quarantined')} quarantined."),
        ("Quarantined files by reason", quarantine_summary(run_dir)),
        ("Collapse metric", "`train/collapse_std`: per-dimension std of normalised features × √D, about 1 when spread, 0 on collapse."),
    ]
    figures = [("pretraining loss", loss_png), ("collapse metric", collapse_png)]
    health = s.get("health")
    if health:
        if health.get("alerts"):  # loud: right after the training line
            stopped = " The run was stopped (health.guard=stop)." if health.get("stopped_by_guard") else ""
            sections.insert(1, ("WARNING: collapse guard fired", "\n".join(f"- **{a}**" for a in health["alerts"]) + stopped))
        sections.append(("Training health", health_section(health)))
        figures.append(("training health metrics", health_plot(run_dir, run_dir / "health.png", cfg.health.max_entropy_ratio)))
    return sections, figures
