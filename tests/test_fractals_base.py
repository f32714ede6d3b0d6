"""The fractal generator, base pretraining from scratch, and the shipped base."""

import json

import pytest
import torch
from safetensors.torch import load_file

from insitu.backbones import create_backbone
from insitu.cli import main
from insitu.config import load_config
from insitu.domains.fractals import FractalStream, SystemBank, fractal_images, labelled_fractal_images, render, sample_systems
from insitu.errors import ConfigError
from insitu.weights import shipped_bases, shipped_card
from tests.conftest import tiny_config


def test_systems_respect_the_sigma_factor_range():
    g = torch.Generator().manual_seed(0)
    a, b, probs = sample_systems(200, g)
    sv = torch.linalg.svdvals(a)  # [n, M, 2], descending
    active = probs > 0
    n_maps = active.sum(1)
    sigma = ((sv[..., 0] + 2 * sv[..., 1]) * active).sum(1)
    assert ((n_maps >= 2) & (n_maps <= 4)).all()
    assert (sv[..., 0][active] <= 1.0 + 1e-5).all()  # every map is non-expanding in its largest direction
    # the rescaling keeps the factor inside the paper's range unless clipping sigma1 at 1 pulled it below
    assert (sigma <= 0.5 * (6 + n_maps) + 1e-4).all()
    assert (sigma >= 0.5 * (5 + n_maps) - 1e-4).float().mean() > 0.6
    assert torch.allclose(probs.sum(1), torch.ones(200))


