"""The verdict a user reads, decided by the one pre-registered primary endpoint.

``probe.primary`` (e.g. ``knn@0.1``) is declared in the config before the run; the probe marks that
row ``primary: true`` for each adapted model. The verdict is that row's adapted − frozen CI alone;
every other row is secondary and reported by its Holm-adjusted verdict, so a run with six rows
cannot claim a gain because one of them resolved by chance. Result rows are dicts (``probe.json``)
or ``ProbeResult`` objects; fields a probe.json from before the primary endpoint lacks are read as
absent, and such a run falls back to describing every row, saying that no endpoint was declared.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from typing import Any

from insitu.heads.stats import GAIN, LOSS, format_delta, verdict

BASELINE = "frozen + PCA whitening"  # the label-free baseline row: frozen features, whitened on the probe's training images
PROBE_NAMES = {"linear": "linear", "knn": "kNN", "dense": "dense"}


def as_dict(row: Any) -> dict[str, Any]:
    """A result row (dict or dataclass) as a dict."""
    return asdict(row) if is_dataclass(row) else dict(row)


def compared(results: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows with a Δ vs frozen (adapted models and the label-free baseline), as dicts."""
    return [r for r in map(as_dict, results) if r.get("delta") is not None]


def adapted(results: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows of adapted models (a Δ vs frozen, not the label-free baseline)."""
    return [r for r in compared(results) if r.get("model") != BASELINE]


def is_baseline(row: dict[str, Any]) -> bool:
    return row.get("model") == BASELINE


def endpoint_name(row: dict[str, Any]) -> str:
    """'kNN accuracy (standardised features) at 10 % of the labels'."""
    features = f" ({row['knn_features']} features)" if row.get("knn_features") and row.get("probe") == "knn" else ""
    return f"{PROBE_NAMES.get(row['probe'], row['probe'])} {row['metric']}{features} at {row['labels']:.0%} of the labels"


def row_verdict(row: dict[str, Any]) -> str:
    """The row's own verdict; from its CI when the row carries none."""
    if row.get("verdict"):
        return row["verdict"]
    low, high = row.get("ci_low"), row.get("ci_high")
    return verdict(low, high) if low is not None and high is not None else "no CI"


def _frozen(results: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The reference model's rows by (probe, labels, metric): the first model without a Δ (other rows without
    one, e.g. a shortcut check on trivial image statistics, are not the reference)."""
    reference = next((r["model"] for r in results if r.get("delta") is None), None)
    return {(r["probe"], r["labels"], r["metric"]): r for r in results if r.get("delta") is None and r["model"] == reference}


def _means(row: dict[str, Any], frozen: dict[tuple, dict[str, Any]]) -> str:
    f = frozen.get((row["probe"], row["labels"], row["metric"]))
    before = f"frozen {f['mean']:.3f} ± {f['std']:.3f} → " if f else ""
    return f"{before}adapted {row['mean']:.3f} ± {row['std']:.3f}"


def primary_sentence(row: dict[str, Any], frozen: dict[tuple, dict[str, Any]]) -> str:
    """The primary endpoint in one sentence: Δ vs frozen [CI] and its verdict, then Δ vs the label-free baseline."""
    text = (
        f"**Primary endpoint (declared before the run): {endpoint_name(row)}**, {_means(row, frozen)}: adapted − frozen "
        f"{format_delta(row['delta'], row.get('ci_low'), row.get('ci_high'))}: **{row_verdict(row)}**."
    )
    if row.get("vs_baseline_delta") is not None:
        low, high = row.get("vs_baseline_ci_low"), row.get("vs_baseline_ci_high")
        resolved = verdict(low, high) if low is not None and high is not None else "no CI"
        text += f" Against {BASELINE} (no labels, no training): {format_delta(row['vs_baseline_delta'], low, high)}, {resolved}."
    if row.get("transductive"):
        text += " The test images were in the pretraining pool (transductive): the adapters saw them, without labels."
    return text


def secondary_sentence(rows: list[dict[str, Any]]) -> str:
    """'2 of 5 secondary rows resolve after Holm adjustment (2 gains, 0 losses).'"""
    if not rows:
        return "There are no secondary rows."
    gains = sum(row_verdict(r) == GAIN for r in rows)
    losses = sum(row_verdict(r) == LOSS for r in rows)
    holm = "after Holm adjustment" if any(r.get("p_adjusted") is not None for r in rows) else "(no adjusted p-values in these rows)"
    return (
        f"Secondary (exploratory, not the verdict): {gains + losses} of {len(rows)} secondary rows resolve {holm} "
        f"({gains} gain{'s' * (gains != 1)}, {losses} loss{'es' * (losses != 1)}); the probe table has each one."
    )


def meaning(primary: dict[str, Any]) -> str:
    """What the primary endpoint's verdict means, in words."""
    v = row_verdict(primary)
    if v == GAIN:
        return (
            "On the endpoint fixed before the run, the adapters, trained without a single label, made the frozen features "
            "better for this data."
        )
    if v == LOSS:
        return "On the endpoint fixed before the run, the adapters made the features worse for this task."
    why = "its CI includes zero" if primary.get("ci_low") is not None else "it has no CI (too few independent groups, or no bootstrap)"
    return (
        f"**On the endpoint fixed before the run, this run does not resolve a change**: {why}, so the probe cannot tell "
        "the adapted model from the frozen one here, whatever a secondary row shows."
    )


def verdict_text(results: Iterable[Any]) -> str:
    """The report's verdict paragraph (Markdown) from every result row of a probe, decided by the primary endpoint."""
    results = [as_dict(r) for r in results]
    rows = adapted(results)
    if not rows:
        return "No probe compared adapted and frozen features, so this run has no verdict."
    frozen = _frozen(results)
    primaries = [r for r in rows if r.get("primary")]
    if not primaries:
        return fallback_text(rows, frozen)
    parts, models = [], list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        own = [r for r in rows if r["model"] == model]
        primary = next((r for r in own if r.get("primary")), None)
        head = f"`{model}`: " if len(models) > 1 else ""
        if primary is None:
            parts.append(f"{head}no primary endpoint declared for this model; see the table below.")
            continue
        secondary = [r for r in own if r is not primary]
        parts.append(f"{head}{primary_sentence(primary, frozen)} {meaning(primary)}\n\n{secondary_sentence(secondary)}")
    return "\n\n".join(parts)


def fallback_text(rows: list[dict[str, Any]], frozen: dict[tuple, dict[str, Any]]) -> str:
    """Rows without a primary endpoint (an older probe.json): every row, unadjusted, as before the endpoint existed."""
    head = (
        f"**No primary endpoint declared** (`probe.primary` unset, or results from before it existed), so no single row "
        f"decides: {len(rows)} rows, each unadjusted for the others (about one in twenty resolves by chance)."
    )
    lines = [
        f"- {endpoint_name(r)} ({r['n_train']} images): {_means(r, frozen)}, "
        f"Δ {format_delta(r['delta'], r.get('ci_low'), r.get('ci_high'))}: {row_verdict(r)}."
        for r in rows
    ]
    gains = [r for r in rows if row_verdict(r) == GAIN]
    losses = [r for r in rows if row_verdict(r) == LOSS]
    if gains and not losses:
        tail = (
            "Adaptation helped where the CI excludes zero: the adapters, trained without a single label, made the frozen "
            "features better for this data."
        )
    elif losses and not gains:
        tail = "Adaptation hurt where the CI excludes zero: on this run the adapters made the features worse for this task."
    elif gains and losses:
        tail = "Adaptation helped some probes and hurt others (CIs excluding zero on both sides); read the table below."
    else:
        tail = (
            "**On this run, adaptation did not change the probes by more than they vary**: every CI includes zero. "
            "The probe cannot tell the adapted model from the frozen one here, so this run does not show a gain."
        )
    return head + "\n\n" + "\n".join(lines) + "\n\n" + tail
