"""Declared needs, checked once (issue 37): every registered component states what it requires of a run
(insitu.registry.Needs, Domain.yields, each Options model's own checks), and config validation refuses a
config that misses one with a typed error naming the key and the fix, before anything loads: the CLI exits 2
and prints no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from insitu.cli import main
from insitu.config import load_config
from insitu.errors import ConfigError
from insitu.objectives import create_objective
from insitu.pipelines import view_cache
from insitu.registry import ADAPTERS, CLASSIFICATION_HEADS, DOMAINS, OBJECTIVES, SEGMENTATION_HEADS, Needs
from tests.conftest import TINY_BACKBONE, tiny_config, tiny_package, write_shapes

HEADS = [("classification", CLASSIFICATION_HEADS), ("segmentation", SEGMENTATION_HEADS)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("needs") / "shapes", n_per_class=1)


def _pretrain(tmp_path: Path, capsys: pytest.CaptureFixture, raw: dict) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["-q", "pretrain", "-c", str(path)])
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())


def _wrong_settings(root: Path) -> list[tuple[str, dict, list[str]]]:
    """(id, config sections, what the message must name): one wrong setting for every registered component."""
    cases = [
        (f"adapter-{k}", {"adapter": {"name": k, "options": {"blocks": 1, "no_such_option": 1}}}, ["'adapter.options.no_such_option'", f"adapter kind {k!r}"])
        for k in ADAPTERS.names()
    ]
    cases += [
        (f"objective-{n}", {"objective": {"name": n, "options": {"no_such_option": 1}}}, ["objective.options.no_such_option"])
        for n in OBJECTIVES.names()
    ]
    cases += [
        (f"domain-{d}", {"data": {"domain": d, "root": str(root), "options": {"no_such_option": 1}}}, ["data.options.no_such_option"])
        for d in DOMAINS.names()
    ]
    for task, registry in HEADS:
        for head in registry.names():
            key = next(k for k in ("hidden_dim", "decoder_dim") if k not in registry.options(head).model_fields)
            ds = {"task": task, "head": {"name": head, "options": {key: 16}}}
            cases.append((f"{task}-head-{head}", {"downstream": ds}, [f"downstream.head.options.{key}", f"{registry.kind} {head!r}"]))
    return cases


WALK = _wrong_settings(Path("."))


@pytest.mark.parametrize(("case", "sections", "names"), WALK, ids=[c[0] for c in WALK])
def test_every_registered_component_with_a_wrong_setting_exits_2_naming_it(shapes, tmp_path, capsys, case, sections, names):
    if "data" in sections:
        sections = {"data": {**sections["data"], "root": str(shapes)}}
    code, text = _pretrain(tmp_path, capsys, tiny_config(shapes, tmp_path / "runs", **sections))
    assert code == 2, text
    assert "ConfigError" in text and "Traceback" not in text
    for name in names:
        assert name in text, text


def test_every_objective_declares_its_needs():
    optional = {"convirt": {"text_encoder": "all-minilm-l6-v2"}, "clip": {"text_encoder": "all-minilm-l6-v2"}}
    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name)
        if name == "self_distill":
            options = {"adapter": "x", "base": "simclr"}
        else:
            options = optional.get(name, {})
        needs = cls.needs(cls.Options.model_validate(options))
        assert isinstance(needs, Needs) and needs.items in ("images", "pairs", "clips", "fractals") and needs.frames >= 1
        if name not in ("sigreg", "self_distill"):  # wrappers take the teacher flag of their base
            assert needs.teacher == cls.needs_teacher and needs.cacheable_views == cls.cacheable_views
    assert OBJECTIVES.get("rsp").needs(OBJECTIVES.options("rsp").model_validate({"speeds": [1, 3]})).frames == 10  # (4 - 1) * 3 + 1
    assert OBJECTIVES.get("convirt").needs(OBJECTIVES.options("convirt").model_validate(optional["convirt"])).items == "pairs"
    wrapped = OBJECTIVES.get("sigreg").needs(OBJECTIVES.options("sigreg").model_validate({"base": "simclr"}))
    assert wrapped.teacher is False and wrapped.cacheable_views is False  # the base's teacher; no cache through a wrapper


VIDEO_CLIPS = {"domain": "video", "options": {"mode": "clips", "clip_frames": 4}}
RSP = {"name": "rsp", "options": {"proj_dim": 8, "hidden_dim": 8}}
NEEDS = [
    # the case: simclr compares two views, found at config time instead of a step-time traceback
    ("simclr-views", {"objective": {"name": "simclr", "options": {"views": {"local_crops": 2}}}}, ["objective.options", "views.local_crops=0"]),
    ("dino-one-view", {"objective": {"name": "dino", "options": {"views": {"global_crops": 1, "local_crops": 0}}}}, ["pairs of views"]),
    ("glare-no-term", {"objective": {"name": "glare", "options": {"global_term": False, "local": {"enabled": False}, "regional": {"enabled": False}}}}, ["at least one"]),
    ("glare-region-one-crop", {"objective": {"name": "glare", "options": {"global_term": False, "local": {"enabled": False}, "views": {"global_crops": 1}}}}, ["views.global_crops >= 2"]),
    ("convirt-on-images", {"objective": {"name": "convirt", "options": {"text_encoder": "./absent"}}}, ["'data.domain'", "set data.domain: pairs"]),
    ("rsp-on-images", {"objective": RSP}, ["'data.options.mode'", "mode: clips"]),
    ("rsp-short-clips", {"objective": RSP, "data": VIDEO_CLIPS}, ["'data.options.clip_frames'", "at least 7 frames"]),
    ("cvrl-on-frames", {"objective": {"name": "cvrl", "options": {}}, "data": {"domain": "video"}}, ["mode: clips"]),
    ("dino-on-clips", {"data": VIDEO_CLIPS}, ["'data.options.mode'", "mode: frames"]),
    ("sigreg-unknown-base", {"objective": {"name": "sigreg", "options": {"base": "simclrr"}}}, ["objective.options.base", "Did you mean 'simclr'"]),
    ("sigreg-bad-base-option", {"objective": {"name": "sigreg", "options": {"base": "simclr", "base_options": {"temprature": 1}}}}, ["objective.options.base_options.temprature"]),
    ("sigreg-base-needs", {"objective": {"name": "sigreg", "options": {"base": "rsp"}}}, ["objective 'sigreg' trains on T×C×H×W clips"]),
    ("cache-glare", {"objective": {"name": "glare"}, "adapter": {"blocks": 1}, "train": {"cached_views": 2}}, ["'train.cached_views'", "objective 'glare'"]),
    ("cache-all-blocks", {"train": {"cached_views": 2}}, ["'adapter.options.blocks'", "start after block 0"]),
    ("cache-block-0", {"adapter": {"blocks": [0, 1]}, "train": {"cached_views": 2}}, ["'adapter.options.blocks'"]),
    ("cache-last-2-of-2", {"adapter": {"blocks": 2}, "train": {"cached_views": 2}}, ["'adapter.options.blocks'"]),  # TINY_BACKBONE has depth 2
    ("cache-full-finetune", {"adapter": {"blocks": 1}, "train": {"cached_views": 2, "full_finetune": True}}, ["train.full_finetune"]),
    ("cache-device-views", {"adapter": {"blocks": 1}, "train": {"cached_views": 2}, "objective": {"name": "simclr", "options": {"views": {"local_crops": 0, "device": True}}}}, ["views.device"]),
    ("head-unknown", {"downstream": {"head": {"name": "mpl"}}}, ["'downstream.head.name'", "Did you mean 'mlp'"]),
]


@pytest.mark.parametrize(("case", "sections", "names"), NEEDS, ids=[c[0] for c in NEEDS])
def test_a_missing_need_is_a_config_error_naming_the_key(shapes, tmp_path, capsys, case, sections, names):
    raw = tiny_config(shapes, tmp_path / "runs", **sections)
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    for name in names:
        assert name in str(info.value), str(info.value)
    code, text = _pretrain(tmp_path, capsys, raw)
    assert code == 2 and "Traceback" not in text, text


def test_configs_that_meet_the_needs_still_validate(shapes, tmp_path):
    ok = [
        {"objective": RSP, "data": {**VIDEO_CLIPS, "options": {"mode": "clips", "clip_frames": 7}}},
        {"objective": {"name": "cvrl", "options": {}}, "data": VIDEO_CLIPS},
        {"objective": {"name": "glare", "options": {"global_term": False, "views": {"global_crops": 1, "local_crops": 0}}}},
        {"adapter": {"blocks": 1}, "train": {"cached_views": 2}},
        {"adapter": {"blocks": [1]}, "objective": {"name": "simclr", "options": {}}, "train": {"cached_views": 2}},
        {"downstream": {"task": "segmentation", "head": {"name": "fpn", "options": {"decoder_dim": 8}}}},
        {"downstream": {"head": {"name": "mlp", "options": {"hidden_dim": 8}}}},
        {"downstream": {"task": "segmentation", "head": "fpn", "decoder_dim": 8}},  # the old flat shape still loads
        {"downstream": {"head": "mlp", "hidden_dim": 8}},
    ]
    for sections in ok:
        load_config(tiny_config(shapes, tmp_path / "runs", **sections))


def test_overrides_leave_the_callers_dict_as_it_was(shapes, tmp_path):
    raw = tiny_config(shapes, tmp_path / "runs")
    load_config(raw, ["train.cached_views=2", "adapter.options.blocks=1"])
    assert "cached_views" not in raw["train"] and raw["adapter"]["options"]["blocks"] == "all"


def _simclr_source(root: Path):
    from insitu.backbones import create_backbone
    from insitu.config import validate_config
    from insitu.pipelines.data import SampleDataset, ScannedData, fit_normalizer

    bb = create_backbone(TINY_BACKBONE)
    objective = create_objective("simclr", bb.embed_dim, 8, 32, {"hidden_dim": 16, "out_dim": 8}, 10)
    data = ScannedData.scan(validate_config(tiny_config(root, root.parent / "runs"), "t").data)
    items = data.manifest.items
    return bb, SampleDataset(data, items, fit_normalizer(data, items), objective.view_transform(), 32)


def test_view_cache_estimate_is_its_size_and_a_cache_past_the_memory_bound_is_refused(shapes, monkeypatch):
    bb, source = _simclr_source(shapes)
    cache = view_cache.build_view_cache(source, bb, first_block=1, k=3)
    held = sum(t.numel() * t.element_size() for t in cache.tokens)
    assert held == view_cache.cache_bytes(len(source), 3, [17, 17], bb.embed_dim)  # 2 positions of 4×4 patches + CLS
    assert all(t.dtype == torch.float32 for t in cache.tokens)
    limit, why = view_cache.cache_limit_bytes()
    assert 0 < limit <= view_cache.MAX_CACHE_BYTES and why
    monkeypatch.setattr(view_cache, "available_memory_bytes", lambda: 2 * held - 2)  # half of it is just under the cache
    with pytest.raises(ConfigError, match=r"train.cached_views=3 would hold 0.00 GiB .* of memory available now") as info:
        view_cache.build_view_cache(source, bb, first_block=1, k=3)
    assert "lower train.cached_views" in str(info.value)
    monkeypatch.setattr(view_cache, "available_memory_bytes", lambda: 2 * held)
    assert len(view_cache.build_view_cache(source, bb, first_block=1, k=3)) == len(source)


def test_a_package_whose_image_size_is_not_a_multiple_of_its_patch_fails_verification(tmp_path, capsys):
    _, _, path = tiny_package(tmp_path / "pkg", input_info={"domain": "images", "image_size": 32})
    assert main(["-q", "adapter", "verify", str(path)]) == 0
    capsys.readouterr()
    meta = json.loads((path / "insitu.json").read_text())
    meta["input"]["image_size"] = 30  # patch 8: the backbone cannot cut it into patches
    (path / "insitu.json").write_text(json.dumps(meta))
    assert main(["-q", "adapter", "verify", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "AdapterFormatError" in err and "input.image_size 30 is not a multiple of the base's patch size 8" in err
