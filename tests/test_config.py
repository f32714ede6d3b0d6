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
    assert cfg.adapter.options["blocks"] == [1]  # an old flat override key lands in the section's options
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


# One shape for every component section: {name, options}; the older flat shapes still load.


def test_old_flat_adapter_and_head_load_as_the_new_shape_with_one_note(tmp_path, shapes_dir, caplog, monkeypatch):
    import insitu.raw_config

    monkeypatch.setattr(insitu.raw_config, "_noted", set())  # each note is said once per process: start from none said
    base = tiny_config(shapes_dir, tmp_path)
    new = {
        **base,
        "adapter": {"name": "lora", "options": {"blocks": 1, "rank": 4}},
        "downstream": {"task": "segmentation", "head": {"name": "fpn", "options": {"decoder_dim": 8}}},
    }
    old = {
        **base,
        "adapter": {"kind": "lora", "blocks": 1, "rank": 4},
        "downstream": {"task": "segmentation", "head": "fpn", "decoder_dim": 8, "hidden_dim": 256},  # 256: the old default
    }
    with caplog.at_level("WARNING", logger="insitu"):
        cfg_new = load_config(new)
    assert not [r for r in caplog.records if "Deprecated" in r.message]
    with caplog.at_level("WARNING", logger="insitu"):
        cfg_old = load_config(old)
    notes = [r.message for r in caplog.records if "Deprecated config shape" in r.message]
    assert len(notes) == 2 and all("\n" not in n for n in notes), notes
    assert "adapter: {name: lora, options: {blocks: 1, rank: 4}}" in notes[0]
    assert cfg_old == cfg_new and cfg_old.downstream.head.options == {"decoder_dim": 8}  # completed, `levels` is downstream.layers'
    assert cfg_new.adapter.options == {"blocks": 1, "rank": 4, "alpha": 16.0, "targets": ["qkv"]}  # kind is the name


def test_the_resolved_config_is_written_in_the_new_shape_and_reloads_unchanged(tmp_path, shapes_dir, caplog):
    raw = tiny_config(shapes_dir, tmp_path, downstream={"head": "mlp", "hidden_dim": 16})
    raw["adapter"] = {"kind": "bottleneck", "blocks": 1, "bottleneck_dim": 8}
    cfg = load_config(raw)
    dump_config(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["adapter"] == {"name": "bottleneck", "options": {"blocks": 1, "bottleneck_dim": 8, "scale": 0.1}}
    assert written["downstream"]["head"] == {"name": "mlp", "options": {"hidden_dim": 16}}
    assert not {"hidden_dim", "decoder_dim"} & set(written["downstream"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="insitu"):
        assert load_config(tmp_path / "config.yaml") == cfg
    assert not [r for r in caplog.records if "Deprecated" in r.message]


def test_an_old_run_folders_resolved_config_still_loads(tmp_path, shapes_dir):
    """config.yaml as insitu wrote it before {name, options}: the adapter flat, every head option dumped at its default."""
    old = tiny_config(shapes_dir, tmp_path)
    old["adapter"] = {"kind": "sequential", "blocks": [1], "bottleneck_dim": 8, "scale": 0.1}
    old["downstream"] = {"task": "classification", "head": "linear", "mode": "head", "steps": 200, "hidden_dim": 256, "decoder_dim": 64, "layers": 4}
    path = write(tmp_path, old)
    cfg = load_config(path)
    assert (cfg.adapter.name, cfg.adapter.options["blocks"]) == ("sequential", [1])
    assert (cfg.downstream.head.name, cfg.downstream.head.options) == ("linear", {})


def test_old_override_keys_land_in_the_new_shape(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path, downstream={"task": "segmentation", "head": {"name": "fpn", "options": {"decoder_dim": 8}}})
    cfg = load_config(raw, ["adapter.kind=lora", "adapter.options={blocks: 1}", "downstream.decoder_dim=16", "downstream.head=upernet"])
    assert (cfg.adapter.name, cfg.adapter.options["blocks"]) == ("lora", 1)
    assert (cfg.downstream.head.name, cfg.downstream.head.options) == ("upernet", {"decoder_dim": 16})  # the head's options kept
    cfg = load_config(raw, ["downstream.head={name: linear}"])  # a whole section replaces the section
    assert (cfg.downstream.head.name, cfg.downstream.head.options) == ("linear", {})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"adapter": {"name": "bottleneck", "options": {"bottlenek_dim": 8}}},
            "unknown key 'adapter.options.bottlenek_dim'; did you mean 'adapter.options.bottleneck_dim'? (adapter kind 'bottleneck' takes",
        ),
        ({"adapter": {"name": "sequential", "options": {"rank": 4}}}, "'adapter.options.rank': an option of adapter kind 'lora', not of 'sequential'"),
        ({"adapter": {"name": "lora", "options": {"kind": "lora"}}}, "'adapter.options.kind': adapter kind 'lora' has it from adapter.name"),
        ({"adapter": {"name": "lorra"}}, "'adapter.name': Unknown adapter kind 'lorra'. Did you mean 'lora'?"),
        ({"adapter": {"kind": "lora", "name": "lora"}}, "'adapter' has both kind"),
        (
            {"downstream": {"head": {"name": "mlp", "options": {"hiden_dim": 8}}}},
            "unknown key 'downstream.head.options.hiden_dim'; did you mean 'downstream.head.options.hidden_dim'? (classification head 'mlp'",
        ),
        (
            {"downstream": {"head": {"name": "linear", "options": {"hidden_dim": 8}}}},
            "'downstream.head.options.hidden_dim': an option of classification head 'mlp', not of 'linear' (classification head 'linear' takes no",
        ),
        (
            {"downstream": {"task": "segmentation", "head": "linear", "decoder_dim": 8}},  # old flat: refused as before, now naming the head
            "'downstream.head.options.decoder_dim': an option of segmentation head 'fpn' and 'upernet', not of 'linear'",
        ),
        (
            {"downstream": {"task": "segmentation", "head": {"name": "fpn", "options": {"levels": 2}}}},
            "'downstream.head.options.levels': segmentation head 'fpn' has it from downstream.layers",
        ),
        ({"downstream": {"task": "segmentation", "head": {"name": "mlp"}}}, "'downstream.head.name': Unknown segmentation head 'mlp'"),
        (
            {"objective": {"name": "simclr", "options": {"temprature": 0.1}}},
            "unknown key 'objective.options.temprature'; did you mean 'objective.options.temperature'? (objective 'simclr' takes",
        ),
        ({"data": {"options": {"chanels": 1}}}, "did you mean 'data.options.channels'? (domain 'images' takes"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, str) else None,
)
def test_a_key_a_component_does_not_take_names_the_component_and_the_key(tmp_path, shapes_dir, section, message):
    raw = tiny_config(shapes_dir, tmp_path)
    for key, value in section.items():
        raw[key] = {**raw.get(key, {}), **value} if key == "data" else value
    with pytest.raises(ConfigError) as exc:
        load_config(raw)
    assert message in str(exc.value), str(exc.value)
