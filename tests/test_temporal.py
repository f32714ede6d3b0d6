"""Temporal objectives: losses against slow reference formulas, view recipes, and tiny real runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.backbones import create_backbone
from insitu.config import BackboneConfig, load_config
from insitu.domains import video as vmod
from insitu.objectives import create_objective
from insitu.objectives.temporal import (
    ClipViewOptions,
    CVRLOptions,
    CVRLViews,
    RSPOptions,
    RSPViews,
    TemporalPool,
    augment_clip,
    info_nce,
    nt_xent,
    sample_gap,
    speed_margin_loss,
)
from insitu.pipelines.data import collate
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.quickstart import quickstart
from tests.conftest import REPO, TINY_BACKBONE, TINY_QUICKSTART, tiny_config
from tests.data.video_fixtures import counter_frames, write_video


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_nt_xent_matches_reference():
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 8), torch.randn(5, 8), 0.2
    z = list(z1) + list(z2)
    n, total = len(z1), 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(cos(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(z[i], z[pos]) / tau) / denom)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_info_nce_matches_reference():
    torch.manual_seed(1)
    q, k, tau = torch.randn(4, 6), torch.randn(4, 6), 0.1
    ref = 0.0
    for i in range(4):
        row = [math.exp(cos(q[i], k[j]) / tau) for j in range(4)]
        col = [math.exp(cos(q[j], k[i]) / tau) for j in range(4)]
        ref += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    assert info_nce(q, k, tau).item() == pytest.approx(ref / 8, rel=1e-5)


def test_speed_margin_matches_reference():
    torch.manual_seed(2)
    h = torch.randn(3, 4, 5)
    speeds = torch.tensor([[1, 1, 2, 2], [2, 1, 2, 1], [1, 2, 2, 1]])
    margin, tau = 0.5, 0.1
    terms = []
    for b in range(3):
        same = [j for j in range(1, 4) if speeds[b, j] == speeds[b, 0]]
        diff = [j for j in range(1, 4) if speeds[b, j] != speeds[b, 0]]
        for p in same:
            for n in diff:
                terms.append(max(0.0, margin - cos(h[b, 0], h[b, p]) / tau + cos(h[b, 0], h[b, n]) / tau))
    assert speed_margin_loss(h, speeds, margin, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # an embedding that separates speeds perfectly pays nothing
    h = torch.tensor([[[1.0, 0], [1.0, 0], [0, 1.0]]])
    assert speed_margin_loss(h, torch.tensor([[1, 1, 2]]), margin, tau).item() == 0.0


def _indexed_clip(t: int = 16, size: int = 8) -> torch.Tensor:
    """A clip whose frame i is filled with the value i (C=3)."""
    return torch.arange(t, dtype=torch.float32).view(t, 1, 1, 1).expand(t, 3, size, size).clone()


def test_rsp_views_cut_speeds():
    plain = ClipViewOptions(frames=4, scale=(1.0, 1.0), flip=False, intensity=0.0)
    views = RSPViews(8, RSPOptions(views=plain))
    torch.manual_seed(0)
    for _ in range(10):
        clips, speeds = views(_indexed_clip())
        assert [c.shape for c in clips] == [(4, 3, 8, 8)] * 3
        assert speeds[0] == speeds[1] != speeds[2]
        for clip, s in zip(clips, speeds.tolist(), strict=True):
            steps = clip[:, 0, 0, 0].diff()
            assert torch.allclose(steps, torch.full_like(steps, float(s)))
    with pytest.raises(ValueError, match="at least 7 frames.*clip_frames"):
        views(_indexed_clip(t=6))
    with pytest.raises(ValueError, match="mode: clips"):
        views(torch.zeros(3, 8, 8))


def test_cvrl_gaps_decrease_and_augmentation_is_temporally_consistent():
    torch.manual_seed(0)
    counts = [0] * 5
    for _ in range(4000):
        counts[sample_gap(4)] += 1
    assert all(a > b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[0] / counts[4] == pytest.approx(5, rel=0.3)
    clip = torch.rand(1, 3, 16, 16).expand(5, 3, 16, 16)  # five identical frames
    for _ in range(5):
        out = augment_clip(clip, 8, ClipViewOptions(flip=True, intensity=0.3))
        assert out.shape == (5, 3, 8, 8) and all(torch.equal(out[0], f) for f in out)
    plain = ClipViewOptions(frames=4, scale=(1.0, 1.0), flip=False, intensity=0.0)
    (a, b), gaps = CVRLViews(8, CVRLOptions(views=plain))(_indexed_clip(12))
    assert abs(a[0, 0, 0, 0] - b[0, 0, 0, 0]).item() == gaps[0].item() <= 8


def test_attention_pool_starts_as_mean():
    x = torch.randn(2, 5, 6)
    assert torch.allclose(TemporalPool(6, "attention")(x), x.mean(1), atol=1e-6)


@pytest.mark.parametrize("name", ["rsp", "cvrl"])
def test_objective_trains_adapters_only(name):
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(**TINY_BACKBONE))
    student = AdaptedBackbone(backbone, create_adapters(backbone, {"bottleneck_dim": 8}))
    options = {"proj_dim": 16, "hidden_dim": 16, "pool": "attention", "views": {"frames": 3}}
    obj = create_objective(name, backbone.embed_dim, backbone.patch_size, 32, options, max_steps=1)
    assert obj.needs_teacher is False
    transform = obj.view_transform()
    batch = collate(
        [
            {"item_id": str(i), "label": -1, **dict(zip(("views", "view_meta"), transform(torch.randn(8, 3, 40, 40)), strict=True))}
            for i in range(3)
        ]
    )
    assert batch["views"][0].shape == (3, 3, 3, 32, 32) and batch["view_meta"].shape[0] == 3
    out = obj(batch, student)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.adapters.parameters())
    assert obj.head_state() and all(k.startswith(f"{name}.") for k in obj.head_state())


@pytest.fixture
def clip_videos(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    for i in range(3):
        write_video(root / f"case{i}.mp4", counter_frames(20, seed=i), fps=10)
    return root


def test_video_rsp_config_runs_tiny(tmp_path, clip_videos, monkeypatch):
    monkeypatch.chdir(REPO)
    vmod._INFO.clear()
    overrides = [
        f"out_dir={tmp_path / 'runs'}",
        f"data.root={clip_videos}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.options.clip_frames=8",
        "data.options.clip_step=4",
        "data.options.stride=1",
        "backbone.name=vit_tiny_patch16_224",
        "backbone.patch_size=8",
        "backbone.img_size=32",
        "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
        "objective.options.views.frames=3",
        "objective.options.proj_dim=16",
        "objective.options.hidden_dim=16",
        "train.max_steps=1",
        "train.batch_size=4",
    ]
    cfg = load_config(REPO / "configs" / "surgical" / "video_rsp.yaml", overrides)
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and result.items == 12 and result.final_loss == result.final_loss
    assert (result.adapter_dir / "adapter.safetensors").exists()


def test_cvrl_pretrain_tiny(tmp_path, clip_videos):
    vmod._INFO.clear()
    raw = tiny_config(
        clip_videos,
        tmp_path / "runs",
        data={"domain": "video", "options": {"mode": "clips", "clip_frames": 6, "clip_step": 6, "crop_fov": False}},
        objective={"name": "cvrl", "options": {"proj_dim": 16, "hidden_dim": 16, "views": {"frames": 2}}},
        train={"max_steps": 2, "batch_size": 4},
    )
    result = pretrain(load_config(raw), quiet=True)
    assert result.steps == 2 and result.final_loss == result.final_loss


def test_quickstart_video_tiny(tmp_path):
    overrides = [o for o in TINY_QUICKSTART if not o.startswith("backbone.weights")]  # the video demo's own backbone
    summary = quickstart(tmp_path / "qs", domain="video", overrides=overrides, quiet=True)
    assert (tmp_path / "qs" / "data" / "train" / "inflamed" / "inflamed_000.mp4").exists()
    rows = summary["probe"]
    assert [r["name"].split(" (")[0] for r in rows] == ["frozen backbone", "+ adapters", "frozen + PCA whitening"]
    assert rows[0]["n_test"] > 0 and all(0.0 <= r["linear_acc"] <= 1.0 for r in rows)
    assert (tmp_path / "qs" / "report.md").exists()
