"""Every registered component of every kind resolves, builds and validates its typed options (insitu.registry)."""

import json

import pytest
import torch

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import apply_package, load_package, save_package
from insitu.backbones import create_backbone
from insitu.cli import main
from insitu.config import load_config, validate_options
from insitu.errors import ConfigError
from insitu.heads import create_head, head_options
from insitu.registry import ADAPTERS, CLASSIFICATION_HEADS, DOMAINS, OBJECTIVES, REGISTRIES, SEGMENTATION_HEADS
from tests.conftest import TINY_BACKBONE, tiny_config, write_shapes

EVERY_NAME = [(registry.kind, name) for registry in REGISTRIES for name in registry.names()]
REGISTRY = {registry.kind: registry for registry in REGISTRIES}


@pytest.fixture(scope="module")
def bb():
    return create_backbone(TINY_BACKBONE)


@pytest.mark.parametrize(("kind", "name"), EVERY_NAME)
def test_every_registered_name_resolves_with_typed_options(kind, name):
    registry = REGISTRY[kind]
    assert registry.get(name) is not None
    model = registry.options(name)
    required = [field for field, info in model.model_fields.items() if info.is_required()]
    if not required:
        validate_options(model, {}, "options", "test")  # the defaults are valid and within bounds
    else:  # e.g. convirt's text_encoder: an error naming each required key
        with pytest.raises(ConfigError, match="missing required key 'options." + required[0]):
            validate_options(model, {}, "options", "test")


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_every_adapter_kind_builds_with_its_defaults_and_round_trips_as_kind_and_options(bb, kind, tmp_path):
    adapters = create_adapters(bb, {"kind": kind, "blocks": 1})
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(AdaptedBackbone(bb, adapters).forward_tokens(x)[0], bb.forward_tokens(x)[0])
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_package(tmp_path / kind, bb, adapters)
    stored = json.loads((path / "insitu.json").read_text())["adapter"]
    assert set(stored) == {"kind", "dim", "options"} and stored["options"]["blocks"] == [bb.num_blocks - 1]
    assert stored["options"] == ADAPTERS.options(kind).model_validate(stored["options"]).model_dump(mode="json", exclude={"kind"})
    assert torch.equal(apply_package(path, bb).forward_tokens(x)[0], bb.forward_tokens(x, adapters)[0])


def test_every_head_is_built_from_the_downstream_options_and_refuses_keys_it_does_not_take():
    offered = {"hidden_dim": 16, "levels": 2, "decoder_dim": 8}
    for task, registry in (("classification", CLASSIFICATION_HEADS), ("segmentation", SEGMENTATION_HEADS)):
        for name in registry.names():
            own = head_options(task, name, offered)
            assert set(own) == set(registry.options(name).model_fields)
            assert isinstance(create_head(task, name, 8, 3, **own), registry.get(name))
            with pytest.raises(ConfigError, match=f"for {registry.kind} '{name}':\n  unknown key 'options.no_such_option'"):
                create_head(task, name, 8, 3, **own, no_such_option=1)
    with pytest.raises(ConfigError, match="'options.hidden_dim': Input should be greater than 0"):
        create_head("classification", "mlp", 8, 3, hidden_dim=0)


@pytest.mark.parametrize(
    ("registry", "typo", "meant"),
    [
        (ADAPTERS, "lroa", "lora"),
        (OBJECTIVES, "simclrr", "simclr"),
        (DOMAINS, "geotif", "geotiff"),
        (CLASSIFICATION_HEADS, "mpl", "mlp"),
        (SEGMENTATION_HEADS, "fnp", "fpn"),
    ],
)
def test_unknown_names_suggest_the_closest(registry, typo, meant):
    with pytest.raises(ConfigError, match=f"Unknown {registry.kind} '{typo}'. Did you mean '{meant}'"):
        registry.options(typo)


def test_a_name_outside_the_table_cannot_be_registered():
    with pytest.raises(ValueError, match="not in its registry's table"):
        OBJECTIVES.register("mine")


def test_unknown_adapter_kind_in_a_config_is_named(tmp_path):
    raw = tiny_config(write_shapes(tmp_path / "d", n_per_class=1), tmp_path / "runs")
    with pytest.raises(ConfigError, match="Unknown adapter kind 'lroa'. Did you mean 'lora'"):
        load_config(raw, ["adapter.kind=lroa"])


def test_an_option_of_another_adapter_kind_is_refused_naming_its_kind(tmp_path):
    root = write_shapes(tmp_path / "d", n_per_class=1)
    with pytest.raises(
        ConfigError, match="unknown key 'adapter.options.bottleneck_dim': an option of adapter kind 'bottleneck', 'sequential' and 'spectral', not of 'lora'"
    ):
        load_config(tiny_config(root, tmp_path), ["adapter.kind=lora"])  # the tiny config sets bottleneck_dim
    with pytest.raises(ConfigError, match="unknown key 'adapter.options.rank': an option of adapter kind 'lora', not of 'bottleneck'"):
        load_config(tiny_config(root, tmp_path), ["adapter.options.rank=4"])
    cfg = load_config(tiny_config(root, tmp_path), ["adapter={name: lora, options: {rank: 4, blocks: 1}}"])
    assert (cfg.adapter.name, cfg.adapter.options["rank"], cfg.adapter.options["targets"]) == ("lora", 4, ["qkv"])
    assert cfg == load_config(tiny_config(root, tmp_path), ["adapter={kind: lora, rank: 4, blocks: 1}"])  # the old flat shape


@pytest.mark.parametrize("kind", ADAPTERS.names())
def test_a_package_in_the_older_flat_layout_still_loads(bb, kind, tmp_path, capsys):
    """insitu.json's adapter section before issue 18: ``{kind, blocks, <options>..., dim}`` in one mapping."""
    adapters = create_adapters(bb, {"kind": kind, "blocks": "all"})
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_package(tmp_path / kind, bb, adapters)
    meta = json.loads((path / "insitu.json").read_text())
    section = meta["adapter"]
    meta["adapter"] = {"kind": kind, "blocks": section["options"]["blocks"], **section["options"], "dim": section["dim"]}
    (path / "insitu.json").write_text(json.dumps(meta))
    assert load_package(path).meta.adapter == section
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(apply_package(path, bb).forward_tokens(x)[0], bb.forward_tokens(x, adapters)[0])
    assert main(["--quiet", "adapter", "inspect", str(path)]) == 0
    capsys.readouterr()
