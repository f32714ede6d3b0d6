"""Retrieval metrics on toy sets, and the shipped ConVIRT config trained and evaluated at tiny size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from insitu.config import DataConfig, load_config
from insitu.errors import ConfigError
from insitu.pipelines.retrieval import chance_recall, evaluate_retrieval, recall_at_k, retrieval_metrics, zero_shot_accuracy
from tests.conftest import REPO, TINY_BACKBONE, shared
from tests.data.text_fixtures import build_tiny_bert


def test_recall_is_one_on_aligned_pairs_and_near_chance_when_shuffled() -> None:
    g = torch.Generator().manual_seed(0)
    n = 400
    v = torch.randn(n, 32, generator=g)
    texts = [f"text {i}" for i in range(n)]
    i2t, t2i, chance = retrieval_metrics(v, v + 0.01 * torch.randn(n, 32, generator=g), texts)
    assert i2t == {1: 1.0, 5: 1.0, 10: 1.0} and t2i == {1: 1.0, 5: 1.0, 10: 1.0}
    assert chance == pytest.approx({1: 1 / n, 5: 5 / n, 10: 10 / n})
    shuffled = v[torch.randperm(n, generator=g)]
    i2t, t2i, _ = retrieval_metrics(v, shuffled, texts)
    for k in (1, 5, 10):
        sd = math.sqrt(chance[k] * (1 - chance[k]) / n)
        assert abs(i2t[k] - chance[k]) < 4 * sd + 1 / n and abs(t2i[k] - chance[k]) < 4 * sd + 1 / n


def test_identical_texts_count_as_hits_and_raise_chance() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.2, 0.9], [0.5, 0.0, 0.1]])
    assert recall_at_k(sim, ks=(1, 2)) == {1: 0.0, 2: 1.0}  # every diagonal entry ranks second
    positives = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert recall_at_k(sim, positives, ks=(1,)) == {1: pytest.approx(1 / 3)}
    assert chance_recall(positives, ks=(1,)) == {1: pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)}


def test_zero_shot_accuracy() -> None:
    classes = torch.eye(3)
    labels = torch.tensor([0, 1, 2, 2])
    images = classes[labels] + 0.1
    assert zero_shot_accuracy(images, classes, labels) == 1.0
    assert zero_shot_accuracy(images, classes[[1, 2, 0]], labels) == 0.0


def test_shipped_convirt_config_trains_and_evaluates_tiny(tmp_path: Path) -> None:
    npz = shared("medical", "pneumoniamnist", "pneumoniamnist_balanced_trainval.npz")
    bert = build_tiny_bert(tmp_path / "bert")
    path = REPO / "configs" / "medical" / "pneumoniamnist_convirt.yaml"
    tiny = {**TINY_BACKBONE, "in_chans": 1}
    overrides = [
        f"data.root={npz}",
        "data.max_items=16",
        "data.image_size=32",
        f"backbone={tiny}",
        "adapter.bottleneck_dim=8",
        f"objective.options.text_encoder={bert}",
        "objective.options.proj_dim=16",
        "train.max_steps=1",
        "train.batch_size=8",
        "trainer.accelerator=cpu",
        f"out_dir={tmp_path / 'runs'}",
    ]
    cfg = load_config(path, overrides=overrides)
    assert cfg.objective.options["lam"] == 0.75 and cfg.objective.options["temperature"] == 0.1
    from insitu.pipelines.pretrain import pretrain

    result = pretrain(cfg, quiet=True)
    assert result.steps == 1
    val = DataConfig.model_validate({**cfg.data.model_dump(), "max_items": 12, "options": {**cfg.data.options, "split": "val"}})
    prompts = {"normal": ["The lungs are clear."], "pneumonia": ["Findings consistent with pneumonia."]}
    out = evaluate_retrieval(cfg, result.adapter_dir, prompts, pairs=val)
    assert out.n_pairs == 12 and set(out.image_to_text) == {1, 5, 10}
    assert all(0.0 <= r <= 1.0 for r in [*out.image_to_text.values(), *out.text_to_image.values()])
    assert out.image_to_text[10] >= out.image_to_text[1] and 0.0 <= out.zero_shot_acc <= 1.0
    with pytest.raises(ConfigError, match="missing for classes"):
        evaluate_retrieval(cfg, result.adapter_dir, {"normal": ["Clear."]}, pairs=val)


def test_retrieve_command_writes_recall_and_zero_shot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from insitu.cli import main
    from insitu.pipelines.pretrain import pretrain

    npz = shared("medical", "pneumoniamnist", "pneumoniamnist_balanced_trainval.npz")
    bert = build_tiny_bert(tmp_path / "bert")
    path = REPO / "configs" / "medical" / "pneumoniamnist_convirt.yaml"
    overrides = [
        f"data.root={npz}",
        "data.max_items=24",
        "data.image_size=32",
        f"backbone={ {**TINY_BACKBONE, 'in_chans': 1} }",
        "adapter.bottleneck_dim=8",
        f"objective.options.text_encoder={bert}",
        "objective.options.proj_dim=16",
        "train.max_steps=1",
        "train.batch_size=8",
        "trainer.accelerator=cpu",
        f"out_dir={tmp_path / 'runs'}",
    ]
    cfg = load_config(path, overrides=overrides)
    adapter = pretrain(cfg, quiet=True).adapter_dir
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("normal: The lungs are clear.\npneumonia: [Findings consistent with pneumonia., Pneumonia.]\n")
    sets = [a for o in overrides for a in ("--set", o)]
    command = ["--quiet", "retrieve", "-c", str(path), "--adapter", str(adapter), "--prompts", str(prompts), *sets]
    assert main(command) == 0
    out = cfg.run_dir / "retrieval"
    lines = (out / "retrieval.csv").read_text().splitlines()
    header = "k,image_to_text,i2t_low,i2t_high,text_to_image,t2i_low,t2i_high,chance"
    assert lines[0] == header and [r.split(",")[0] for r in lines[1:]] == ["1", "5", "10"]
    saved = json.loads((out / "retrieval.json").read_text())
    assert 0.0 <= saved["zero_shot_acc"] <= 1.0 and saved["n_pairs"] > 0
    assert set(saved["intervals"]) == {f"{d}@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert len(saved["hits"]["zero_shot"]) == saved["n_pairs"] == len(saved["groups"])
    assert "image→text R@k" in capsys.readouterr().out
    assert main(command) == 2  # earlier results are not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    prompts.write_text("- not a mapping\n")
    assert main([*command, "--overwrite"]) == 2
    assert "holds no mapping" in capsys.readouterr().err