def test_render_and_images_are_seeded_and_non_trivial():
    a, b, p = sample_systems(4, torch.Generator().manual_seed(1))
    colour, cover = render(a, b, p, 32, torch.Generator().manual_seed(2))
    assert colour.shape == (4, 3, 32, 32) and cover.shape == (4, 32, 32)
    assert (cover.flatten(1).mean(1) > 0.02).all()  # every attractor covers part of the image
    x1 = fractal_images(6, 32, torch.Generator().manual_seed(5))
    x2 = fractal_images(6, 32, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and x1.shape == (6, 3, 32, 32)
    assert 0.0 <= float(x1.min()) and float(x1.max()) <= 1.0
    assert not torch.equal(x1, fractal_images(6, 32, torch.Generator().manual_seed(6)))
    it = iter(FractalStream(32, seed=0, chunk=4))
    assert next(it).shape == (3, 32, 32)


def test_base_pretrain_tiny_writes_fp16_weights_and_card(tmp_path, capsys):
    args = [
        "--quiet",
        "base",
        "pretrain",
        "--set",
        f"out_dir={tmp_path}",
        "--set",
        "steps=2",
        "--set",
        "batch_size=4",
        "--set",
        "num_workers=0",
        "--set",
        "backbone.img_size=32",
        "--set",
        "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
        "--set",
        "out_dim=64",
    ]
    assert main(args) == 0
    weights = tmp_path / "fractal_vit_tiny" / "fractal_vit_tiny.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["steps"] == 2 and card["images_seen"] == 8 and card["command"].startswith("insitu")
    assert all(v.dtype == torch.float16 for v in load_file(str(weights)).values())
    bb = create_backbone(
        {
            "name": "vit_tiny_patch16_224",
            "patch_size": 8,
            "img_size": 32,
            "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
            "weights": str(weights),
        }
    )
    assert torch.isfinite(bb.forward_tokens(torch.randn(1, 3, 32, 32))[0]).all()


@pytest.mark.parametrize("name", ["fractal_vit_tiny", "colour_vit_tiny"])
def test_shipped_base_loads_and_is_reproducible(name):
    bases = shipped_bases()
    assert name in bases, "the embedded bases must ship inside the package"
    card = shipped_card(name)
    assert card["steps"] > 0 and card["device"] and card["command"].startswith("insitu base pretrain")
    assert sum(p.stat().st_size for p in bases.values()) < 25 * 2**20  # every shipped base together
    grey = create_backbone({"weights": f"insitu:{name}", "img_size": 64, "in_chans": 1})
    assert grey.source == f"insitu:{name}" and grey.native_size == 64
    assert create_backbone({"weights": f"insitu:{name}", "img_size": 64, "in_chans": 1}).fingerprint == grey.fingerprint
    if name == "colour_vit_tiny":  # continued from the first base, which stays loadable by name
        assert card["init"] == "insitu:fractal_vit_tiny" and card["config"]["colour_layout"] > 0
        assert grey.fingerprint != create_backbone({"weights": "insitu:fractal_vit_tiny", "img_size": 64, "in_chans": 1}).fingerprint
    with pytest.raises(ConfigError, match="is not a shipped base"):
        shipped_card("nope")


def test_config_can_name_the_shipped_base(tmp_path, shapes_dir):
    raw = tiny_config(shapes_dir, tmp_path)
    raw["backbone"] = {"weights": "insitu:fractal_vit_tiny", "img_size": 32}
    assert load_config(raw).backbone.weights == "insitu:fractal_vit_tiny"
    raw["backbone"]["weights"] = "insitu:missing"
    with pytest.raises(ConfigError, match="not a shipped base"):
        load_config(raw)


def test_shipped_base_config_validates():
    from insitu.pipelines.base_pretrain import load_base_config
    from tests.conftest import REPO

    cfg = load_base_config(REPO / "configs" / "base" / "fractal_vit_tiny.yaml", [])
    assert cfg.name == "fractal_vit_tiny" and cfg.steps > 0
    for path in sorted((REPO / "configs" / "base").glob("*.yaml")):  # the GPU recipe and the colour-texture attempt too
        other = load_base_config(path, [])
        assert other.name == path.stem or other.name == path.stem.removesuffix("_gpu"), path
    with pytest.raises(ConfigError):
        load_base_config(REPO / "configs" / "base" / "fractal_vit_tiny.yaml", ["stepz=3"])


def test_multi_instance_labels_match_the_drawn_systems():
    bank = SystemBank(50, seed=3)
    images, labels = labelled_fractal_images(32, bank, 32, torch.Generator().manual_seed(1))
    again, labels2 = labelled_fractal_images(32, bank, 32, torch.Generator().manual_seed(1))
    assert torch.equal(images, again) and torch.equal(labels, labels2)
    assert images.shape == (32, 3, 32, 32) and labels.shape == (32, 50)
    per_image = labels.sum(1)
    assert (per_image >= 1).all() and (per_image <= 3).all() and (per_image > 1).any()
    # a one-system bank: every image is labelled with it and nothing else
    _, only = labelled_fractal_images(8, SystemBank(1), 32, torch.Generator().manual_seed(2))
    assert torch.equal(only, torch.ones(8, 1))
    # the same system rendered twice covers similar pixels; different systems less so
    a, b, p = bank.a[:2], bank.b[:2], bank.probs[:2]
    g = torch.Generator().manual_seed(0)
    c1 = render(a, b, p, 32, g)[1]
    c2 = render(a, b, p, 32, g)[1]

    def iou(x, y):
        return float((x * y).sum() / ((x + y) > 0).sum())

    assert iou(c1[0], c2[0]) > iou(c1[0], c2[1]) and iou(c1[1], c2[1]) > iou(c1[1], c2[0])


def test_base_pretrain_mip_tiny(tmp_path):
    args = ["--quiet", "base", "pretrain", "--set", f"out_dir={tmp_path}", "--set", "objective=mip"]
    for o in ("steps=2", "batch_size=4", "num_workers=0", "num_systems=8", "grey_prob=0.5", "backbone.img_size=32"):
        args += ["--set", o]
    args += ["--set", "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}"]
    assert main(args) == 0
    weights = tmp_path / "fractal_vit_tiny" / "fractal_vit_tiny.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert "multi-instance" in card["training"] and card["steps"] == 2 and 0.0 <= card["final_set_acc"] <= 1.0
    assert card["config"]["objective"] == "mip" and card["config"]["num_systems"] == 8
    state = load_file(str(weights))
    assert not any(k.startswith("head") for k in state)  # only the ViT ships, not the bank's classifier


def test_shipped_base_warns_when_kwargs_would_be_ignored(caplog):
    with caplog.at_level("WARNING", logger="insitu"):
        create_backbone({"weights": "insitu:fractal_vit_tiny", "img_size": 32, "kwargs": {"depth": 2}})
    assert "ignored" in caplog.text and "depth" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="insitu"):
        create_backbone({"weights": "insitu:fractal_vit_tiny", "img_size": 32, "kwargs": {"depth": 6}})
    assert "ignored" not in caplog.text


def test_hsv_to_rgb_matches_colorsys():
    import colorsys

    from insitu.domains.fractals import hsv_to_rgb

    hsv = torch.rand(50, 3, generator=torch.Generator().manual_seed(0))
    ours = hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2])
    ref = torch.tensor([colorsys.hsv_to_rgb(*map(float, v)) for v in hsv])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_colour_texture_labels_are_seeded_and_carry_colour_and_texture():
    from insitu.domains.fractals import NUM_TEXTURES, TEXTURE_SCALES, labelled_colour_texture_images, textured_backgrounds

    bank = SystemBank(20, seed=1)
    out = labelled_colour_texture_images(16, bank, 32, torch.Generator().manual_seed(4), hue_bins=6)
    again = labelled_colour_texture_images(16, bank, 32, torch.Generator().manual_seed(4), hue_bins=6)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    images, systems, hues, texture = out
    assert images.shape == (16, 3, 32, 32) and systems.shape == (16, 20) and hues.shape == (16, 6)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    # every image has 1-3 instances, each with one hue class: at least one hue, never more than its instances
    assert (hues.sum(1) >= 1).all() and (hues.sum(1) <= 3).all()
    assert texture.dtype == torch.long and int(texture.min()) >= 0 and int(texture.max()) < NUM_TEXTURES
    # texture classes carry frequency: a finer scale bin has larger pixel-to-pixel changes (gratings, family 0)
    bg, cls = textured_backgrounds(400, 64, torch.Generator().manual_seed(0))
    grad = (bg[..., 1:] - bg[..., :-1]).abs().mean((1, 2, 3)) / bg.std((1, 2, 3)).clamp_min(1e-6)
    by_scale = [float(grad[cls == s].mean()) for s in range(TEXTURE_SCALES)]  # family 0 = classes 0..3
    assert by_scale == sorted(by_scale), by_scale


