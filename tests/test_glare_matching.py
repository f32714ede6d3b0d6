"""GLARE's cross-view region matching (issue 38): standardised tokens recover a known shift, raw ones do not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from insitu.objectives import create_objective
from insitu.objectives.glare import match_regions, match_space
from insitu.objectives.health import match_health

H = W = 8
SHIFT = (2, 3)


def shifted_pair(seed: int = 0, batch: int = 4, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two B×64×D token grids, the second the first rolled by SHIFT, each with its own noise, both with a
    strong shared component whose strength varies per token (as a frozen ViT's tokens have). Returns
    (view a, view b, for each token of a the index of its counterpart in b)."""
    g = torch.Generator().manual_seed(seed)
    white = torch.randn(batch, dim, H, W, generator=g)
    smooth = 3 * F.avg_pool2d(F.pad(white, (1, 1, 1, 1), mode="circular"), 3, 1)  # neighbours look alike
    tokens = (0.5 * white + 0.5 * smooth).permute(0, 2, 3, 1)
    common = 4 * F.normalize(torch.randn(dim, generator=g), dim=0) * tokens.reshape(-1, dim).norm(dim=-1).mean()
    tokens = tokens + common * (1 + 0.2 * torch.randn(batch, H, W, 1, generator=g))

    def view(t: torch.Tensor) -> torch.Tensor:
        return (t + 0.3 * torch.randn(t.shape, generator=g)).reshape(batch, H * W, dim)

    a, b = view(tokens), view(torch.roll(tokens, shifts=SHIFT, dims=(1, 2)))
    idx = torch.arange(H * W)
    true = ((idx // W + SHIFT[0]) % H) * W + (idx % W + SHIFT[1]) % W
    return a, b, true


def test_constructed_pair_looks_like_frozen_vit_tokens():
    a, _, _ = shifted_pair()
    z = F.normalize(a, dim=-1)
    cos = z @ z.transpose(1, 2)
    off = cos[:, ~torch.eye(H * W, dtype=torch.bool)]
    assert 0.88 < float(off.mean()) < 0.97  # issue 38 measured 0.92 on the shipped base


@pytest.mark.parametrize("kind", ["standardised", "centred"])
def test_standardised_matching_recovers_the_shift_and_raw_does_not(kind):
    a, b, true = shifted_pair()
    idx = torch.arange(H * W)
    new = match_regions(match_space(a, kind), match_space(b, kind), temp=0.1)
    raw = match_regions(match_space(a, "raw"), match_space(b, "raw"), temp=0.1)
    new_h, raw_h = match_health(new), match_health(raw)
    # the new match puts most of each token's weight on its true counterpart
    assert float((new.argmax(-1) == true).float().mean()) >= 0.95
    assert float(new[:, idx, true].mean()) > 0.6
    assert float(new_h["match_entropy"]) < 0.35 and float(new_h["match_top1"]) > 0.6
    # the raw match is nearly uniform (issue 38: 0.99 x ln 64, top-1 0.023 vs 1/64 = 0.016): its weighted
    # "counterpart" is about the other view's mean token, whatever its argmax says
    assert float(raw_h["match_entropy"]) > 0.95 and float(raw_h["match_top1"]) < 0.05
    assert float(raw[:, idx, true].mean()) < 0.05


def test_match_space_removes_a_per_image_common_vector():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    shifted = x + torch.randn(2, 1, 8) * 50  # a different common vector per image
    for kind in ("standardised", "centred"):
        assert torch.allclose(match_space(shifted, kind), match_space(x, kind), atol=1e-3)
    assert torch.equal(match_space(x, "raw"), x)
    z = match_space(x, "standardised")  # written out: per image, minus the mean token, over the per-dimension std
    want = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
    assert torch.allclose(z, want, atol=1e-5)
    assert torch.allclose(z.std(1, unbiased=False), torch.ones(2, 8), atol=1e-4)
    with pytest.raises(ValueError, match="match_features"):
        match_space(x, "whitened")


def test_match_health_of_known_weights():
    uniform = torch.full((2, 3, 64), 1 / 64)
    h = match_health(uniform)
    assert float(h["match_entropy"]) == pytest.approx(1.0, abs=1e-5)
    assert float(h["match_top1"]) == pytest.approx(1 / 64)
    one_hot = F.one_hot(torch.tensor([[3, 5, 7]]), 64).float()
    h = match_health(one_hot)
    assert float(h["match_entropy"]) == pytest.approx(0.0, abs=1e-5) and float(h["match_top1"]) == pytest.approx(1.0)
    half = torch.zeros(1, 1, 64)
    half[..., :2] = 0.5
    assert float(match_health(half)["match_entropy"]) == pytest.approx(math.log(2) / math.log(64), abs=1e-5)


def test_glare_logs_match_health_and_the_option_switches_the_space():
    from tests.test_glare import SMALL, glare_batch, models

    _, student, teacher = models()
    outs = {}
    for kind in ("standardised", "raw"):
        obj = create_objective("glare", 48, 8, 32, {**SMALL, "views": {"local_crops": 0}, "regional": {"match_features": kind}}, 10)
        torch.manual_seed(0)
        outs[kind] = obj(glare_batch(obj), student, teacher)
    for out in outs.values():
        assert 0 <= float(out["health/match_entropy"]) <= 1 + 1e-6
        assert 1 / 16 - 1e-6 <= float(out["health/match_top1"]) <= 1  # 16 patches per 32-px view at patch 8
        assert float(out["health/projector_spread"]) > 0
    assert float(outs["standardised"]["health/match_entropy"]) != pytest.approx(float(outs["raw"]["health/match_entropy"]))
    with pytest.raises(ValueError, match="match_features"):  # pydantic names the option
        create_objective("glare", 48, 8, 32, {**SMALL, "regional": {"match_features": "whitened"}}, 10)
