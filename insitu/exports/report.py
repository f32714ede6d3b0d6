"""Run reports: a Markdown page with the loss curve, data summary and probe table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metric(run_dir: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric from Lightning's CSV log."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    steps, values = [], []
    if not path.exists():
        return steps, values
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(name) not in (None, ""):
                steps.append(int(row["step"]))
                values.append(float(row[name]))
    return steps, values


def logged_metrics(run_dir: Path) -> list[str]:
    """The metric names (columns) of the run's Lightning CSV log; empty when there is none."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return [h for h in header if h not in ("epoch", "step")]


def plot_loss_curve(run_dir: Path, out: Path, metric: str = "train/loss") -> Path | None:
    """Plot a metric over steps to a PNG; None when nothing was logged."""
    steps, values = read_metric(run_dir, metric)
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(steps, values, lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    run_dir: Path, title: str, sections: list[tuple[str, str]], loss_png: Path | None, lead: tuple[str, Path | None] | None = None
) -> Path:
    """Write ``report.md`` in ``run_dir`` from (heading, markdown body) sections.

    ``lead`` (caption, PNG next to the report) is referenced right after the first section (the verdict).
    """
    parts = [f"# {title}", ""]
    for i, (heading, body) in enumerate(sections):
        parts += [f"## {heading}", "", body.strip(), ""]
        if i == 0 and lead is not None and lead[1] is not None:
            parts += [f"![{lead[0]}]({Path(lead[1]).name})", ""]
    if loss_png is not None:
        parts += ["## Loss curve", "", f"![loss curve]({Path(loss_png).name})", ""]
    out = Path(run_dir) / "report.md"
    out.write_text("\n".join(parts))
    return out
