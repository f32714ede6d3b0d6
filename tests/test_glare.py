"""GLARE: each loss term against a slow reference, regions, invariants, EMA, a tiny pretraining run."""

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import load_package
from insitu.backbones import create_backbone
from insitu.config import load_config
from insitu.objectives import create_objective
from insitu.objectives.glare import corrupt_patches, match_regions, sample_regions
from insitu.pipelines.pretrain import pretrain
from tests.conftest import TINY_BACKBONE, tiny_config

SMALL = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "dense_out_dim": 24, "dense_hidden_dim": 16, "dense_bottleneck_dim": 8}


def glare(**options):
    return create_objective("glare", 48, 8, 32, {**SMALL, **options}, 10)


def ce(t_logits, s_logits, center, t_temp, s_temp=0.1):
    """Cross-entropy of one teacher distribution (centred, sharpened) against one student distribution."""
    p = F.softmax((t_logits - center) / t_temp, dim=-1)
    return -(p * F.log_softmax(s_logits / s_temp, dim=-1)).sum()


def test_local_loss_matches_reference():
    torch.manual_seed(0)
    obj = glare()
    center = torch.randn(1, 24) * 0.1
    obj.patch_loss.center.copy_(center)
    t = [torch.randn(3, 16, 48) for _ in range(2)]
    s = [torch.randn(3, 16, 48) for _ in range(2)]
    masks = [torch.rand(3, 4, 4) < 0.4 for _ in range(2)]
    masks[0][0, 0, 0] = True  # no image without a corrupted patch
    got = obj.local_loss(t, s, masks, teacher_temp=0.05)
    # reference: per image, the mean over its corrupted positions; then the mean over images of both views
    per_image = []
    for v in range(2):
        for b in range(3):
            pos = masks[v][b].flatten().nonzero().flatten().tolist()
            n = obj.dense_norm
            terms = [ce(obj.teacher_dense_head(n(t[v][b, i])), obj.dense_head(n(s[v][b, i])), center[0], 0.05) for i in pos]
            per_image.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
    want = torch.stack(per_image).sum() / len(per_image)
    assert torch.allclose(got, want, atol=1e-5)


def reference_regions(attn, grid, k, window):
    """Slow region sampling: argmax seed, clamp the window into the grid, blank it, repeat."""
    h, w = grid
    a = attn.clone().view(h, w)
    boxes = []
    for _ in range(k):
        seed = int(a.flatten().argmax())
        r, c = divmod(seed, w)
        top = min(max(r - window // 2, 0), h - window)
        left = min(max(c - window // 2, 0), w - window)
        a[top : top + window, left : left + window] = -1.0
        boxes.append((top, left, top + window, left + window))
    return boxes


def test_regions_match_reference_and_stay_in_grid():
    torch.manual_seed(0)
    attn = torch.rand(5, 36).softmax(-1)
    boxes, masks = sample_regions(attn, (6, 6), k=4, window=3)
    assert boxes.shape == (5, 4, 4) and masks.shape == (5, 4, 36)
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2:] <= 6).all()
    assert (masks.sum(-1) == 9).all()  # every window is fully inside the grid
    for b in range(5):
        assert [tuple(x) for x in boxes[b].tolist()] == reference_regions(attn[b], (6, 6), 4, 3)
    # the first region is centred on the most attended patch
    seed = attn.argmax(-1)
    assert masks[torch.arange(5), 0, seed].eq(1).all()


def test_correspondences_shape_and_inside_grid():
    torch.manual_seed(0)
    regions, patches = torch.randn(2, 3, 8), torch.randn(2, 16, 8)
    w = match_regions(regions, patches, temp=0.1)
    assert w.shape == (2, 3, 16)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3))
    assert ((w.argmax(-1) >= 0) & (w.argmax(-1) < 16)).all()
    # a region identical to one view-2 token attends to it most
    patches[0, 5] = regions[0, 1] * 3
    assert match_regions(regions, patches, 0.1)[0, 1].argmax() == 5


def test_regional_loss_matches_reference():
    torch.manual_seed(0)
    obj = glare(regional={"regions": 2, "window": 2, "match_temp": 0.2})
    center = torch.randn(1, 24) * 0.1
    obj.region_loss.center.copy_(center)
    grid = (4, 4)
    teacher_out = [(None, torch.randn(2, 16, 48), grid, torch.rand(2, 3, 16)) for _ in range(2)]
    s_patches = [torch.randn(2, 16, 48) for _ in range(2)]
    got = obj.regional_loss(teacher_out, s_patches, teacher_temp=0.06)
    terms = []
    for a, b in ((0, 1), (1, 0)):
        for i in range(2):
            t_patch, attn = teacher_out[a][1][i], teacher_out[a][3][i].mean(0)
            for top, left, bottom, right in reference_regions(attn, grid, 2, 2):
                idx = [r * 4 + c for r in range(top, bottom) for c in range(left, right)]
                region = t_patch[idx].mean(0)
                # the match compares tokens standardised per view (the default regional.match_features)
                za, zb = (teacher_out[v][1][i] for v in (a, b))
                za, zb = ((z - z.mean(0)) / z.std(0, unbiased=False) for z in (za, zb))
                sims = torch.stack([F.cosine_similarity(za[idx].mean(0), p, dim=0) for p in zb])
                weights = torch.softmax(sims / 0.2, dim=0)
                matched = (weights[:, None] * s_patches[b][i]).sum(0)
                n = obj.dense_norm
                terms.append(ce(obj.teacher_dense_head(n(region[None]))[0], obj.dense_head(n(matched[None]))[0], center[0], 0.06))
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


