"""Self-distillation stage: the L2 pull against a direct computation, clean views, base mismatch, a run."""

from pathlib import Path

import pytest
import torch

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import save_package
from insitu.backbones import create_backbone
from insitu.config import load_config
from insitu.errors import AdapterMismatchError
from insitu.objectives import create_objective
from insitu.objectives.views import resize_square
from insitu.pipelines.pretrain import pretrain
from tests.conftest import TINY_BACKBONE, tiny_config

SMALL_DINO = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "views": {"local_crops": 1}}


def further_package(tmp_path: Path, init_seed: int = 0) -> Path:
    """An adapter package with non-zero adapters, standing in for a further-pretrained model."""
    torch.manual_seed(3)
    bb = create_backbone({**TINY_BACKBONE, "init_seed": init_seed})
    adapters = create_adapters(bb, {"bottleneck_dim": 8})
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return save_package(tmp_path / f"further{init_seed}", bb, adapters)


def objective(package: Path, weight: float = 2.0):
    return create_objective(
        "self_distill", 48, 8, 32, {"base": "dino", "base_options": SMALL_DINO, "weight": weight, "adapter": str(package)}, 10
    )


def test_views_end_with_the_clean_image(tmp_path: Path):
    obj = objective(further_package(tmp_path))
    image = torch.randn(3, 40, 40)
    views = obj.view_transform()(image)
    assert len(views) == 4  # 2 global + 1 local + the clean view
    assert torch.equal(views[-1], resize_square(image, 32))


def test_loss_is_base_plus_weighted_l2_pull(tmp_path: Path):
    obj = objective(further_package(tmp_path), weight=2.0)
    torch.manual_seed(0)
    bb = create_backbone(TINY_BACKBONE)
    student, teacher = create_adapters(bb, {"bottleneck_dim": 8}), create_adapters(bb, {"bottleneck_dim": 8})
    teacher.requires_grad_(False)
    views = [obj.view_transform()(torch.randn(3, 40, 40)) for _ in range(3)]
    batch = {"views": [torch.stack([v[i] for v in views]) for i in range(4)]}
    out = obj(batch, AdaptedBackbone(bb, student), AdaptedBackbone(bb, teacher))
    # direct: a fresh student (zero adapters) equals the backbone; the target is backbone + further adapters
    clean = batch["views"][-1]
    with torch.no_grad():
        target = bb.forward_tokens(clean, obj.further)[0]
        fresh = bb.forward_tokens(clean, None)[0]
    want = sum(((fresh[i] - target[i]) ** 2).sum() for i in range(3)) / 3
    assert float(want) > 0
    assert torch.isclose(out["distill"], want, rtol=1e-5)
    assert torch.isclose(out["loss"], out["loss_base"] + 2.0 * out["distill"])
    out["loss"].backward()
    assert all(p.grad is None for p in obj.further.parameters())
    assert student.layers["0"].up.weight.grad is not None


def test_package_from_another_base_is_refused(tmp_path: Path):
    obj = objective(further_package(tmp_path, init_seed=1))
    bb = create_backbone(TINY_BACKBONE)
    adapters = create_adapters(bb, {"bottleneck_dim": 8})
    views = obj.view_transform()(torch.randn(3, 40, 40))
    batch = {"views": [v[None] for v in views]}
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        obj(batch, AdaptedBackbone(bb, adapters), AdaptedBackbone(bb, adapters))


def test_two_stage_run(tmp_path: Path, shapes_dir: Path):
    stage1 = pretrain(load_config(tiny_config(shapes_dir, tmp_path / "s1"), ["train.max_steps=2"]), quiet=True)
    options = {"base": "dino", "base_options": SMALL_DINO, "weight": 1.0, "adapter": str(stage1.adapter_dir)}
    cfg = load_config(
        tiny_config(shapes_dir, tmp_path / "s2", objective={"name": "self_distill", "options": options}), ["train.max_steps=2"]
    )
    stage2 = pretrain(cfg, quiet=True)
    assert stage2.steps == 2 and stage2.adapter_dir is not None
    # the stage-1 package was used: every step logs a positive pull toward it (at step 0 the student is the
    # plain backbone, so a target without the package would give exactly 0), added to the base loss
    import csv

    rows = [r for r in csv.DictReader((stage2.run_dir / "logs" / "metrics.csv").open()) if r.get("train/distill")]
    assert len(rows) == 2
    for r in rows:
        assert float(r["train/distill"]) > 0
        assert float(r["train/loss"]) == pytest.approx(float(r["train/loss_base"]) + float(r["train/distill"]), rel=1e-4)
