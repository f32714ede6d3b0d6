"""Fine-tuning heads on the (adapted) backbone: modes, class weights, ignore index, errors, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from insitu.config import DownstreamConfig, load_config
from insitu.domains.synthetic import write_shape_pairs
from insitu.errors import ConfigError, DataError
from insitu.pipelines.downstream import task_loss
from insitu.pipelines.finetune import class_weights, finetune, prepare
from insitu.pipelines.head_folder import load_head
from insitu.pipelines.pretrain import pretrain
from tests.conftest import REPO, TINY_BACKBONE, shared, tiny_config, write_shapes

SEG_DATA = {"domain": "video", "image_size": 32, "options": {"crop_fov": False, "decode_size": 32}}


def seg_config(root: Path, out: Path, **downstream) -> dict:
    ds = {"task": "segmentation", "head": "fpn", "steps": 4, "batch_size": 4, "decoder_dim": 8, **downstream}
    return tiny_config(root, out, data={**SEG_DATA, "root": str(root)}, downstream=ds, probe={"test_fraction": 0.3})


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A tiny adapter package from 1 DINO step on shapes."""
    tmp = tmp_path_factory.mktemp("pkg")
    cfg = load_config(tiny_config(write_shapes(tmp / "shapes", 3), tmp / "runs", train={"max_steps": 1, "batch_size": 4}))
    return pretrain(cfg, quiet=True).adapter_dir


def test_head_mode_keeps_adapters_and_adapters_mode_trains_them(tmp_path, shapes_dir, package):
    base = tiny_config(shapes_dir, tmp_path, probe={"test_fraction": 0.5})
    frozen = finetune(load_config({**base, "downstream": {"steps": 3, "batch_size": 8, "mode": "head"}}), package, out_dir=tmp_path / "h")
    trained = finetune(
        load_config({**base, "downstream": {"steps": 3, "batch_size": 8, "mode": "adapters"}}), package, out_dir=tmp_path / "a"
    )
    assert trained.trainable_params > frozen.trainable_params > 0
    assert set(frozen.metrics) == {"accuracy", "balanced_accuracy", "auroc"}
    model_h, _, _ = load_head(tmp_path / "h")
    model_a, meta, _ = load_head(tmp_path / "a")
    from insitu.adapters.package import load_package

    original = load_package(package).adapter_state()
    for k, v in model_h.adapted.adapters.state_dict().items():
        assert torch.equal(v, original[k])  # heads-only: the package's adapters are untouched
    assert any(not torch.equal(v, original[k]) for k, v in model_a.adapted.adapters.state_dict().items())
    assert meta["task"] == "classification" and meta["num_classes"] == 4


def test_segmentation_fpn_and_linear_heads_train(tmp_path):
    root = write_shape_pairs(tmp_path / "pairs", n=10, size=32)
    for head in ("fpn", "linear"):
        cfg = seg_config(root, tmp_path, head=head, class_weights="balanced")
        if head == "linear":  # a linear head takes no decoder_dim: setting it is a ConfigError naming the head
            cfg["downstream"].pop("decoder_dim")
        r = finetune(load_config(cfg))
        assert set(r.metrics) == {"mIoU", "dice", "pixel_accuracy"}
        assert 0 <= r.metrics["mIoU"] <= 1 and r.history[-1] == r.history[-1]


def test_ignore_pixels_do_not_count_in_the_loss():
    ds = DownstreamConfig(task="segmentation")
    logits = torch.randn(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [255, 255]]])
    expected = torch.nn.functional.cross_entropy(logits[0, :, 0].T, torch.tensor([0, 1]))
    assert task_loss(ds, logits, target, None).item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_weights_balanced_by_hand_and_list_checked():
    ds = DownstreamConfig(class_weights="balanced")
    w = class_weights(ds, torch.tensor([0, 0, 0, 1]), 2)  # 4 / (2·3), 4 / (2·1)
    assert w.tolist() == pytest.approx([2 / 3, 2.0])
    seg = DownstreamConfig(task="segmentation", class_weights="balanced")
    assert class_weights(seg, torch.tensor([[0, 1], [255, 255]]), 2).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ConfigError, match="3 values but the task has 2 classes"):
        class_weights(DownstreamConfig(class_weights=[1, 2, 3]), torch.tensor([0, 1]), 2)


