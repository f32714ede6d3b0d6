"""The probe's evidence rules against hand computations: standardised kNN, PCA whitening, the two-way
bootstrap, bootstrap p-values, Holm, MIN_UNITS per class, and the primary endpoint deciding the verdict."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from insitu.config import ProbeConfig, load_config
from insitu.errors import ConfigError
from insitu.heads.probe import knn_predict, pca_whiten
from insitu.heads.stats import (
    GAIN,
    HOLM_UNRESOLVED,
    UNRESOLVED,
    accuracy_from_counts,
    bootstrap_differences,
    bootstrap_p_value,
    holm,
    paired_bootstrap,
    two_way_bootstrap,
)
from insitu.pipelines.probe import ProbeRow, primary_result, primary_summary
from insitu.pipelines.probe_plan import BASELINE, ProbeResult, decide_verdicts
from tests.conftest import tiny_config

RIGHT, WRONG = [1.0, 1.0], [0.0, 1.0]  # (correct, seen) of one item


def test_standardised_knn_against_a_hand_computation():
    # dim 0 is large and offset (~100), dim 1 small: the raw cosine is an angle that the ratio dim1/dim0 decides
    x_train = np.array([[100.0, 0.0], [104.0, 0.4], [100.0, 2.0], [104.0, 2.4]])
    y_train = np.array([0, 1, 0, 1])  # the class is which side of dim 0's mean an item lies on
    x_test = np.array([[103.0, 0.1], [101.0, 2.3]])
    # raw, k = 1: ratios are 0, 0.00385, 0.02, 0.02308 for the train points and 0.00097, 0.02277 for the test points,
    # so the nearest angles are train 0 (class 0) and train 3 (class 1)
    assert knn_predict(x_train, y_train, x_test, k=1, standardise=False).tolist() == [0, 1]
    # standardised with the training mean (102, 1.2) and std (2, sqrt(1.04)): train (-1, -1.18), (1, -0.78),
    # (-1, 0.78), (1, 1.18); test (0.5, -1.08) is nearest train 1 (class 1), test (-0.5, 1.08) nearest train 2 (class 0)
    mean, std = np.array([102.0, 1.2]), np.array([2.0, np.sqrt(1.04)]) + 1e-6
    tr, te = (x_train - mean) / std, (x_test - mean) / std
    cos = (te / np.linalg.norm(te, axis=1, keepdims=True)) @ (tr / np.linalg.norm(tr, axis=1, keepdims=True)).T
    assert cos.argmax(1).tolist() == [1, 2]
    assert knn_predict(x_train, y_train, x_test, k=1, standardise=True).tolist() == [1, 0]


def test_pca_whitening_matches_sklearn_and_whitens_the_training_side():
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(30, 6)) * np.arange(1, 7) + 5, rng.normal(size=(4, 6))
    tr, te = pca_whiten(x_train, x_test)
    ref = PCA(whiten=True, n_components=6).fit(x_train)
    np.testing.assert_allclose(np.abs(tr), np.abs(ref.transform(x_train)), atol=1e-4)  # equal up to each axis's sign
    np.testing.assert_allclose(np.abs(te), np.abs(ref.transform(x_test)), atol=1e-4)
    np.testing.assert_allclose(np.cov(tr.T), np.eye(6), atol=1e-4)
    tr, te = pca_whiten(x_train[:4], x_test)  # few labels: n_train − 1 components
    assert tr.shape == (4, 3) and te.shape == (4, 3)


def test_two_way_bootstrap_reproduces_a_hand_resampling():
    # 5 units of 2 items, 2 training seeds; the frozen model (one run) is N × C
    units = np.repeat(np.arange(5), 2)
    rng = np.random.default_rng(7)
    adapted = np.stack([np.column_stack([rng.integers(0, 2, 10), np.ones(10)]) for _ in range(2)]).astype(float)
    frozen = np.column_stack([rng.integers(0, 2, 10), np.ones(10)]).astype(float)
    delta, lo, hi = two_way_bootstrap(adapted, frozen, accuracy_from_counts, units, n_boot=50, seed=3)
    assert delta == pytest.approx(adapted[..., 0].mean() - frozen[:, 0].mean())
    # by hand: unit weights (shared by both seeds and both models) then seed weights, as numpy draws them
    draw = np.random.default_rng(3)
    w, v = draw.multinomial(5, [0.2] * 5, size=50), draw.multinomial(2, [0.5, 0.5], size=50)
    diffs = []
    for b in range(50):
        a = sum(v[b, s] * w[b, units[i]] * adapted[s, i] for s in range(2) for i in range(10))
        f = sum(v[b, s] * w[b, units[i]] * frozen[i] for s in range(2) for i in range(10))
        diffs.append(a[0] / a[1] - f[0] / f[1])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert bootstrap_differences(adapted, np.stack([frozen, frozen]), accuracy_from_counts, units, 50, 3)[1] == pytest.approx(diffs)


def test_two_way_bootstrap_lets_the_seed_spread_into_the_interval():
    n = 20
    gain, loss = np.array([RIGHT] * n), np.array([WRONG] * n)
    # both seeds gain on every item: CI [1, 1]
    assert two_way_bootstrap(np.stack([gain, gain]), loss, accuracy_from_counts, n_boot=200) == (1.0, 1.0, 1.0)
    # seed 0 gains on every item, seed 1 loses on every item: items alone would say [0, 0]; seeds give [-1, 1]
    d, lo, hi = two_way_bootstrap(np.stack([gain, loss]), np.stack([loss, gain]), accuracy_from_counts, n_boot=400)
    assert d == 0.0 and (lo, hi) == (-1.0, 1.0)
    with pytest.raises(ValueError, match="S × N × C"):
        two_way_bootstrap(gain, loss, accuracy_from_counts)


def test_bootstrap_p_value_and_holm_by_hand():
    # B = 9 differences, 2 of them <= 0: p = 2 · (1 + 2) / 10 = 0.6; all positive: 2 · 1 / 10 = 0.2
    assert bootstrap_p_value(np.array([-0.1, 0.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.6)
    assert bootstrap_p_value(np.full(9, 0.5)) == pytest.approx(0.2)
    assert bootstrap_p_value(np.zeros(9)) == 1.0 and np.isnan(bootstrap_p_value(None))
    # Holm: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> raised to 0.06 (monotone)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # 0.5 · 2 = 1; then monotone: max(1, 0.9 · 1) = 1
    np.testing.assert_allclose(holm([0.2, 0.01]), [0.2, 0.02])
    assert len(holm([])) == 0


def test_min_units_counts_groups_per_class():
    # class 0: 10 items in 10 groups; class 1: 9 items resting on 3 groups. 13 groups in all, but class 1 has 3
    classes = np.array([0] * 10 + [1] * 9)
    units = np.concatenate([np.arange(10), 10 + np.arange(9) // 3])
    adapted, frozen = np.array([RIGHT] * 19), np.array([WRONG] * 19)
    d, lo, hi = paired_bootstrap(adapted, frozen, accuracy_from_counts, units, n_boot=100, classes=classes)
    assert d == 1.0 and np.isnan(lo) and np.isnan(hi)
    assert paired_bootstrap(adapted, frozen, accuracy_from_counts, units, n_boot=100) == (1.0, 1.0, 1.0)  # no classes: 13 units
    d, lo, hi = two_way_bootstrap(adapted[None], frozen, accuracy_from_counts, units, n_boot=100, classes=classes)
    assert np.isnan(lo) and np.isnan(hi)
    units[10:] = 10 + np.arange(9) // 2  # class 1 now on 5 groups: a CI again
    assert paired_bootstrap(adapted, frozen, accuracy_from_counts, units, n_boot=100, classes=classes) == (1.0, 1.0, 1.0)


def _result(model, probe, labels, delta=None, ci=(None, None), p=None, **extra):
    return ProbeResult(model, probe, labels, "accuracy", 0.8, 0.02, 5, 40, 200, delta, *ci, p_value=p, **extra)


def test_the_primary_endpoint_decides_even_when_a_secondary_row_resolves():
    probe = ProbeConfig(primary="knn@0.1")
    keys = [("knn", 0.1), ("linear", 1.0), ("knn", 1.0)]
    results = {
        "frozen backbone": [_result("frozen backbone", *k) for k in keys],
        "+ adapters (a)": [
            _result("+ adapters (a)", "knn", 0.1, 0.02, (-0.01, 0.05), 0.2, vs_baseline_delta=0.01, vs_baseline_ci_low=-0.02, vs_baseline_ci_high=0.04),
            _result("+ adapters (a)", "linear", 1.0, 0.04, (0.02, 0.06), 0.002),  # resolves, even after Holm
            _result("+ adapters (a)", "knn", 1.0, 0.03, (0.001, 0.06), 0.04),  # CI above 0 too
        ],
        BASELINE: [_result(BASELINE, *k, 0.0, (-0.02, 0.02), 0.9) for k in keys],
    }
    decide_verdicts(results, probe)
    primary, lin, knn_full = results["+ adapters (a)"]
    assert primary.primary and not lin.primary and not knn_full.primary
    assert primary.verdict == UNRESOLVED and primary.p_adjusted == 0.2
    # Holm over the two secondary rows: 0.002 · 2 = 0.004, max(0.004, 0.04 · 1) = 0.04 -> both < 0.05
    assert (lin.p_adjusted, knn_full.p_adjusted) == pytest.approx((0.004, 0.04)) and lin.verdict == knn_full.verdict == GAIN
    assert not any(r.primary for r in results["frozen backbone"]) and results[BASELINE][0].primary
    rows = [ProbeRow(name, 0.8, 0.8, 0, 40, 200, results=rs) for name, rs in results.items()]
    assert primary_result(rows) is primary
    (line,) = primary_summary(rows)
    assert line.startswith("primary endpoint knn@0.1:accuracy, + adapters (a): +0.020 [-0.010, +0.050] not resolved (CI spans 0)")
    assert f"vs {BASELINE}: +0.010 [-0.020, +0.040]" in line and GAIN not in line
    # a secondary p that Holm lifts over 1 − confidence is not resolved, whatever its own CI says
    knn_full.p_value = 0.03
    lin.p_value = 0.04
    decide_verdicts(results, probe)
    assert knn_full.p_adjusted == pytest.approx(0.06) and knn_full.verdict == HOLM_UNRESOLVED == lin.verdict


def test_primary_is_validated_at_config_time(tmp_path):
    for bad, words in (("knn@0.5", "labels must be one of"), ("svm@1.0", "linear, knn or dense"), ("dense@1.0", "needs probe.dense")):
        with pytest.raises(ConfigError, match="probe.primary") as err:
            load_config(tiny_config(tmp_path, tmp_path / "runs", probe={"primary": bad}))
        assert words in str(err.value)
    assert ProbeConfig().primary_name() == "linear@1.0:accuracy"
    assert ProbeConfig(primary="knn@0.1", label_fractions=[1.0, 0.1]).primary_endpoint() == ("knn", 0.1, "accuracy")
