"""The converging, class-weighted dense probe (issue 38): on rare, weak lesions it finds what 100 unweighted
steps miss, reports how it trained, is deterministic under its seed, and its report reaches the probe rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from insitu.config import DenseProbeConfig, load_config
from insitu.heads.metrics import dense_counts, fg_dice_from_counts
from insitu.pipelines.probe import run_probe, write_probe_outputs
from insitu.pipelines.probe_dense import class_weights, fit_dense_head, plateau_change
from tests.conftest import tiny_config
from tests.test_probe_stats import write_block_set


def rare_lesions(n: int, seed: int, fg: float = 0.1, shift: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Token maps n×16×8×8 whose first 4 channels shift by shift/2 on lesion tokens (10 % of them), masks 32×32."""
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(n, 8, 8, generator=g) < fg).long()
    x = torch.randn(n, 16, 8, 8, generator=g)
    x[:, :4] += m[:, None].float() * shift / 2
    return x, m.repeat_interleave(4, 1).repeat_interleave(4, 2)


def dice(pred: torch.Tensor, masks: torch.Tensor) -> float:
    return float(fg_dice_from_counts(dense_counts(pred, masks, 2, 255).sum(0)))


def test_the_converging_weighted_probe_finds_lesions_that_100_unweighted_steps_miss():
    (x_tr, m_tr), (x_te, m_te) = rare_lesions(32, 0), rare_lesions(16, 1)
    old, _ = fit_dense_head(x_tr, m_tr, x_te, 2, steps=100, lr=0.05, seed=0, tolerance=0, class_weight="none")  # the old fixed probe
    assert (old == 1).float().mean() < 0.005 and dice(old, m_te) < 0.01  # (nearly) all background
    dense = {k: DenseProbeConfig.model_fields[k].default for k in ("steps", "tolerance", "window", "class_weight", "lr")}
    assert dense["class_weight"] == "sqrt"
    pred, fit = fit_dense_head(x_tr, m_tr, x_te, 2, **dense, seed=0)
    assert fit.converged and fit.steps < dense["steps"] and fit.relative_change < dense["tolerance"]
    assert dice(pred, m_te) > 0.05 and (pred == 1).float().mean() > 0.02
    # the weights: 1/sqrt of the frequency, a lesion pixel counts ~3× a background pixel
    ratio = float((m_tr == 0).sum() / (m_tr == 1).sum()) ** 0.5
    assert fit.class_weights[1] / fit.class_weights[0] == pytest.approx(ratio, rel=1e-3)
    # full inverse frequency finds more of the lesion here (at the cost of background, see docs/evaluation.md)
    pred, fit = fit_dense_head(x_tr, m_tr, x_te, 2, **{**dense, "class_weight": "balanced"}, seed=0)
    assert fit.converged and dice(pred, m_te) > 0.15


def test_the_fit_is_deterministic_under_its_seed_and_the_cap_is_reported():
    (x_tr, m_tr), (x_te, _) = rare_lesions(16, 0), rare_lesions(8, 1)
    a, fit_a = fit_dense_head(x_tr, m_tr, x_te, 2, seed=3)
    b, fit_b = fit_dense_head(x_tr, m_tr, x_te, 2, seed=3)
    assert torch.equal(a, b) and fit_a == fit_b
    # tolerance 0: exactly `steps`, never "converged"; a cap below the plateau: not converged either
    _, fixed = fit_dense_head(x_tr, m_tr, x_te, 2, steps=30, tolerance=0.0, seed=3)
    assert fixed.steps == 30 and not fixed.converged
    _, capped = fit_dense_head(x_tr, m_tr, x_te, 2, steps=50, tolerance=1e-9, window=25, seed=3)
    assert capped.steps == 50 and not capped.converged and capped.relative_change is not None


def test_class_weights_by_hand():
    masks = torch.tensor([[[0, 0, 0, 1], [0, 0, 255, 255]]])  # 5 background, 1 lesion, 2 ignored
    assert class_weights(masks, 2, 255, "none").tolist() == [1.0, 1.0]
    assert class_weights(masks, 2, 255, "balanced").tolist() == pytest.approx([6 / (2 * 5), 6 / (2 * 1)])
    sqrt = class_weights(masks, 2, 255, "sqrt")
    assert float(sqrt[1] / sqrt[0]) == pytest.approx(5**0.5) and float(5 * sqrt[0] + sqrt[1]) == pytest.approx(6)
    assert class_weights(torch.zeros(1, 2, 2, dtype=torch.long), 3, 255, "balanced").tolist() == pytest.approx([1 / 3, 0, 0])
    assert plateau_change([2.0, 2.0, 1.0, 1.0], 2) == pytest.approx(0.5)


def test_the_probe_rows_and_probe_json_report_the_fit(tmp_path):
    images, masks = write_block_set(tmp_path / "blocks")
    data = {"domain": "images", "root": str(images), "image_size": 32, "options": {"channels": 3, "masks": str(masks)}}
    probe = {"folds": 2, "label_fractions": [1.0], "bootstrap": 0, "dense": {"data": data, "lr": 0.1}, "transductive": True}
    cfg = load_config(tiny_config(images, tmp_path / "runs", probe=probe))
    rows = run_probe(cfg)
    dense_rows = [r for r in rows[0].results if r.probe == "dense"]
    assert {r.metric for r in dense_rows} == {"mIoU", "dice"}
    fit = dense_rows[0].fit
    assert fit["class_weight"] == "sqrt" and fit["max_steps"] == 2000 and len(fit["steps"]) == 2
    assert fit["converged"] and fit["converged_evaluations"] == 2 and all(s < 2000 for s in fit["steps"])
    assert dense_rows[0].mean > 0.8
    write_probe_outputs(rows, tmp_path / "out", cfg)
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    dense_json = [r for row in saved["rows"] for r in row["results"] if r["probe"] == "dense"]
    assert dense_json and all(r["fit"]["converged"] is True and r["fit"]["steps"] == fit["steps"] for r in dense_json)


def test_a_fixed_split_fits_the_dense_head_once_however_many_repeats(tmp_path):
    images, masks = write_block_set(tmp_path / "blocks")
    data = {"domain": "images", "root": str(images), "image_size": 32, "options": {"channels": 3, "masks": str(masks)}}
    probe = {"folds": 2, "repeats": 3, "label_fractions": [1.0], "bootstrap": 0, "dense": {"data": data, "lr": 0.1, "test": data}}
    rows = run_probe(load_config(tiny_config(images, tmp_path / "runs", probe=probe)))
    dense = next(r for r in rows[0].results if r.probe == "dense")
    knn = next(r for r in rows[0].results if r.probe == "knn")
    assert len(dense.fit["steps"]) == 1 and np.asarray(dense.counts).shape[0] == 1  # one training side: one fit
    assert np.asarray(knn.counts).shape[0] == 3  # the folds still repeat
