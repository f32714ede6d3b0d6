"""Report figures: the forest plot of every Δ vs frozen, embeddings in 2-D, few-shot curves, metric bars (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: plt.Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def embedding_plot(features: dict[str, np.ndarray], labels: np.ndarray, out: Path, seed: int = 0, names: list[str] | None = None) -> Path:
    """t-SNE of each model's features side by side, points coloured by label."""
    fig, axes = plt.subplots(1, len(features), figsize=(3.6 * len(features), 3.4), dpi=100, squeeze=False)
    for ax, (title, x) in zip(axes[0], features.items(), strict=True):
        xy = tsne_2d(x, seed)
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, label=names[c] if names and c < len(names) else str(c))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="best")
    return _save(fig, out)


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE; exact gradients below 500 points (Barnes-Hut was ~10x slower there on 2 CPU cores)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
    method = "exact" if len(x) <= 500 else "barnes_hut"
    return TSNE(2, perplexity=perplexity, random_state=seed, init="pca", max_iter=500, method=method).fit_transform(x)


def few_shot_plot(curves: dict[str, list[tuple[int, float, float]]], out: Path) -> Path:
    """Accuracy (± std over episodes) against shots per class, one line per model."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, points in curves.items():
        k, mean, std = (np.array(v) for v in zip(*points, strict=True))
        ax.errorbar(k, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("shots per class")
    ax.set_ylabel("prototype accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def metric_bars(rows: list[tuple[str, float, float]], metric: str, out: Path) -> Path:
    """One bar per model: mean ± std of ``metric`` over seeds."""
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    names = [r[0] for r in rows]
    ax.bar(range(len(rows)), [r[1] for r in rows], yerr=[r[2] for r in rows], capsize=4, color="#4878a8")
    ax.set_xticks(range(len(rows)), names, fontsize=8, rotation=10)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


HEALTH_PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("teacher entropy / ln K (per image; marginal)", ("health/teacher_entropy_ratio*", "health/teacher_marginal_entropy_ratio*")),
    ("student-teacher KL", ("health/student_teacher_kl*",)),
    ("effective rank (RankMe, fixed batch)", ("health/rankme",)),
    ("alignment / uniformity (fixed batch)", ("health/alignment", "health/uniformity")),
    ("gradient norm per adapted block", ("health/grad_norm/*",)),
    ("update norm per adapted block", ("health/update_norm/*",)),
]


def health_plot(run_dir: Path, out: Path, max_entropy_ratio: float | None = None) -> Path | None:
    """One panel per group of ``health/...`` metrics in the run's metrics.csv (a key ending in * is a prefix)."""
    from insitu.exports.report import logged_metrics, read_metric

    logged = logged_metrics(run_dir)
    # GLARE logs each term (_global, _local, _region) and repeats the first one unsuffixed: plot it once
    names = [n for n in logged if n.startswith("health/") and not any(f"{n}_{t}" in logged for t in ("global", "local", "region"))]
    panels = [
        (title, [n for n in names if any(n == k or (k.endswith("*") and n.startswith(k[:-1])) for k in keys)])
        for title, keys in HEALTH_PANELS
    ]
    panels = [(title, found) for title, found in panels if found]
    if not panels:
        return None
    fig, axes = plt.subplots((len(panels) + 1) // 2, 2, figsize=(9, 2.6 * ((len(panels) + 1) // 2)), dpi=100, squeeze=False)
    for ax, (title, found) in zip(axes.flat, panels, strict=False):
        for name in found:
            steps, values = read_metric(run_dir, name)
            ax.plot(steps, values, lw=1.3, label=name.removeprefix("health/"))
        if "norm per" in title:
            ax.set_yscale("symlog", linthresh=1e-4)
        if found[0].startswith("health/teacher_entropy_ratio"):
            ax.set_ylim(0, 1.05)
            if max_entropy_ratio is not None:
                ax.axhline(max_entropy_ratio, color="#c44", ls="--", lw=1, label="guard")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(found) > 1 or ax.get_legend_handles_labels()[0][1:]:
            ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return _save(fig, out)


FOREST_COLOURS = {"resolved gain": "#2a7f3f", "resolved loss": "#b83232"}  # anything else (CI spans 0, no CI): blue
BASELINE_COLOUR, UNRESOLVED_COLOUR, PRIMARY_BAND = "#8c8c8c", "#3b6ea5", "#fff1b8"


def forest_figure(rows: list) -> tuple[plt.Figure, plt.Axes] | None:
    """Every Δ vs frozen with its CI on one axis, one line per model × probe × labels × metric; None without a Δ.

    The primary endpoint gets a highlighted band, a diamond and a bold label; the label-free baseline
    (frozen + PCA whitening) is grey; a row without a CI is a bare point labelled "(no CI)".
    """
    from insitu.exports.verdict import PROBE_NAMES, compared, is_baseline, row_verdict

    shown = compared(rows)
    if not shown:
        return None
    order = {"linear": 0, "knn": 1, "dense": 2}
    # the baseline's row at the endpoint is marked primary too; only an adapted model's is the endpoint
    endpoint = [bool(r.get("primary")) and not is_baseline(r) for r in shown]
    ranked = sorted(
        zip(endpoint, shown, strict=True),
        key=lambda e: (not e[0], is_baseline(e[1]), e[1]["model"], order.get(e[1]["probe"], 3), -e[1]["labels"], e[1]["metric"]),
    )
    endpoint, shown = [e for e, _ in ranked], [r for _, r in ranked]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.36 * len(shown)), dpi=110)
    labels = []
    for y, (primary, r) in enumerate(ranked):
        low, high = r.get("ci_low"), r.get("ci_high")
        has_ci = low is not None and high is not None and low == low and high == high
        colour = BASELINE_COLOUR if is_baseline(r) else FOREST_COLOURS.get(row_verdict(r), UNRESOLVED_COLOUR)
        if primary:
            ax.axhspan(y - 0.45, y + 0.45, color=PRIMARY_BAND, zorder=0)
        xerr = [[r["delta"] - low], [high - r["delta"]]] if has_ci else None
        marker = "D" if primary else ("s" if is_baseline(r) else "o")
        bars = ax.errorbar([r["delta"]], [y], xerr=xerr, fmt=marker, color=colour, ms=7 if primary else 5, capsize=3, zorder=3)
        bars.lines[0].set_gid("forest-point")
        probe = f"{PROBE_NAMES.get(r['probe'], r['probe'])} {r['metric']}"
        text = (
            f"{r['model']}: {probe} @ {r['labels']:.0%}"
            + ("" if has_ci else " (no CI)")
            + (" [transductive]" if r.get("transductive") else "")
        )
        labels.append(("PRIMARY  " if primary else "") + text)
    ax.axvline(0, color="#222", lw=1, zorder=1)
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    for tick, primary, r in zip(ax.get_yticklabels(), endpoint, shown, strict=True):
        tick.set_fontweight("bold" if primary else "normal")
        tick.set_color(BASELINE_COLOUR if is_baseline(r) else "#222")
    ax.set_ylim(len(shown) - 0.5, -0.5)  # first row at the top
    ax.set_xlabel("Δ vs frozen backbone (95 % CI); right of 0: better than frozen")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Δ vs frozen, every probe row (95 % CI)", fontsize=9)
    fig.legend(handles=_forest_key(), fontsize=7, loc="lower center", ncol=5, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))  # room for the key below the axis
    return fig, ax


def _forest_key() -> list:
    from matplotlib.lines import Line2D

    def key(marker: str, colour: str, label: str) -> Line2D:
        return Line2D([], [], marker=marker, color=colour, ls="none", label=label)

    return [
        key("D", UNRESOLVED_COLOUR, "primary endpoint (band)"),
        key("o", FOREST_COLOURS["resolved gain"], "resolved gain"),
        key("o", FOREST_COLOURS["resolved loss"], "resolved loss"),
        key("o", UNRESOLVED_COLOUR, "not resolved (secondary rows: after Holm)"),
        key("s", BASELINE_COLOUR, "label-free baseline"),
    ]


def forest_plot(rows: list, out: Path) -> Path | None:
    """Write :func:`forest_figure` to ``out`` (PNG); None when no row has a Δ vs frozen."""
    drawn = forest_figure(rows)
    if drawn is None:
        return None
    drawn[0].savefig(out)  # laid out by forest_figure (the key sits below the axis)
    plt.close(drawn[0])
    return out
