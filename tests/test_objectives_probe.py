"""The DINO objective against a slow reference, EMA arithmetic, and the probes on known data."""

import numpy as np
import torch
import torch.nn.functional as F

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.backbones import create_backbone
from insitu.config import load_config
from insitu.heads import knn_accuracy, linear_probe_accuracy
from insitu.objectives import create_objective
from insitu.pipelines.pretrain import PretrainModule
from tests.conftest import TINY_BACKBONE, tiny_config


def reference_dino_loss(teacher_out, student_out, center, t_temp, s_temp):
    """Caron et al. 2021, Algorithm 1, written out pair by pair."""
    total, n = 0.0, 0
    for it, t in enumerate(teacher_out):
        p_t = F.softmax((t - center) / t_temp, dim=-1)
        for js, s in enumerate(student_out):
            if it == js:
                continue
            total += -(p_t * F.log_softmax(s / s_temp, dim=-1)).sum(-1).mean()
            n += 1
    return total / n


def test_dino_loss_matches_reference():
    torch.manual_seed(0)
    obj = create_objective("dino", 48, 8, 32, {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "teacher_temp": 0.05}, 10)
    teacher = [torch.randn(5, 32) for _ in range(2)]
    student = [torch.randn(5, 32) for _ in range(4)]
    center = torch.randn(1, 32) * 0.1
    obj.loss.center.copy_(center)
    got = obj.loss(teacher, student, teacher_temp=0.05)
    want = reference_dino_loss(teacher, student, center, 0.05, 0.1)
    assert torch.allclose(got, want, atol=1e-5)
    # the centre then moves toward the teacher mean with momentum 0.9
    expected_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(obj.loss.center, expected_center, atol=1e-6)


def test_dino_objective_forward_and_gradients():
    torch.manual_seed(0)
    bb = create_backbone(TINY_BACKBONE)
    student, teacher = create_adapters(bb, {"bottleneck_dim": 8}), create_adapters(bb, {"bottleneck_dim": 8})
    obj = create_objective("dino", bb.embed_dim, 8, 32, {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}, 10)
    views = obj.view_transform()(torch.randn(3, 40, 40))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    batch = {"views": [torch.stack([v, v + 0.1]) for v in views]}
    torch.nn.init.normal_(student.layers["1"].up.weight, std=0.05)  # student and teacher differ
    out = obj(batch, AdaptedBackbone(bb, student), AdaptedBackbone(bb, teacher))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    # end to end against the pairwise reference: the teacher sees the 2 global views, the student all 6;
    # both heads see CLS standardised by the teacher batch's statistics (the first update sets them),
    # the centre starts at zero, temperatures are the defaults (teacher 0.04, student 0.1)
    with torch.no_grad():
        t_cls = [bb.forward_tokens(v, teacher)[0] for v in batch["views"][:2]]
        s_cls = [bb.forward_tokens(v, student)[0] for v in batch["views"]]
        both = torch.cat(t_cls)
        mean, var = both.mean(0), both.var(0, unbiased=False)
        t_out = [obj.teacher_head((c - mean) / torch.sqrt(var + 1e-5)) for c in t_cls]
        s_out = [obj.head((c - mean) / torch.sqrt(var + 1e-5)) for c in s_cls]
        want = reference_dino_loss(t_out, s_out, torch.zeros(1, 32), 0.04, 0.1)
    assert torch.allclose(out["loss"].detach(), want, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in bb.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert student.layers["0"].up.weight.grad is not None


def test_ema_schedule_and_arithmetic(tmp_path, shapes_dir):
    cfg = load_config(tiny_config(shapes_dir, tmp_path), ["train.max_steps=100", "train.ema_momentum=0.99"])
    module = PretrainModule(cfg)
    assert abs(module.ema_momentum() - 0.99) < 1e-9  # step 0
    for p in module.student.parameters():
        torch.nn.init.constant_(p, 1.0)
    for p in module.teacher.parameters():
        torch.nn.init.constant_(p, 0.0)
    module.on_train_batch_end(outputs=torch.tensor(1.0), batch=None, batch_idx=0)
    assert all(torch.allclose(p, torch.full_like(p, 0.01)) for p in module.teacher.parameters())


def test_probes_on_separable_and_shuffled_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 5, (3, 16))
    y = rng.integers(0, 3, 300)
    x = centers[y] + rng.normal(0, 1, (300, 16))
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:]) == 1.0
    assert knn_accuracy(x[:200], y[:200], x[200:], y[200:], k=5) == 1.0
    noise = rng.normal(0, 1, (300, 16))
    assert knn_accuracy(noise[:200], y[:200], noise[200:], y[200:], k=5) < 0.55
    assert linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.55
