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
from insitu.pipelines.base_pretrain import distinct_images, init_streams, next_stream_offset
from insitu.weights import shipped_bases, shipped_card
from tests.conftest import REPO, tiny_config

BASE_CONFIG = str(REPO / "configs" / "base" / "fractal_vit_tiny.yaml")
# a tiny base run: two steps of a 2-block ViT at 32 px, in the main process
TINY_BASE = [
    "train.max_steps=2",
    "train.batch_size=4",
    "data.num_workers=0",
    "data.image_size=32",
    "backbone.img_size=32",
    "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
]


def base_args(tmp_path, *overrides, command=("base", "pretrain")):
    args = ["--quiet", *command, "-c", BASE_CONFIG, "--set", f"out_dir={tmp_path}"]
    for o in (*TINY_BASE, *overrides):
        args += ["--set", o]
    return args


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


def test_a_continued_base_draws_a_stream_its_chain_never_saw():
    first = next(iter(FractalStream(32, seed=0, chunk=4)))
    # offset 0 is the stream the shipped bases were trained on (seed * 1000 + worker): unchanged
    assert torch.equal(first, fractal_images(4, 32, torch.Generator().manual_seed(0))[0])
    assert not torch.equal(first, next(iter(FractalStream(32, seed=0, chunk=4, offset=1))))
    # the shipped colour base continued fractal_vit_tiny on the same stream before offsets existed:
    # its chain counts the replayed images once
    chain = init_streams("insitu:colour_vit_tiny")
    assert chain == [{"seed": 0, "offset": 0, "images": 153600}, {"seed": 0, "offset": 0, "images": 51200}]
    assert distinct_images(chain) == 153600 and next_stream_offset(chain, 0) == 1 and next_stream_offset(chain, 3) == 0


def test_base_pretrain_tiny_dino_writes_fp16_weights_and_card_in_a_claimed_folder(tmp_path, capsys):
    args = base_args(tmp_path, "objective={name: dino, options: {out_dim: 64, head_input_norm: none}}")
    assert main(args) == 0
    weights = tmp_path / "fractal_vit_tiny" / "fractal_vit_tiny.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["steps"] == 2 and card["images_seen"] == 8 and card["command"].startswith("insitu")
    assert card["training"].startswith("DINO self-distillation from scratch") and card["config"]["objective"]["name"] == "dino"
    assert card["views"]["global_crops"] == 2 and card["final_set_acc"] is None
    owned = json.loads((weights.parent / ".insitu-owned.json").read_text())
    assert owned["command"] == "base pretrain" and {"fractal_vit_tiny.safetensors", "fractal_vit_tiny.json"} <= set(owned["entries"])
    assert not list(weights.parent.glob(".*.tmp*"))  # the atomic writes left no temporary file
    capsys.readouterr()
    assert main(args) == 2  # an earlier base is replaced only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
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


