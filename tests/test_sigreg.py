"""SIGReg: the Epps–Pulley statistic against a direct complex-valued reference; Gaussian vs collapsed."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.backbones import create_backbone
from insitu.config import load_config
from insitu.objectives import create_objective
from insitu.pipelines.pretrain import pretrain
from tests.conftest import TINY_BACKBONE, tiny_config

SMALL_DINO = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "views": {"local_crops": 1}}


def reference_epps_pulley(x: np.ndarray, t_max: float = 3.0, knots: int = 17) -> float:
    """n * integral over [-t_max, t_max] of |ecf(t) - exp(-t²/2)|² exp(-t²/2) dt, trapezoid on a symmetric grid."""
    t = np.linspace(-t_max, t_max, 2 * knots - 1)
    ecf = np.exp(1j * np.outer(t, x)).mean(axis=1)
    integrand = np.abs(ecf - np.exp(-(t**2) / 2)) ** 2 * np.exp(-(t**2) / 2)
    return len(x) * float(np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t)))


def test_statistic_matches_reference_in_one_dimension():
    # with D = 1 every random unit direction is ±1, and the statistic is symmetric in the sign
    obj = create_objective("sigreg", 48, 8, 32, {"base": "dino", "base_options": SMALL_DINO, "num_vectors": 4}, 10)
    x = np.random.default_rng(0).standard_t(df=4, size=300)
    got = float(obj.sigreg(torch.tensor(x, dtype=torch.float64)[:, None]))
    assert abs(got - reference_epps_pulley(x)) < 1e-6 * max(1.0, got)


def test_near_zero_on_gaussian_large_on_collapse():
    obj = create_objective("sigreg", 48, 8, 32, {"base": "dino", "base_options": SMALL_DINO}, 10)
    torch.manual_seed(0)
    gaussian = torch.randn(1024, 32)
    collapsed = torch.randn(1, 32).expand(1024, 32) + 0.01 * torch.randn(1024, 32)
    rank_one = torch.randn(1024, 1) * torch.randn(1, 32)
    g, c, r = (float(obj.sigreg(z)) for z in (gaussian, collapsed, rank_one))
    # under the null the statistic stays O(1) (its mean is about 1.06), on collapse it grows like n
    assert g < 2.0
    assert c > 100 * g and r > 10 * g


def test_wrapper_adds_weighted_regulariser_over_recorded_views():
    torch.manual_seed(0)
    bb = create_backbone(TINY_BACKBONE)
    student, teacher = create_adapters(bb, {"bottleneck_dim": 8}), create_adapters(bb, {"bottleneck_dim": 8})
    teacher.requires_grad_(False)
    obj = create_objective("sigreg", bb.embed_dim, 8, 32, {"base": "dino", "base_options": SMALL_DINO, "weight": 0.5}, 10)
    views = [obj.view_transform()(torch.randn(3, 40, 40)) for _ in range(4)]
    batch = {"views": [torch.stack([v[i] for v in views]) for i in range(3)]}
    out = obj(batch, AdaptedBackbone(bb, student), AdaptedBackbone(bb, teacher))
    assert torch.isclose(out["loss"], out["loss_base"] + 0.5 * out["sigreg"])
    out["loss"].backward()
    assert student.layers["0"].up.weight.grad is not None
    assert all(p.grad is None for p in bb.parameters())


def test_sigreg_around_glare_in_pretraining(tmp_path: Path, shapes_dir: Path):
    base = {"name": "glare", "options": {**SMALL_DINO, "dense_out_dim": 16, "dense_hidden_dim": 16, "dense_bottleneck_dim": 8}}
    objective = {"name": "sigreg", "options": {"base": base["name"], "base_options": base["options"], "num_vectors": 32}}
    cfg = load_config(tiny_config(shapes_dir, tmp_path, objective=objective), ["train.max_steps=2"])
    result = pretrain(cfg, quiet=True)
    rows = [r for r in csv.DictReader((result.run_dir / "logs" / "metrics.csv").open()) if r.get("train/sigreg")]
    assert rows and all(float(r["train/sigreg"]) > 0 and r.get("train/loss_region") for r in rows)
    # the regulariser is really added, at the default weight 0.05, to the GLARE loss of the same step
    assert len(rows) == 2
    for r in rows:
        want = float(r["train/loss_base"]) + 0.05 * float(r["train/sigreg"])
        assert float(r["train/loss"]) == pytest.approx(want, rel=1e-5)
        assert float(r["train/loss"]) != pytest.approx(float(r["train/loss_base"]), rel=1e-5)
