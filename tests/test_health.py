"""Training health: metrics against hand computations, the collapse guard, DINO on a frozen base, a tiny run."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from insitu.config import load_config
from insitu.objectives import create_objective
from insitu.objectives.dino import DistillLoss, RunningStandardize
from insitu.objectives.health import alignment, entropy, entropy_ratio, kl_divergence, rankme, uniformity
from insitu.pipelines.health import CollapseGuard, HealthMonitor, block_parameters, fixed_views
from insitu.pipelines.pretrain import PretrainModule, base_ema_momentum, pretrain
from tests.conftest import tiny_config

# ---- metrics against hand computations ------------------------------------------------------


def test_entropy_and_ratio_of_known_distributions():
    uniform = torch.full((3, 4), 0.25)
    assert entropy(uniform) == pytest.approx(math.log(4), abs=1e-6)
    assert entropy_ratio(uniform) == pytest.approx(1.0, abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert entropy(half) == pytest.approx(math.log(2), abs=1e-6)
    assert entropy_ratio(half) == pytest.approx(0.5, abs=1e-6)
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    want = (-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) + 0.0) / 2
    assert entropy(p) == pytest.approx(want, abs=1e-6)


def test_kl_against_hand_computation():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    want = (
        sum(sum(pi * math.log(pi / qi) for pi, qi in zip(pr.tolist(), qr.tolist(), strict=True)) for pr, qr in zip(p, q, strict=True)) / 2
    )
    assert kl_divergence(p, q.log()) == pytest.approx(want, abs=1e-6)
    assert kl_divergence(p, p.log()) == pytest.approx(0.0, abs=1e-6)


def test_rankme_of_known_rank_matrices():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    for r in (1, 3, 8):
        s = torch.zeros(16)
        s[:r] = 2.0  # r equal singular values: the entropy is ln r
        x = u[:, :16] @ torch.diag(s) @ v.T
        assert rankme(x) == pytest.approx(r, rel=1e-3)
    assert rankme(torch.randn(64, 16)) > 12  # a full-rank Gaussian matrix uses almost every direction


def test_alignment_and_uniformity_against_loops():
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    want_align = sum(float((xn[i] - yn[i]).norm() ** 2) for i in range(6)) / 6
    assert alignment(x, y) == pytest.approx(want_align, rel=1e-5)
    pairs = [math.exp(-2 * float((xn[i] - xn[j]).norm() ** 2)) for i in range(6) for j in range(i + 1, 6)]
    assert uniformity(x) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)
    assert alignment(x, x) == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.ones(6, 5)
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-6)  # every pair at distance 0: the worst value


# ---- the collapse guard ---------------------------------------------------------------------


def test_guard_fires_on_uniform_teacher_and_stays_quiet_on_a_healthy_one():
    flat, sharp = DistillLoss(16, 0.1, 0.9), DistillLoss(16, 0.1, 0.9)
    guard, healthy = CollapseGuard(0.95, 0.5, window=5), CollapseGuard(0.95, 0.5, window=5)
    torch.manual_seed(0)
    alerts: list[str] = []
    for step in range(10):
        flat([torch.zeros(8, 16)] * 2, [torch.randn(8, 16)] * 3, teacher_temp=0.04)  # uniform targets
        assert float(flat.health["teacher_entropy_ratio"]) == pytest.approx(1.0, abs=1e-5)
        alerts += guard.observe(step, entropy_ratio=float(flat.health["teacher_entropy_ratio"]))
        spread = torch.randn(8, 16)
        sharp([spread, spread], [torch.randn(8, 16)] * 3, teacher_temp=0.04)
        assert not healthy.observe(step, entropy_ratio=float(sharp.health["teacher_entropy_ratio"]))
    assert len(alerts) == 1 and "teacher entropy" in alerts[0] and "head_input_norm" in alerts[0]
    assert guard.alerts == alerts and not healthy.alerts


def test_guard_fires_when_effective_rank_collapses():
    torch.manual_seed(0)
    guard = CollapseGuard(0.95, 0.5, window=4)
    full = torch.randn(32, 16)
    rank1 = torch.randn(32, 1) @ torch.randn(1, 16)
    assert not guard.observe(0, rank=float(rankme(full)))
    assert not guard.observe(2, rank=float(rankme(full) * 0.9))  # a mild drop is not collapse
    fired = [m for step in (4, 6, 8, 10) for m in guard.observe(step, rank=float(rankme(rank1)))]
    assert len(fired) == 1 and "effective rank" in fired[0] and "train.lr" in fired[0]
    # a streak broken by a healthy measurement starts again
    quiet = CollapseGuard(0.95, 0.5, window=4)
    quiet.observe(0, rank=10.0)
    for step, r in ((2, 1.0), (4, 1.0), (5, 9.0), (6, 1.0), (8, 1.0)):
        assert not quiet.observe(step, rank=r)


# ---- DINO on a frozen base ------------------------------------------------------------------


class FixedFeatures(nn.Module):
    """A stand-in backbone: the 'views' are already CLS features (a frozen base, no ViT)."""

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return x, None, None


def train_heads(options: dict, momentum: float, steps: int = 40) -> float:
    """Train a DINO head on fixed, nearly collinear features; returns the final teacher entropy ratio."""
    torch.manual_seed(0)
    direction = F.normalize(torch.randn(32), dim=0)
    feats = 20 * direction + torch.randn(64, 32)  # mean pairwise cosine about 0.85, like a frozen base's CLS on X-rays
    cos = F.normalize(feats, dim=-1) @ F.normalize(feats, dim=-1).T
    assert cos[~torch.eye(64, dtype=torch.bool)].mean() > 0.8
    small = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "views": {"local_crops": 0}}
    obj = create_objective("dino", 32, 8, 32, {**small, **options}, steps)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    model = FixedFeatures()
    for step in range(steps):
        obj.step = step
        idx = torch.randint(0, 64, (16,))
        views = [feats[idx] + 0.3 * torch.randn(16, 32) for _ in range(2)]
        out = obj({"views": views}, model, model)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.update_teacher(momentum)
    return float(out["health/teacher_entropy_ratio"])


def test_standardised_head_input_gives_a_teacher_that_is_not_uniform():
    old = {"head_input_norm": "none", "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_steps": 30}
    assert train_heads(old, momentum=0.996) > 0.97  # the old defaults: uniform targets, nothing to learn
    assert train_heads({}, momentum=base_ema_momentum(40)) < 0.95


def test_running_standardize_statistics():
    torch.manual_seed(0)
    norm = RunningStandardize(4, momentum=0.5)
    x = torch.randn(100, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 10
    norm.update(x)  # the first update sets the statistics
    z = norm(x)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(4), atol=1e-3)
    norm.update(x + 2)
    assert torch.allclose(norm.mean, x.mean(0) + 1, atol=1e-4)  # momentum 0.5: halfway to the new mean


def test_sinkhorn_targets_have_uniform_marginals():
    torch.manual_seed(0)
    logits = torch.randn(32, 8) * 0.5
    logits[:, 0] += 1  # one prototype dominates the rows before balancing
    sk = DistillLoss(8, 0.1, 0.9, centering="sinkhorn", sinkhorn_iterations=10).targets(logits, 0.1)
    assert torch.allclose(sk.sum(1), torch.ones(32), atol=1e-5)  # each row is a distribution
    assert torch.allclose(sk.sum(0), torch.full((8,), 32 / 8), rtol=0.06)  # each prototype gets about B/K of the mass
    centred = DistillLoss(8, 0.1, 0.9).targets(logits, 0.1)  # zero centre: the skew stays
    assert centred.sum(0)[0] > 4 * 32 / 8
    three = DistillLoss(8, 0.1, 0.9, centering="sinkhorn").targets(logits, 0.1)  # the default 3 iterations
    assert three.sum(0).max() < centred.sum(0).max() / 2


def test_koleo_option_adds_the_weighted_regulariser():
    torch.manual_seed(0)
    feats = [torch.randn(8, 32) for _ in range(2)]
    small = {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "views": {"local_crops": 0}}
    plain = create_objective("dino", 32, 8, 32, small, 10)
    koleo = create_objective("dino", 32, 8, 32, {**small, "koleo_weight": 0.1}, 10)
    koleo.load_state_dict(plain.state_dict())
    a = plain({"views": feats}, FixedFeatures(), FixedFeatures())
    b = koleo({"views": feats}, FixedFeatures(), FixedFeatures())
    want = []
    for x in feats:  # -mean log(distance to the nearest neighbour), features L2-normalised
        z = F.normalize(x, dim=-1)
        d = torch.cdist(z, z) + torch.eye(8) * 10
        want.append(-torch.log(d.min(1).values + 1e-8).mean())
    assert b["koleo"] == pytest.approx(float(torch.stack(want).mean()), rel=1e-4)
    assert float(b["loss"].detach()) == pytest.approx(float(a["loss"].detach() + 0.1 * b["koleo"]), rel=1e-5)
    assert "koleo" not in a


def test_glare_reports_each_terms_teacher_health():
    from tests.test_glare import SMALL, glare_batch, models

    _, student, teacher = models()
    obj = create_objective("glare", 48, 8, 32, {**SMALL, "views": {"local_crops": 1}}, 10)
    out = obj(glare_batch(obj), student, teacher)
    for term in ("global", "local", "region"):
        assert 0 < float(out[f"health/teacher_entropy_ratio_{term}"]) <= 1 + 1e-6
        assert float(out[f"health/student_teacher_kl_{term}"]) >= 0
    assert torch.equal(out["health/teacher_entropy_ratio"], out["health/teacher_entropy_ratio_global"])
    local_first = create_objective("glare", 48, 8, 32, {**SMALL, "views": {"local_crops": 1}, "global_term": False}, 10)
    out = local_first(glare_batch(local_first), student, teacher)
    assert "health/teacher_entropy_ratio_global" not in out
    assert torch.equal(out["health/teacher_entropy_ratio"], out["health/teacher_entropy_ratio_local"])


def test_wrapping_objectives_pass_the_teacher_health_on():
    torch.manual_seed(0)
    feats = [torch.randn(8, 32) for _ in range(2)]
    small = {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "views": {"local_crops": 0}}
    obj = create_objective("sigreg", 32, 8, 32, {"base": "dino", "base_options": small, "num_vectors": 8}, 10)
    out = obj({"views": feats}, FixedFeatures(), FixedFeatures())
    assert {"health/teacher_entropy_ratio", "health/student_teacher_kl", "sigreg"} <= set(out)


def test_ema_base_momentum_follows_the_run_length(tmp_path, shapes_dir):
    for steps in (300, 1000):
        m = base_ema_momentum(steps, half_life=0.1)
        assert m ** (0.1 * steps) == pytest.approx(0.5)  # half of a step's teacher state is left after 10 % of the run
    assert base_ema_momentum(10) == 0.9 and base_ema_momentum(10**6) == 0.996  # clipped
    module = PretrainModule(load_config(tiny_config(shapes_dir, tmp_path), ["train.max_steps=300"]))
    assert module.ema_momentum() == pytest.approx(base_ema_momentum(300))
    module = PretrainModule(load_config(tiny_config(shapes_dir, tmp_path), ["train.max_steps=300", "train.ema_momentum=0.99"]))
    assert module.ema_momentum() == pytest.approx(0.99)  # an explicit value wins


def test_block_parameters_groups_adapters_by_block(tmp_path, shapes_dir):
    module = PretrainModule(load_config(tiny_config(shapes_dir, tmp_path)))
    groups = block_parameters(module.student)
    assert sorted(groups) == ["block0", "block1"]
    assert sum(p.numel() for ps in groups.values() for p in ps) == sum(p.numel() for p in module.student.parameters())


def test_fixed_views_and_monitor_state_survive_a_resume():
    images = {"views": [torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8), torch.randn(6, 1, 4, 4)]}
    assert [tuple(v.shape) for v in fixed_views(images, 4)] == [(4, 1, 8, 8)] * 2
    clips = {"views": [torch.randn(6, 3, 1, 8, 8)] * 2}  # B×T×C×H×W: the first frame
    assert [tuple(v.shape) for v in fixed_views(clips, 4)] == [(4, 1, 8, 8)] * 2
    assert fixed_views({"views": [torch.randn(1, 1, 8, 8)]}, 4) is None  # one image: no spread to measure
    cfg = load_config({"data": {"root": "."}}, check_paths=False).health
    monitor = HealthMonitor(cfg, max_steps=100)
    monitor.history = {"health/rankme": [(5, 7.0), (10, 6.5)]}
    monitor.ratio_range = (0.2, 0.6)
    monitor.guard.observe(5, entropy_ratio=0.99, rank=7.0)
    restored = HealthMonitor(cfg, max_steps=100)
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))  # plain data, as in a checkpoint
    assert restored.summary() == monitor.summary()
    assert restored.guard.rank0 == 7.0 and restored.guard.since["entropy"] == 5


# ---- a tiny real run ------------------------------------------------------------------------


def test_tiny_run_logs_health_and_summarises_it(tmp_path: Path, shapes_dir: Path):
    from insitu.exports.report_html import write_pretrain_report

    cfg = load_config(tiny_config(shapes_dir, tmp_path), ["train.max_steps=4"])
    result = pretrain(cfg, quiet=True)
    rows = list(csv.DictReader((result.run_dir / "logs" / "metrics.csv").open()))
    names = [
        "teacher_entropy",
        "teacher_entropy_ratio",
        "student_teacher_kl",
        "rankme",
        "alignment",
        "uniformity",
        "grad_norm/block0",
        "grad_norm/block1",
        "update_norm/block0",
        "update_norm/block1",
    ]
    for name in names:
        values = [float(r[f"health/{name}"]) for r in rows if r.get(f"health/{name}")]
        assert len(values) == 4 and all(math.isfinite(v) for v in values), name
    ratios = [float(r["health/teacher_entropy_ratio"]) for r in rows if r.get("health/teacher_entropy_ratio")]
    assert all(0 < v < 1 for v in ratios)
    health = json.loads((result.run_dir / "summary.json").read_text())["health"]
    for name in names:
        assert set(health[name]) >= {"first", "last"}, name
    assert health["teacher_entropy_ratio"]["min"] <= health["teacher_entropy_ratio"]["last"] <= health["teacher_entropy_ratio"]["max"]
    assert health["update_norm/block0"]["first"] > 0 and health["alerts"] == []
    html = write_pretrain_report(cfg, result).read_text()
    assert "Training health" in html and "training health metrics" in html


def test_collapsed_run_warns_or_stops(tmp_path: Path, shapes_dir: Path, caplog):
    # a teacher temperature of 100 makes every target uniform: the guard must notice
    from insitu.exports.report_html import write_pretrain_report

    collapsed = ["train.max_steps=9", "objective.options.teacher_temp=100", "health.window=2"]
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "warn"), collapsed)
    with caplog.at_level(logging.WARNING, logger="insitu"):
        warned = pretrain(cfg, quiet=True)
    assert warned.steps == 9 and len(warned.summary["health"]["alerts"]) == 1
    assert any("collapse guard" in r.getMessage() for r in caplog.records)
    html = write_pretrain_report(cfg, warned).read_text()
    assert "WARNING: collapse guard fired" in html and "teacher_temp" in html
    stopped = pretrain(load_config(tiny_config(shapes_dir, tmp_path / "stop"), [*collapsed, "health.guard=stop"]), quiet=True)
    assert stopped.steps < 9 and stopped.summary["health"]["stopped_by_guard"]
    healthy = pretrain(load_config(tiny_config(shapes_dir, tmp_path / "ok"), ["train.max_steps=9", "health.window=2"]), quiet=True)
    assert healthy.summary["health"]["alerts"] == []