def test_shipped_base_configs_are_ordinary_run_configs(monkeypatch):
    from insitu.pipelines.base_pretrain import load_base_config

    monkeypatch.chdir(REPO)
    cfg = load_base_config(REPO / "configs" / "base" / "fractal_vit_tiny.yaml", [])
    assert cfg.name == "fractal_vit_tiny" and cfg.train.max_steps > 0 and cfg.data.domain == "fractals"
    assert cfg.objective.name == "mip" and cfg.objective.options["num_systems"] == 100 and cfg.train.full_finetune
    for path in sorted((REPO / "configs" / "base").glob("*.yaml")):  # the GPU recipe and the continued bases too
        other = load_base_config(path, [])
        assert other.name == path.stem or other.name == path.stem.removesuffix("_gpu"), path
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_base_config(REPO / "configs" / "base" / "fractal_vit_tiny.yaml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown key 'steps'"):  # the old base-pretrain schema's keys are gone
        load_base_config(REPO / "configs" / "base" / "fractal_vit_tiny.yaml", ["steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'objective.options.out_dim'"):  # dino's option, not mip's
        load_base_config(REPO / "configs" / "base" / "fractal_vit_tiny.yaml", ["objective.options.out_dim=64"])


def test_a_base_run_is_checked_at_config_time(monkeypatch, tmp_path, shapes_dir):
    from insitu.domains import create_domain
    from insitu.pipelines.base_pretrain import load_base_config

    monkeypatch.chdir(REPO)
    path = REPO / "configs" / "base" / "fractal_vit_tiny.yaml"
    with pytest.raises(ConfigError) as err:
        load_base_config(path, ["train.full_finetune=false", "objective={name: simclr}", "data.image_size=32"])
    for key in ("'train.full_finetune'", "'objective.name'", "'data.image_size'"):
        assert key in str(err.value)
    # mip learns the generator's labels: on a folder of images it is refused before anything loads
    raw = tiny_config(shapes_dir, tmp_path)
    with pytest.raises(ConfigError, match="'data.domain': objective 'mip' learns the labels of generated fractals"):
        load_config(raw, ["objective={name: mip}"])
    # the fractals domain has no files: an adapter run on it is a typed error naming what it is for
    with pytest.raises(ConfigError, match="generates its images and has no files"):
        create_domain("fractals").scan(tmp_path)


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


def test_base_pretrain_mip_tiny_through_the_ordinary_pretrain_command(tmp_path):
    # `insitu pretrain -c` runs a base config (data.domain: fractals) like `insitu base pretrain -c`
    args = base_args(tmp_path, "objective.options.num_systems=8", "objective.options.grey_prob=0.5", command=("pretrain",))
    assert main(args) == 0
    weights = tmp_path / "fractal_vit_tiny" / "fractal_vit_tiny.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert "multi-instance" in card["training"] and card["steps"] == 2 and 0.0 <= card["final_set_acc"] <= 1.0
    assert card["config"]["objective"]["name"] == "mip" and card["config"]["objective"]["options"]["num_systems"] == 8
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
    options = "{num_systems: 8, grey_prob: 0.5, hue_bins: 4, colour_layout: 2}"
    args = base_args(tmp_path, "name=ct", f"objective.options={options}", "backbone.weights=insitu:fractal_vit_tiny", "backbone.kwargs={}")
    assert main(args) == 0
    weights = tmp_path / "ct" / "ct.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    shipped = shipped_card("fractal_vit_tiny")
    assert card["init"] == "insitu:fractal_vit_tiny" and "continued from insitu:fractal_vit_tiny" in card["training"]
    assert card["images_seen"] == 8 and card["images_seen_total"] == shipped["images_seen"] + 8
    # a continued run draws a stream its init never saw, so every image it sees is new
    assert card["streams"] == [{"seed": 0, "offset": 0, "images": shipped["images_seen"]}, {"seed": 0, "offset": 1, "images": 8}]
    assert card["distinct_images_seen_total"] == card["images_seen_total"]
    assert "hue classes" in card["data"] and 0.0 <= card["final_texture_acc"] <= 1.0
    assert "colour on a 2x2 grid" in card["training"] and card["final_layout_mse"] > 0.0
    state = load_file(str(weights))
    assert not any("head" in k for k in state)  # the system, hue, texture and colour-layout heads stay behind
    # the continued weights differ from the shipped ones: training touched them
    start = create_backbone({"weights": "insitu:fractal_vit_tiny", "img_size": 32})
    assert not torch.equal(state["blocks.0.attn.qkv.weight"].float(), start.vit.blocks[0].attn.qkv.weight.detach().half().float())


def _mip(**options):
    from insitu.objectives import create_objective

    return create_objective("mip", 48, 8, 32, options, 10)


def test_colour_layout_target_is_the_inputs_own_pooled_colour():
    objective = _mip(num_systems=4, colour_layout=2, colour_layout_weight=0.5, grey_prob=0.0)
    student = create_backbone({"patch_size": 8, "img_size": 32, "kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}})
    assert objective.layout_head.out_features == 3 * 2 * 2
    # a head that predicts the exact pooled colour gives zero layout error: zero the head, use an image whose
    # 2x2 pooled colour is 0 everywhere and is unchanged by a flip (so the random flip cannot matter)
    torch.nn.init.zeros_(objective.layout_head.weight), torch.nn.init.zeros_(objective.layout_head.bias)
    x = torch.zeros(2, 3, 32, 32)
    batch = {"image": x, "systems": torch.zeros(2, 4)}
    assert float(objective(batch, student)["layout_mse"].detach()) == 0.0
    # a colour the head does not predict: the error is the mean square of the pooled colours (hand-computed)
    x[:, 0] = 1.0  # red everywhere: pooled target is 1 on the 4 red cells, 0 on the 8 others
    out = objective(batch, student)
    assert abs(float(out["layout_mse"].detach()) - 4 / 12) < 1e-6
    # the weight scales that term alone: the same (flip-invariant) batch with weight 1.5 instead of 0.5
    heavier = _mip(num_systems=4, colour_layout=2, colour_layout_weight=1.5, grey_prob=0.0)
    heavier.load_state_dict(objective.state_dict())
    assert abs(float(heavier(batch, student)["loss"].detach()) - float(out["loss"].detach()) - 1.0 * 4 / 12) < 1e-5


def test_bank_seed_keeps_the_classes_while_seed_varies():
    same = _mip(num_systems=6, bank_seed=0).system_bank(seed=3)
    reference = SystemBank(6, seed=0)
    assert torch.equal(same.a, reference.a) and torch.equal(same.probs, reference.probs)
    # without bank_seed the run's seed picks the bank, as before
    own = _mip(num_systems=6).system_bank(seed=3)
    assert torch.equal(own.a, SystemBank(6, seed=3).a) and not torch.equal(own.a, reference.a)
