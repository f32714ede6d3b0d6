"""The Lightning pretraining loop: frozen means frozen, EMA teacher, non-finite policy, packages."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from insitu.adapters.package import load_package
from insitu.config import load_config
from insitu.errors import ConfigError, NonFiniteLossError
from insitu.pipelines.pretrain import PretrainModule, pretrain
from tests.conftest import tiny_config


def state_bytes(module: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().numpy().tobytes() for k, v in module.state_dict().items()}


def test_only_adapters_and_heads_train(tmp_path, shapes_dir, monkeypatch):
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs"))
    built: list[PretrainModule] = []
    original_init = PretrainModule.__init__

    def spy(self, c):
        original_init(self, c)
        built.append(self)
        self.before = {
            "backbone": state_bytes(self.backbone),
            "student": state_bytes(self.student),
            "teacher": state_bytes(self.teacher),
            "head": state_bytes(self.objective.head),
        }

    monkeypatch.setattr(PretrainModule, "__init__", spy)
    result = pretrain(cfg, quiet=True)
    module = built[0]
    assert result.steps == 3 and np.isfinite(result.final_loss)
    assert state_bytes(module.backbone) == module.before["backbone"]  # frozen weights byte-identical
    assert state_bytes(module.student) != module.before["student"]
    assert state_bytes(module.objective.head) != module.before["head"]
    assert state_bytes(module.teacher) != module.before["teacher"]  # EMA moved the teacher
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.backbone.parameters()}
    assert not opt_params & {id(p) for p in module.teacher.parameters()}
    assert opt_params == {id(p) for p in module.student.parameters()} | {
        id(p) for p in module.objective.head.parameters() if p.requires_grad
    }


def test_run_folder_contents(tmp_path, shapes_dir):
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs"))
    result = pretrain(cfg, quiet=True)
    run = result.run_dir
    for rel in (
        "config.yaml",
        "summary.json",
        "logs/metrics.csv",
        "checkpoints/last.ckpt",
        "manifest/manifest.csv",
        "adapter/adapter.safetensors",
    ):
        assert (run / rel).exists(), rel
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])  # checkpoints stay adapter-sized
    pkg = load_package(result.adapter_dir)
    assert pkg.meta.training["steps"] == 3
    assert pkg.meta.normalizer and len(pkg.meta.normalizer["mean"]) == 3
    assert pkg.meta.config["data"]["root"] == "<local path>"
    assert any(k.startswith("head.dino.") for k in pkg.tensors)
    assert json.loads((run / "summary.json").read_text())["trainable_params"] == result.trainable_params


def test_existing_run_needs_resume_or_new_name(tmp_path, shapes_dir):
    cfg = load_config(tiny_config(shapes_dir, tmp_path / "runs"))
    pretrain(cfg, quiet=True)
    with pytest.raises(ConfigError, match="already holds checkpoints. Pass --resume"):
        pretrain(cfg, quiet=True)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        pretrain(load_config(tiny_config(shapes_dir, tmp_path / "other")), resume=True, quiet=True)


def test_resume_continues_to_more_steps(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path / "runs")
    pretrain(load_config(raw), quiet=True)
    raw["train"]["max_steps"] = 5
    result = pretrain(load_config(raw), resume=True, quiet=True)
    assert result.steps == 5 and np.isfinite(result.final_loss)


def _nan_tiff_folder(root, n=8):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.random((32, 32), dtype=np.float32)
        if i == 3:
            arr[5:9, 5:9] = np.nan  # a float image with NaN pixels (e.g. a bad export)
        Image.fromarray(arr, mode="F").save(root / f"img{i}.tif")
    return root


def test_non_finite_loss_stops_and_names_items(tmp_path):
    root = _nan_tiff_folder(tmp_path / "nan")
    raw = tiny_config(root, tmp_path / "runs", train={"batch_size": 8, "max_steps": 2})
    raw["objective"]["options"]["views"] = {"local_crops": 1, "global_scale": [1.0, 1.0], "local_scale": [0.9, 1.0]}
    cfg = load_config(raw)
    from insitu.domains import create_domain

    bad_id = [i.item_id for i in create_domain("images").scan(root).items if i.path.endswith("img3.tif")][0]
    with pytest.raises(NonFiniteLossError, match=rf"at step 0; items with non-finite pixels: \[{bad_id}\]"):
        pretrain(cfg, quiet=True)
    ckpts = list((cfg.run_dir / "checkpoints").glob("*.ckpt"))
    assert not ckpts  # nothing non-finite was ever written


def test_non_finite_skip_policy(tmp_path):
    root = _nan_tiff_folder(tmp_path / "nan")
    raw = tiny_config(root, tmp_path / "runs", train={"batch_size": 4, "max_steps": 4, "nonfinite": "skip", "max_skipped_fraction": 0.6})
    raw["objective"]["options"]["views"] = {"local_crops": 1, "global_scale": [1.0, 1.0], "local_scale": [0.9, 1.0]}
    result = pretrain(load_config(raw), quiet=True)
    assert result.summary["skipped_batches"] >= 1
    assert result.steps == 4 and np.isfinite(result.final_loss)


def test_skip_policy_fails_the_run_past_its_budget(tmp_path):
    root = _nan_tiff_folder(tmp_path / "nan")
    raw = tiny_config(root, tmp_path / "runs", train={"batch_size": 4, "max_steps": 6, "nonfinite": "skip"})
    raw["objective"]["options"]["views"] = {"local_crops": 1, "global_scale": [1.0, 1.0], "local_scale": [0.9, 1.0]}
    cfg = load_config(raw)
    with pytest.raises(NonFiniteLossError, match="more than train.max_skipped_fraction=0.1 allows"):
        pretrain(cfg, quiet=True)
    assert not (cfg.run_dir / "adapter" / "insitu.json").exists()  # nothing diverged is packaged


@pytest.mark.slow
def test_performance_levers_train_the_same_model(tmp_path, shapes_dir):
    """train.fused_optimizer and train.compile change how a step runs, not what it computes."""
    losses = {}
    for name, extra in {"eager": {}, "fused": {"fused_optimizer": True}, "compiled": {"compile": "default"}}.items():
        cfg = load_config(tiny_config(shapes_dir, tmp_path / name, train={"max_steps": 2, "batch_size": 4, **extra}))
        losses[name] = pretrain(cfg, quiet=True).final_loss
    assert losses["fused"] == pytest.approx(losses["eager"], abs=1e-5)
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