def test_unlabelled_data_is_a_clear_error(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list(write_shapes(tmp_path / "s", 2).rglob("*.png")):
        p.rename(flat / p.name)
    cfg = load_config(tiny_config(flat, tmp_path, downstream={"steps": 1}, probe={"test_fraction": 0.5}))
    with pytest.raises(DataError, match="needs integer labels for every item"):
        prepare(cfg, None)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "downstream").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_downstream_configs_run_tiny(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path, check_paths=False)
    roots = [d.root for d in (cfg.data, cfg.probe.train, cfg.probe.test) if d is not None]
    for root in roots:
        shared(*Path(root).resolve().relative_to((REPO.parent / "shared" / "data").resolve()).parts)
    overrides = [f"backbone.{k}={v}" for k, v in TINY_BACKBONE.items() if k != "kwargs"]
    overrides += ["backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}", "downstream.steps=2", "downstream.seeds=[0]"]
    overrides += [f"out_dir={tmp_path}", "data.image_size=32"] + [
        f"probe.{s}.image_size=32" for s in ("train", "test") if getattr(cfg.probe, s)
    ]
    overrides += [f"probe.{s}.max_items=12" for s in ("train", "test") if getattr(cfg.probe, s)] + ["data.max_items=12"]
    cfg = load_config(path, overrides)
    result = finetune(cfg, out_dir=tmp_path / "model")
    assert result.n_train > 0 and result.n_test > 0 and all(v == v for v in result.metrics.values() if v is not None)


def test_multilabel_on_real_bigearthnet_tags(tmp_path):
    root = shared("satellite", "bigearthnet", "S2")
    data = {
        "domain": "geotiff",
        "root": str(root),
        "image_size": 32,
        "options": {"preset": "sentinel2_l2a", "tile_size": None, "labels": "bigearthnet"},
    }
    cfg = tiny_config(root, tmp_path, data=data, backbone={"in_chans": 12}, probe={"train": data, "test": data})
    cfg["downstream"] = {"task": "multilabel", "head": "mlp", "steps": 3, "batch_size": 3, "hidden_dim": 16, "val_fraction": 0}
    data = prepare(load_config(cfg), None)
    train, k = data.train, data.k
    assert train.targets.shape == (3, k) and k >= 2 and set(train.targets.unique().tolist()) == {0.0, 1.0}
    result = finetune(load_config(cfg))
    assert set(result.metrics) == {"mAP"} and 0 < result.metrics["mAP"] <= 1


def test_head_folder_names_its_package_relatively_and_checks_it(tmp_path, shapes_dir, package):
    import json
    import shutil

    work = tmp_path / "work"
    shutil.copytree(package, work / "adapter")
    base = tiny_config(shapes_dir, tmp_path / "runs", probe={"test_fraction": 0.5})
    finetune(load_config({**base, "downstream": {"steps": 2, "batch_size": 8, "mode": "head"}}), work / "adapter", out_dir=work / "head")
    text = (work / "head" / "head.json").read_text()
    ref = json.loads(text)["adapter_package"]
    assert ref["path"] == "../adapter" and len(ref["content_sha256"]) == 64
    assert str(tmp_path) not in text  # no absolute path in a file meant to be shared
    shutil.copytree(work, tmp_path / "moved")  # head and package copied together: still loads
    model, loaded, norm = load_head(tmp_path / "moved" / "head")
    assert model.adapted.adapters is not None
    # the preprocessing contract round-trips: package -> head folder -> loaded head, unchanged
    from insitu.adapters.package import load_package
    from insitu.pipelines.preprocess import package_preprocessing

    stored = package_preprocessing(load_package(work / "adapter"))
    assert loaded["preprocessing"] == stored and norm == stored.normalizer
    assert json.loads(text)["preprocessing"] == stored.to_dict()
    shutil.copytree(work / "head", tmp_path / "alone" / "head")  # the head without its package
    with pytest.raises(ConfigError, match="not there"):
        load_head(tmp_path / "alone" / "head")
    meta = json.loads(text)
    meta["adapter_package"]["content_sha256"] = "0" * 64  # a head trained with another package
    (tmp_path / "moved" / "head" / "head.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="content hash"):
        load_head(tmp_path / "moved" / "head")
