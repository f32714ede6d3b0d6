"""Downstream training on Lightning: smp decoders on the adapted ViT, resume, validation, fresh adapters, DDP."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.backbones import create_backbone
from insitu.config import BackboneConfig, load_config
from insitu.heads import create_head, head_options
from insitu.pipelines import downstream
from insitu.pipelines.downstream import StepBatchSampler
from insitu.pipelines.finetune import DownstreamModel, finetune
from insitu.pipelines.head_folder import load_head
from tests.conftest import REPO, TINY_BACKBONE, tiny_config


def tiny_model(head: str, with_adapters: bool) -> DownstreamModel:
    torch.manual_seed(0)
    backbone = create_backbone(BackboneConfig(**TINY_BACKBONE))
    adapters = create_adapters(backbone, {"kind": "bottleneck", "bottleneck_dim": 4}) if with_adapters else None
    head_module = create_head("segmentation", head, backbone.embed_dim, 3, **head_options("segmentation", head, {"levels": 2, "decoder_dim": 8}))
    return DownstreamModel(AdaptedBackbone(backbone, adapters), head_module, "segmentation", layers=2)


@pytest.mark.parametrize("head", ["linear", "fpn", "upernet"])
@pytest.mark.parametrize("with_adapters", [False, True])
def test_decoder_on_adapted_vit_gradients_reach_only_trainable_parts(head, with_adapters):
    model = tiny_model(head, with_adapters)
    for p in model.adapted.parameters():
        p.requires_grad_(False)
    if with_adapters:
        for p in model.adapted.adapters.parameters():
            p.requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 3, 32, 32)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in model.adapted.backbone.parameters())
    if with_adapters:
        grads = [p.grad for p in model.adapted.adapters.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_step_sampler_is_a_function_of_seed_and_step_and_shards_by_rank():
    full = list(StepBatchSampler(20, 8, seed=3, steps=6))
    resumed = list(StepBatchSampler(20, 8, seed=3, steps=6, start=4))
    assert resumed == full[4:] and len(full) == 6
    assert list(StepBatchSampler(20, 8, seed=4, steps=6)) != full
    ranks = [list(StepBatchSampler(20, 8, seed=3, steps=6, rank=r, world=2)) for r in (0, 1)]
    for step in range(6):  # the two ranks split each step's batch without overlap
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(full[step])


def _cfg(shapes_dir, tmp_path, **ds):
    base = {"steps": 8, "batch_size": 6, "mode": "adapters", "val_fraction": 0, "checkpoint_every": 4, **ds}
    return load_config(tiny_config(shapes_dir, tmp_path / "runs", probe={"test_fraction": 0.5}, downstream=base))


def test_killed_run_resumes_from_its_checkpoint_to_the_same_end(tmp_path, shapes_dir, monkeypatch):
    finetune(_cfg(shapes_dir, tmp_path), out_dir=tmp_path / "straight")

    class Kill(downstream.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                raise RuntimeError("killed")

    build = downstream.downstream_trainer

    def with_kill(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(Kill())
        return trainer

    monkeypatch.setattr("insitu.pipelines.finetune.downstream_trainer", with_kill)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(_cfg(shapes_dir, tmp_path), out_dir=tmp_path / "killed")
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    monkeypatch.setattr("insitu.pipelines.finetune.downstream_trainer", build)
    finetune(_cfg(shapes_dir, tmp_path), out_dir=tmp_path / "killed", resume=True)
    a, b = load_file(tmp_path / "straight" / "head.safetensors"), load_file(tmp_path / "killed" / "head.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("adapter.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_fresh_adapters_train_and_reload_and_validation_is_logged(tmp_path, shapes_dir):
    cfg = _cfg(shapes_dir, tmp_path, val_fraction=0.3, val_every=4, checkpoint_every=None)
    result = finetune(cfg, out_dir=tmp_path / "m")
    assert result.name == "fresh adapters + head"
    model, _, _ = load_head(tmp_path / "m")
    head_params = sum(p.numel() for p in model.head.parameters())
    assert result.trainable_params > head_params
    assert any(v.abs().sum() > 0 for v in model.adapted.adapters.state_dict().values())  # moved from their zero init
    logged = (tmp_path / "m" / "logs" / "metrics.csv").read_text().splitlines()
    assert "val/accuracy" in logged[0] and "train/loss" in logged[0]
    assert sum(1 for row in logged[1:] if row.split(",")[logged[0].split(",").index("val/accuracy")]) == 2  # steps 4 and 8


@pytest.mark.slow
def test_two_process_gloo_ddp_finetune(tmp_path, shapes_dir):
    raw = tiny_config(
        shapes_dir,
        tmp_path / "runs",
        probe={"test_fraction": 0.5},
        downstream={"steps": 2, "batch_size": 4, "mode": "adapters", "val_fraction": 0},
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "insitu", "--quiet", "finetune", "-c", str(path), "--out", str(tmp_path / "m")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,  # below pytest's own limit (pyproject), so this one can fire
    )
    assert out.returncode == 0, out.stderr[-3000:]
    model, meta, _ = load_head(tmp_path / "m")
    assert meta["num_classes"] == 4 and any(v.abs().sum() > 0 for v in model.adapted.adapters.state_dict().values())


def test_segmentation_classes_come_from_mask_values_not_image_folders(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant", "normal"):  # three image classes, binary masks (as in BUSI)
        for i in range(4):
            (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "msk" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{cls}{i}.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, 8:20] = 255 if cls != "normal" else 0
            Image.fromarray(mask).save(tmp_path / "msk" / cls / f"{cls}{i}.png")
    data = {"domain": "images", "root": str(tmp_path / "img"), "image_size": 32, "options": {"channels": 1, "masks": str(tmp_path / "msk")}}
    raw = tiny_config(tmp_path / "img", tmp_path / "runs", data=data, backbone={"in_chans": 1}, probe={"test_fraction": 0.3})
    raw["downstream"] = {"task": "segmentation", "head": "linear", "steps": 1, "batch_size": 4, "val_fraction": 0}
    finetune(load_config(raw), out_dir=tmp_path / "m")
    _, meta, _ = load_head(tmp_path / "m")
    assert meta["num_classes"] == 2 and meta["class_names"] == ["benign", "malignant", "normal"]


def test_splits_larger_than_the_memory_budget_stream_from_disk_to_the_same_result(tmp_path, shapes_dir, monkeypatch):
    from insitu.pipelines import labelled
    from insitu.pipelines.finetune import prepare

    cfg = _cfg(shapes_dir, tmp_path, checkpoint_every=None)
    finetune(cfg, out_dir=tmp_path / "memory")
    monkeypatch.setattr(labelled, "IN_MEMORY_MB", 0)
    data = prepare(cfg, None)
    assert isinstance(data.train.images, labelled.LazyImages) and isinstance(data.test.images, labelled.LazyImages)
    monkeypatch.setattr(labelled, "IN_MEMORY_MB", 2048)
    ref = prepare(cfg, None)
    assert torch.is_tensor(ref.train.images) and torch.equal(data.train.images[0 : len(ref.train.images)], ref.train.images)
    monkeypatch.setattr(labelled, "IN_MEMORY_MB", 0)
    finetune(cfg, out_dir=tmp_path / "streamed")
    a, b = load_file(tmp_path / "memory" / "head.safetensors"), load_file(tmp_path / "streamed" / "head.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