def test_base_pretrain_continues_a_shipped_base_with_colour_and_texture(tmp_path):
    args = ["--quiet", "base", "pretrain", "--set", f"out_dir={tmp_path}", "--set", "objective=mip", "--set", "name=ct"]
    for o in (
        "steps=2",
        "batch_size=4",
        "num_workers=0",
        "num_systems=8",
        "grey_prob=0.5",
        "hue_bins=4",
        "backbone.img_size=32",
        "colour_layout=2",
    ):
        args += ["--set", o]
    args += ["--set", "backbone.weights=insitu:fractal_vit_tiny"]
    assert main(args) == 0
    weights = tmp_path / "ct" / "ct.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    shipped = shipped_card("fractal_vit_tiny")
    assert card["init"] == "insitu:fractal_vit_tiny" and "continued from insitu:fractal_vit_tiny" in card["training"]
    assert card["images_seen"] == 8 and card["images_seen_total"] == shipped["images_seen"] + 8
    assert "hue classes" in card["data"] and 0.0 <= card["final_texture_acc"] <= 1.0
    assert "colour on a 2x2 grid" in card["training"] and card["final_layout_mse"] > 0.0
    state = load_file(str(weights))
    assert not any("head" in k for k in state)  # the system, hue, texture and colour-layout heads stay behind
    # the continued weights differ from the shipped ones: training touched them
    start = create_backbone({"weights": "insitu:fractal_vit_tiny", "img_size": 32})
    assert not torch.equal(state["blocks.0.attn.qkv.weight"].float(), start.vit.blocks[0].attn.qkv.weight.detach().half().float())


def test_colour_layout_target_is_the_inputs_own_pooled_colour():
    from insitu.pipelines.base_pretrain import BasePretrainConfig, MIPModule

    cfg = BasePretrainConfig(objective="mip", num_systems=4, colour_layout=2, colour_layout_weight=0.5, grey_prob=0.0)
    cfg.backbone.img_size = 32
    module = MIPModule(cfg)
    assert module.layout_head.out_features == 3 * 2 * 2
    # a head that predicts the exact pooled colour gives zero layout error: zero the head, use an image whose
    # 2x2 pooled colour is 0 everywhere and is unchanged by a flip (so the random flip cannot matter)
    torch.nn.init.zeros_(module.layout_head.weight), torch.nn.init.zeros_(module.layout_head.bias)
    x = torch.zeros(2, 3, 32, 32)
    labels = torch.zeros(2, 4)
    logged: dict[str, float] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(torch.as_tensor(value).detach()))  # type: ignore[method-assign]
    module.training_step([x, labels], 0)
    assert logged["train/layout_mse"] == 0.0
    # a colour the head does not predict: the error is the mean square of the pooled colours (hand-computed)
    x[:, 0] = 1.0  # red everywhere: pooled target is 1 on the 4 red cells, 0 on the 8 others
    loss = float(module.training_step([x, labels], 0).detach())
    assert abs(logged["train/layout_mse"] - 4 / 12) < 1e-6
    # the weight scales that term alone: the same (flip-invariant) batch with weight 1.5 instead of 0.5
    module.cfg.colour_layout_weight = 1.5
    assert abs(float(module.training_step([x, labels], 0).detach()) - loss - 1.0 * 4 / 12) < 1e-5


def test_bank_seed_keeps_the_classes_while_seed_varies():
    from insitu.pipelines.base_pretrain import BasePretrainConfig, system_bank

    same = system_bank(BasePretrainConfig(objective="mip", num_systems=6, seed=3, bank_seed=0))
    reference = SystemBank(6, seed=0)
    assert torch.equal(same.a, reference.a) and torch.equal(same.probs, reference.probs)
    # without bank_seed the run's seed picks the bank, as before
    own = system_bank(BasePretrainConfig(objective="mip", num_systems=6, seed=3))
    assert torch.equal(own.a, SystemBank(6, seed=3).a) and not torch.equal(own.a, reference.a)
