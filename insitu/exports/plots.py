"""Report figures: embeddings in 2-D, few-shot curves, metric bars (matplotlib, Agg backend)."""

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