def test_corrupt_patches_changes_only_masked_patches():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 32, 32)
    for kind in ("blur", "noise", "mask"):
        y, mask = corrupt_patches(x, 8, 0.25, kind)
        assert mask.shape == (3, 4, 4) and (mask.flatten(1).sum(1) == 4).all()
        pix = mask[:, None].repeat_interleave(8, 2).repeat_interleave(8, 3).expand_as(x)
        assert torch.equal(y[~pix], x[~pix])
        assert not torch.allclose(y[pix], x[pix])


def models(seed=0):
    torch.manual_seed(seed)
    bb = create_backbone(TINY_BACKBONE)
    student = create_adapters(bb, {"bottleneck_dim": 8})
    teacher = create_adapters(bb, {"bottleneck_dim": 8})
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return bb, AdaptedBackbone(bb, student), AdaptedBackbone(bb, teacher)


def test_step_zero_equals_backbone_exactly():
    bb, student, _ = models()
    x = torch.randn(2, 3, 32, 32)
    cls, patches, _ = student.forward_tokens(x)
    cls0, patches0, _ = bb.forward_tokens(x, None)
    assert torch.equal(cls, cls0) and torch.equal(patches, patches0)
    attn = bb.forward_with_attention(x, student.adapters)[3]
    assert torch.equal(attn, bb.forward_with_attention(x, None)[3])


def glare_batch(obj, n=3):
    torch.manual_seed(1)
    views = [obj.view_transform()(torch.randn(3, 40, 40)) for _ in range(n)]
    return {"views": [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]}


def test_gradients_reach_only_student_adapters_and_heads():
    bb, student, teacher = models()
    obj = glare(views={"local_crops": 1})
    out = obj(glare_batch(obj), student, teacher)
    assert set(out) >= {"loss", "loss_global", "loss_local", "loss_region", "collapse_std"}
    out["loss"].backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(p.grad is None for p in teacher.adapters.parameters())
    assert all(p.grad is None for p in obj.teacher_head.parameters())
    assert all(p.grad is None for p in obj.teacher_dense_head.parameters())
    assert student.adapters.layers["1"].up.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.dense_head.parameters())
    assert torch.isclose(out["loss"], out["loss_global"] + out["loss_local"] + out["loss_region"])


def test_terms_switch_off_and_weights_apply():
    bb, student, teacher = models()
    obj = glare(views={"local_crops": 0}, local={"enabled": False}, regional={"weight": 0.5})
    out = obj(glare_batch(obj), student, teacher)
    assert "loss_local" not in out
    assert torch.isclose(out["loss"], out["loss_global"] + 0.5 * out["loss_region"])
    with pytest.raises(ValueError, match="at least one"):
        glare(global_term=False, local={"enabled": False}, regional={"enabled": False})


def test_ema_update_of_heads():
    obj = glare()
    for p in list(obj.head.parameters()) + list(obj.dense_head.parameters()):
        torch.nn.init.constant_(p, 1.0)
    for p in list(obj.teacher_head.parameters()) + list(obj.teacher_dense_head.parameters()):
        torch.nn.init.constant_(p, 0.0)
    obj.update_teacher(0.9)
    for p in list(obj.teacher_head.parameters()) + list(obj.teacher_dense_head.parameters()):
        assert torch.allclose(p, torch.full_like(p, 0.1))


def test_teacher_temperature_warms_up():
    obj = glare(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=10)
    obj.step = 0
    assert obj.teacher_temp() == pytest.approx(0.04)
    obj.step = 5
    assert obj.teacher_temp() == pytest.approx(0.055)
    obj.step = 20
    assert obj.teacher_temp() == pytest.approx(0.07)


def glare_objective_section():
    return {"name": "glare", "options": {**SMALL, "views": {"local_crops": 1}}}


def test_pretrain_logs_terms_and_collapse_every_step(tmp_path: Path, shapes_dir: Path):
    cfg = load_config(tiny_config(shapes_dir, tmp_path, objective=glare_objective_section()), ["train.max_steps=3"])
    result = pretrain(cfg, quiet=True)
    rows = list(csv.DictReader((result.run_dir / "logs" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/collapse_std")]
    assert len(logged) == 3  # log_every=1: the collapse metric at every step
    assert all(float(r["train/loss_region"]) > 0 and float(r["train/loss_local"]) > 0 for r in logged)
    for name in ("match_entropy", "match_top1", "projector_spread"):  # the regional match's and the projector's health
        assert all(r.get(f"health/{name}") for r in logged), name
    assert all(0 <= float(r["health/match_entropy"]) <= 1 and 0 < float(r["health/match_top1"]) <= 1 for r in logged)
    heads = load_package(result.adapter_dir).head_state()
    assert any(k.startswith("glare_dense.") for k in heads) and any(k.startswith("dino.") for k in heads)


def test_full_finetune_trains_backbone_with_ema_teacher(tmp_path: Path, shapes_dir: Path):
    from safetensors.torch import load_file

    from insitu.pipelines.pretrain import PretrainModule

    raw = tiny_config(shapes_dir, tmp_path, objective=glare_objective_section())
    cfg = load_config(raw, ["train.max_steps=2", "train.full_finetune=true", "objective.options.regional.enabled=false"])
    module = PretrainModule(cfg)
    n_backbone = sum(p.numel() for p in module.backbone.parameters())
    assert sum(p.numel() for p in module.trainable_parameters()) > n_backbone
    assert not any(p.requires_grad for p in module.teacher_backbone.parameters())
    result = pretrain(cfg, quiet=True)
    tuned = load_file(str(result.run_dir / "backbone.safetensors"))
    original = create_backbone(cfg.backbone).vit.state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in original)
