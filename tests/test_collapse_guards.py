"""One guard per collapse (issue 38): each fires on a constructed collapsed run and stays quiet on a healthy one."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from insitu.config import load_config
from insitu.objectives.dino import DistillLoss
from insitu.objectives.health import embedding_spread, rankme
from insitu.pipelines.health import CollapseGuard, HealthMonitor, RankSet

D = 64


def common_plus(n: int, r: int, g: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
    """n features: a strong common vector (as a frozen base's CLS) plus variation in the first r of ``basis``'s directions."""
    common = 6 * basis[:, -1]
    return common + torch.randn(n, r, generator=g) @ basis[:, :r].T / math.sqrt(r)


# ---- the metrics ------------------------------------------------------------------------------


def test_embedding_spread_against_a_loop():
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    z = x / x.norm(dim=1, keepdim=True)
    want = sum(math.sqrt(sum((float(z[i, d]) - float(z[:, d].mean())) ** 2 for i in range(10)) / 10) for d in range(6)) / 6
    assert float(embedding_spread(x)) == pytest.approx(want, rel=1e-5)
    assert float(embedding_spread(torch.ones(10, 6) * 3)) == pytest.approx(0.0, abs=1e-6)  # one point: no spread
    iso = float(embedding_spread(torch.randn(4096, 64)))
    assert iso == pytest.approx(1 / 8, rel=0.05)  # isotropic rows: about 1/sqrt(D)
    assert float(embedding_spread(torch.randn(3, 5, 8))) > 0  # leading axes are rows


def test_centred_rankme_sees_what_the_common_direction_hides():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    healthy, collapsed = common_plus(256, 48, g, basis), common_plus(256, 16, g, basis)  # 48 -> 16 used directions
    old = [float(rankme(x[:32])) for x in (healthy, collapsed)]  # the old measure: uncentred, 32 items
    new = [float(rankme(x, centre=True)) for x in (healthy, collapsed)]
    assert old[0] < 12 and old[1] > 0.5 * old[0]  # capped by the common direction; the drop stays under a 50 % alarm
    assert new[0] > 40 and new[1] < 0.4 * new[0]  # centred, 256 items: about 48 -> 16
    assert float(rankme(healthy[:32], centre=True)) < 32  # 32 items cap it below the 48 directions in use


# ---- each guard on a constructed collapsed run and a healthy one -------------------------------


def test_marginal_guard_fires_on_one_prototype_collapse():
    torch.manual_seed(0)
    collapsed_loss, healthy_loss = DistillLoss(256, 0.1, 0.9), DistillLoss(256, 0.1, 0.9)
    guard, healthy = CollapseGuard(window=5), CollapseGuard(window=5)
    alerts = []
    for step in range(12):
        one = torch.zeros(32, 256)
        one[:, 7] = 10.0  # every image's teacher output points at prototype 7: sharp, and all alike
        collapsed_loss([one, one], [torch.randn(32, 256)] * 2, teacher_temp=0.04)
        h = collapsed_loss.health
        assert float(h["teacher_entropy_ratio"]) < 0.05  # the uniform-target sign cannot see this
        alerts += guard.observe(
            step, entropy_ratio=float(h["teacher_entropy_ratio"]), marginal_ratio=float(h["teacher_marginal_entropy_ratio"])
        )
        spread = torch.randn(32, 256) * 5
        healthy_loss([spread, spread + 0.1 * torch.randn(32, 256)], [torch.randn(32, 256)] * 2, teacher_temp=0.04)
        h = healthy_loss.health
        assert not healthy.observe(
            step, entropy_ratio=float(h["teacher_entropy_ratio"]), marginal_ratio=float(h["teacher_marginal_entropy_ratio"])
        )
    assert len(alerts) == 1 and "batch-mean teacher target" in alerts[0] and "centering: sinkhorn" in alerts[0]
    assert not healthy.alerts


def test_rank_guard_fires_on_dimensional_collapse_relative_to_its_start():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    dims = [48, 48, 40, 30, 20, 14, 12, 12, 12, 12]  # a run losing directions
    guard, healthy = CollapseGuard(window=2), CollapseGuard(window=2)
    alerts = []
    for step, r in enumerate(dims):
        alerts += guard.observe(step, rank=float(rankme(common_plus(256, r, g, basis), centre=True)))
        assert not healthy.observe(step, rank=float(rankme(common_plus(256, 48, g, basis), centre=True)))
    assert len(alerts) == 1 and "centred RankMe" in alerts[0]


def test_spread_guard_fires_on_head_collapse_relative_to_its_start():
    g = torch.Generator().manual_seed(2)
    centre = torch.randn(32, generator=g)
    guard, healthy = CollapseGuard(window=3), CollapseGuard(window=3)
    alerts = []
    for step in range(12):
        shrink = max(0.05, 1 - step / 6)  # the head's outputs pull together onto one point
        collapsed = centre + shrink * torch.randn(64, 32, generator=g)
        alerts += guard.observe(step, spread=float(embedding_spread(collapsed)))
        assert not healthy.observe(step, spread=float(embedding_spread(centre + torch.randn(64, 32, generator=g))))
    assert len(alerts) == 1 and "embedding_spread" in alerts[0] and "train.lr" in alerts[0]
    assert guard.spread0 == pytest.approx(healthy.spread0, rel=0.1)  # both start spread; only one falls


def test_guard_state_round_trips_and_reads_old_checkpoints():
    guard = CollapseGuard(window=3)
    guard.observe(0, rank=20.0, spread=0.1, marginal_ratio=0.05)
    restored = CollapseGuard(window=3)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict() and restored.spread0 == 0.1 and restored.since["marginal"] == 0
    old = {"rank0": 7.0, "since": {"entropy": None, "rank": 3}, "alerts": [], "fired": []}  # before the marginal and spread signs
    restored.load_state_dict(old)
    assert restored.spread0 is None and restored.since == {"entropy": None, "marginal": None, "rank": 3, "spread": None}


# ---- the monitor: fixed rank set, and the guards fed from the objective's health ----------------


def test_rank_set_collects_distinct_items_once():
    rank_set = RankSet(10)
    for start in (0, 4, 4, 8):  # the third batch repeats the second's items
        ids = [f"i{start + n}" for n in range(4)]
        rank_set.add({"views": [torch.full((4, 1, 8, 8), float(start)), torch.zeros(4, 1, 8, 8)], "item_id": ids})
    assert len(rank_set) == 10 and rank_set.complete and len(rank_set.ids) == 10
    before = rank_set.tensor().clone()
    rank_set.add({"views": [torch.randn(4, 1, 8, 8)] * 2, "item_id": ["x", "y", "z", "w"]})
    assert torch.equal(rank_set.tensor(), before)  # complete: fixed from now on
    assert sorted({float(v) for v in before[:, 0, 0, 0]}) == [0.0, 4.0, 8.0]


class FakeModule:
    """What the monitor reads from a PretrainModule: the objective's health of the last step, and ``log``."""

    def __init__(self) -> None:
        self.last_health: dict[str, torch.Tensor] = {}
        self.logged: list[str] = []

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged.append(name)


def run_monitor(series: list[dict[str, float]], **health) -> HealthMonitor:
    cfg = load_config({"data": {"root": "."}, "health": {"window": 3, **health}}, check_paths=False).health
    monitor = HealthMonitor(cfg, max_steps=len(series))
    module = FakeModule()
    for step, values in enumerate(series):
        trainer = SimpleNamespace(global_step=step, log_every_n_steps=1, should_stop=False)
        module.last_health = {k: torch.tensor(v) for k, v in values.items()}
        monitor.on_train_batch_end(trainer, module, {"loss": 1.0}, None, step)
    return monitor


def test_monitor_feeds_marginal_and_spread_to_the_guard():
    steps = 12
    healthy = [{"health/teacher_entropy_ratio": 0.3, "health/teacher_marginal_entropy_ratio": 0.6, "health/embedding_spread": 0.1}] * steps
    assert run_monitor(healthy).summary()["alerts"] == []
    collapsing = [
        {
            "health/teacher_entropy_ratio": 0.3,
            "health/teacher_marginal_entropy_ratio": 0.6 if s < 3 else 0.02,
            "health/embedding_spread": 0.1 * max(0.1, 1 - s / 4),
        }
        for s in range(steps)
    ]
    alerts = run_monitor(collapsing).summary()["alerts"]
    assert len(alerts) == 2 and any("batch-mean" in a for a in alerts) and any("embedding_spread" in a for a in alerts)
    assert run_monitor(collapsing, guard="off").summary()["alerts"] == []
    quiet = run_monitor(collapsing, min_marginal_entropy_ratio=0.0, min_spread_fraction=0.0)  # thresholds are the config's
    assert quiet.summary()["alerts"] == []


def test_tiny_run_measures_rank_on_a_growing_then_fixed_set(tmp_path, shapes_dir):
    import csv

    from insitu.pipelines.pretrain import pretrain
    from tests.conftest import tiny_config

    cfg = load_config(tiny_config(shapes_dir, tmp_path), ["train.max_steps=4", "health.rank_items=12"])
    result = pretrain(cfg, quiet=True)
    rows = list(csv.DictReader((result.run_dir / "logs" / "metrics.csv").open()))
    items = [float(r["health/rank_items"]) for r in rows if r.get("health/rank_items")]
    ranks = [float(r["health/rankme"]) for r in rows if r.get("health/rankme")]
    assert items == [8.0, 12.0, 12.0, 12.0]  # batches of 8: full at the second step, fixed from then on
    assert len(ranks) == 4 and all(1 <= v <= 12 for v in ranks)
    assert result.summary["health"]["alerts"] == []
