"""The verdict is decided by the pre-registered primary endpoint alone; the forest plot draws every Δ vs frozen.

Result rows are built here with the fields the probe writes (``primary``, ``p_adjusted``, ``transductive``,
``vs_baseline_*``), so these tests do not depend on running a probe.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from insitu.exports.plots import forest_figure, forest_plot
from insitu.exports.verdict import BASELINE, verdict_text
from insitu.heads.stats import GAIN, LOSS, UNRESOLVED, verdict

FROZEN = "frozen backbone"


def row(model, probe="knn", labels=0.1, delta=None, low=None, high=None, primary=False, **extra):
    """One probe result row as probe.json writes it; the verdict follows the CI unless given."""
    v = extra.pop("verdict", verdict(low, high) if low is not None else ("" if delta is None else "no CI"))
    base = dict(model=model, probe=probe, labels=labels, metric="accuracy", mean=0.8, std=0.04, evaluations=5, n_train=16, n_test=160)
    return base | dict(delta=delta, ci_low=low, ci_high=high, verdict=v, primary=primary, **extra)


def probe_rows(primary_ci=(-0.01, 0.05), secondary_ci=(0.02, 0.06), transductive=False):
    """Frozen, the label-free baseline and one adapted model: kNN@10 % primary, linear@10 % and kNN@100 % secondary."""
    rows = []
    for probe, labels in (("knn", 0.1), ("linear", 0.1), ("knn", 1.0)):
        rows.append(row(FROZEN, probe, labels))
        primary = (probe, labels) == ("knn", 0.1)  # the probe marks the baseline's endpoint row too
        rows.append(row(BASELINE, probe, labels, 0.004, -0.01, 0.02, primary=primary, transductive=transductive))
    lo, hi = primary_ci
    rows.append(
        row("adapted", "knn", 0.1, (lo + hi) / 2, lo, hi, primary=True, p_value=0.2, transductive=transductive, knn_features="standardised")
        | dict(vs_baseline_delta=0.012, vs_baseline_ci_low=-0.004, vs_baseline_ci_high=0.029)
    )
    lo, hi = secondary_ci
    rows.append(row("adapted", "linear", 0.1, (lo + hi) / 2, lo, hi, p_value=0.004, p_adjusted=0.008, transductive=transductive))
    rows.append(row("adapted", "knn", 1.0, 0.001, -0.02, 0.02, p_value=0.9, p_adjusted=0.9, transductive=transductive))
    rows.append(row("trivial statistics", "knn", 0.1) | dict(mean=0.3, std=0.01))  # a shortcut check: no Δ, not the reference
    return rows


def test_primary_decides_even_when_a_secondary_row_resolves():
    text = verdict_text(probe_rows(primary_ci=(-0.01, 0.05), secondary_ci=(0.02, 0.06)))
    assert "Primary endpoint (declared before the run): kNN accuracy (standardised features) at 10% of the labels" in text
    assert f"frozen 0.800 ± 0.040 → adapted 0.800 ± 0.040: adapted − frozen +0.020 [-0.010, +0.050]: **{UNRESOLVED}**" in text
    assert "does not resolve a change" in text
    assert "helped" not in text.lower() and GAIN not in text.split("Secondary")[0]
    assert "1 of 2 secondary rows resolve after Holm adjustment (1 gain, 0 losses)" in text
    assert f"Against {BASELINE}" in text and "+0.012 [-0.004, +0.029], " + UNRESOLVED in text


@pytest.mark.parametrize(("ci", "words"), [((0.01, 0.05), GAIN), ((-0.05, -0.01), LOSS)])
def test_resolved_primary_is_the_verdict(ci, words):
    text = verdict_text(probe_rows(primary_ci=ci, secondary_ci=(-0.02, 0.02)))
    assert f"**{words}**" in text and "0 of 2 secondary rows resolve" in text


def test_transductive_rows_are_labelled():
    assert "transductive" not in verdict_text(probe_rows())
    text = verdict_text(probe_rows(transductive=True))
    assert "test images were in the pretraining pool (transductive)" in text


def test_no_primary_falls_back_and_says_so():
    rows = [{k: v for k, v in r.items() if k != "primary"} for r in probe_rows(primary_ci=(0.01, 0.05))]
    text = verdict_text(rows)
    assert "No primary endpoint declared" in text and "Primary endpoint (declared" not in text
    assert len(re.findall(r"^- ", text, re.M)) == 3  # every adapted row, the baseline left out
    assert "Adaptation helped" in text  # two rows resolve a gain, none a loss


def test_no_comparison_has_no_verdict():
    assert "no verdict" in verdict_text([row(FROZEN)])


def test_forest_plot_one_marker_per_row(tmp_path):
    rows = probe_rows()
    rows.append(row("adapted", "linear", 1.0, 0.003))  # no CI: drawn as a bare point
    out = forest_plot(rows, tmp_path / "forest.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    fig, ax = forest_figure(rows)
    points = [line for line in ax.get_lines() if line.get_gid() == "forest-point"]
    compared = [r for r in rows if r["delta"] is not None]
    assert len(points) == len(compared) == 7 and all(len(p.get_xdata()) == 1 for p in points)
    assert sorted(float(p.get_xdata()[0]) for p in points) == pytest.approx(sorted(r["delta"] for r in compared))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0].startswith("PRIMARY") and sum(label.startswith("PRIMARY") for label in labels) == 1
    assert [t.get_fontweight() for t in ax.get_yticklabels()].count("bold") == 1
    assert sum("(no CI)" in label for label in labels) == 1
    assert sum(label.startswith(BASELINE) for label in labels) == 3
    assert any(line.get_xdata()[0] == 0 for line in ax.get_lines() if line.get_gid() != "forest-point")  # the line at 0


def test_forest_plot_without_a_comparison_draws_nothing(tmp_path):
    assert forest_plot([row(FROZEN)], tmp_path / "f.png") is None and not (tmp_path / "f.png").exists()
