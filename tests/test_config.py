from pathlib import Path

import pytest
import yaml

from insitu.config import dump_config, load_config
from insitu.errors import ConfigError
from insitu.raw_config import apply_override, deep_merge
from tests.conftest import tiny_config


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_valid_config_and_overrides(tmp_path, shapes_dir):
    path = write(tmp_path, tiny_config(shapes_dir, tmp_path / "runs"))
    cfg = load_config(path, ["train.max_steps=7", "adapter.blocks=[1]", "objective.options.views.local_crops=2"])
    assert cfg.train.max_steps == 7
    assert cfg.adapter.blocks == [1]
    assert cfg.objective.options["views"]["local_crops"] == 2
    assert cfg.objective.options["student_temp"] == 0.1  # defaults filled in by the objective's schema


def test_unknown_key_names_key_file_and_suggests(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["train"]["max_step"] = 3
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'; did you mean 'train.max_steps'") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_unknown_top_level_section(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["trainr"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'; did you mean 'trainer'"):
        load_config(raw)


def test_wrong_type_names_the_key(tmp_path, shapes_dir):
    with pytest.raises(ConfigError, match=r"'train.batch_size'.*got 'many'"):
        load_config(tiny_config(shapes_dir, tmp_path), ["train.batch_size=many"])


def test_missing_path_names_key(tmp_path, shapes_dir):
    with pytest.raises(ConfigError, match=r"'data.root' points at .*nowhere, which does not exist"):
        load_config(tiny_config(tmp_path / "nowhere", tmp_path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file .*absent.yaml does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_domain_and_objective_options_are_validated(tmp_path, shapes_dir):
    with pytest.raises(ConfigError, match=r"unknown key 'data.options.chanels'; did you mean 'data.options.channels'"):
        load_config(tiny_config(shapes_dir, tmp_path), ["data.options.chanels=1"])
    with pytest.raises(ConfigError, match=r"Unknown objective 'dnio'. Did you mean 'dino'"):
        load_config(tiny_config(shapes_dir, tmp_path), ["objective.name=dnio"])
    with pytest.raises(ConfigError, match=r"Unknown domain 'imagse'. Did you mean 'images'"):
        load_config(tiny_config(shapes_dir, tmp_path), ["data.domain=imagse"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_override({}, "train.max_steps")


def test_resolved_config_round_trips(tmp_path, shapes_dir):
    cfg = load_config(tiny_config(shapes_dir, tmp_path))
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_deep_merge_descends_copies_and_keeps_leaves_whole():
    base = {"a": {"x": 1, "y": 2}, "kwargs": {"p": 1, "q": 2}, "keep": 3}
    extra = {"a": {"y": 20, "z": [1]}, "kwargs": {"p": 10}}
    out = deep_merge(base, extra, leaves={"kwargs"})
    assert out == {"a": {"x": 1, "y": 20, "z": [1]}, "kwargs": {"p": 10}, "keep": 3}
    assert base == {"a": {"x": 1, "y": 2}, "kwargs": {"p": 1, "q": 2}, "keep": 3}  # inputs untouched
    out["a"]["z"].append(2)
    assert extra["a"]["z"] == [1]  # the result does not share extra's values
    assert deep_merge(base, extra)["kwargs"] == {"p": 10, "q": 2}  # without leaves every mapping merges
