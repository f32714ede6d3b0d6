"""Bad input is a typed insitu error naming the field or file (the CLI exits 2), never a traceback."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from insitu.checkpoints import check_checkpoint
from insitu.cli import main
from insitu.domains import create_domain
from insitu.errors import ConfigError, DataError
from tests.conftest import tiny_config, write_shapes
from tests.data.geotiff_fixtures import write_scene


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    root = write_shapes(tmp_path / "shapes", n_per_class=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, tmp_path / "runs")))
    return path


def _pretrain(config: Path, capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, str]:
    args = ["-q", "pretrain", "-c", str(config)]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.max_steps=[1, 2", ["train.max_steps", "not plain YAML"]),
        ("train.max_steps=!!python/object/apply:os.system [echo]", ["train.max_steps", "never loaded"]),
        ("trainer.devices=all-of-them", ["trainer.devices", "'auto'"]),
        ("trainer.devices=0", ["trainer.devices"]),
        ("objective.options.out_dim=-1", ["objective.options.out_dim", "greater than 1"]),
        ("objective.options.center_momentum=1.5", ["objective.options.center_momentum", "less than 1"]),
        ("objective.options.student_temp=.nan", ["objective.options.student_temp", "greater than 0"]),
        ("train.max_steps=1e30", ["train.max_steps", "100,000,000"]),
        ("train.max_steps=1.0e+30", ["train.max_steps", "100,000,000"]),
        ("train.max_steps=true", ["train.max_steps", "whole number"]),
        ("train.max_steps=1000000000", ["train.max_steps", "100000000"]),
        ("objective.options.views.local_crops=1e6", ["objective.options.views.local_crops", "32"]),
        ("objective.options.views.local_crops=1000000", ["objective.options.views.local_crops", "32"]),
        ("objective.options.views.blur_prob=2", ["objective.options.views.blur_prob"]),
        ("train.accumulate_grad_batches=1000000000", ["train.accumulate_grad_batches", "4096"]),
    ],
)
def test_bad_config_values_exit_2_naming_the_field(config_file, capsys, override, names):
    code, text = _pretrain(config_file, capsys, override)
    assert code == 2, text
    assert "Traceback" not in text
    for name in names:
        assert name in text


def test_unknown_backbone_kwarg_is_named_with_a_suggestion(config_file, capsys):
    code, text = _pretrain(config_file, capsys, "backbone.kwargs={depthh: 2, embed_dim: 48, num_heads: 2}")
    assert code == 2 and "backbone.kwargs.depthh" in text and "did you mean 'backbone.kwargs.depth'" in text


def test_tampered_checkpoint_is_a_config_error_naming_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(2)}}, good)
    assert check_checkpoint(good)["global_step"] == 3

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    tampered = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "state_dict": {}, "x": Payload()}, tampered, pickle_module=pickle)
    with pytest.raises(ConfigError, match="last.ckpt is not a readable insitu checkpoint") as info:
        check_checkpoint(tampered)
    assert "weights_only=False" not in str(info.value) and "weights_only" not in str(info.value)
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ConfigError, match="cut.ckpt is not a readable insitu checkpoint"):
        check_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ConfigError, match="no global_step"):
        check_checkpoint(foreign)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((5, 8, 8), np.uint8), np.zeros((3, 1), np.uint8), "3 labels for 5 images"),
        (np.zeros(5, np.uint8), None, r"shape \(5,\)"),
        (np.zeros((5, 2, 2, 2, 2, 2), np.uint8), None, r"shape \(5, 2, 2, 2, 2, 2\)"),
        (np.zeros((5, 8, 8, 7), np.uint8), None, "C = 1, 3 or 4"),
    ],
)
def test_inconsistent_npz_is_a_data_error_naming_the_file(tmp_path, images, labels, match):
    path = tmp_path / "bad.npz"
    arrays = {"train_images": images} | ({"train_labels": labels} if labels is not None else {})
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        create_domain("images").scan(path)
    assert "bad.npz" in str(info.value)


def test_cli_scan_of_bad_npz_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((5, 8, 8), np.uint8), train_labels=np.zeros(3, np.uint8))
    assert main(["-q", "scan", str(path), "--out", str(tmp_path / "m")]) == 2
    assert "3 labels for 5 images" in " ".join(capsys.readouterr().err.split())


def test_geotiff_folder_mixing_band_counts_quarantines_the_minority(tmp_path):
    for i in range(2):
        write_scene(tmp_path / "data" / f"rgbn_{i}.tif", bands=4, height=16, width=16, seed=i)
    write_scene(tmp_path / "data" / "pan.tif", bands=1, height=16, width=16)
    manifest = create_domain("geotiff", {"tile_size": 16}).scan(tmp_path / "data")
    assert {Path(i.path).name for i in manifest.items} == {"rgbn_0.tif", "rgbn_1.tif"}
    (bad,) = manifest.quarantine
    assert Path(bad.path).name == "pan.tif" and bad.reason == "band count differs from the other scenes"
    assert "1 bands" in bad.message and "have 4" in bad.message


def test_resume_from_a_tampered_checkpoint_exits_2_naming_it(tmp_path, capsys):
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain
    from tests.conftest import tiny_config, write_shapes

    raw = tiny_config(write_shapes(tmp_path / "shapes"), tmp_path / "runs")
    pretrain(load_config(raw), quiet=True)
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:200])  # damaged in transfer, or tampered
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["--quiet", "pretrain", "-c", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    message = err[err.index("ConfigError") :]  # the first run's Lightning logs come before it
    assert "last.ckpt is not a readable insitu checkpoint" in message and "weights_only" not in message
