"""Shared fixtures: tiny seeded data in real formats and tiny ViT configs (fast on 2 CPU cores).

Data that many tests read is generated once per session and copied per test (a copy is a few ms;
generating it is ten times that), so a test may still change its own copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from insitu.domains.synthetic import SHAPES, make_shape_image

# tests write only to temporary folders: insitu's private cache (the token salt) included
os.environ.setdefault("INSITU_CACHE", tempfile.mkdtemp(prefix="insitu-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_BACKBONE: dict[str, Any] = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 8,
    "img_size": 32,
    "in_chans": 3,
    "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
}


def shared(*parts: str) -> Path:
    """A path under ../shared/data; skips the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is not available")
    return path


def write_shapes(root: Path, n_per_class: int = 6, size: int = 32, seed: int = 0, classes: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for label, shape in enumerate(SHAPES[:classes]):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img, _ = make_shape_image(rng, label, size)
            Image.fromarray(img).save(root / shape / f"{shape}_{i}.png")
    return root


@pytest.fixture(scope="session")
def shapes_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default shapes folder, generated once per session; never handed to a test (use ``shapes_dir``)."""
    return write_shapes(tmp_path_factory.mktemp("shapes-template") / "shapes")


@pytest.fixture
def shapes_dir(tmp_path: Path, shapes_template: Path) -> Path:
    """This test's own copy of 4 shape classes x 6 PNGs at 32 px (seed 0)."""
    return Path(shutil.copytree(shapes_template, tmp_path / "shapes"))


# overrides that shrink any run config to a 2-block ViT at 32 px and one step
TINY_RUN = [
    "backbone.img_size=32",
    "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
    "train.max_steps=1",
    "train.batch_size=4",
    "objective.options.out_dim=64",
]

# overrides that shrink the quickstart's probe to one repeat and a short bootstrap (its rows and files stay the same)
TINY_PROBE = ["probe.repeats=1", "probe.bootstrap=200"]

# overrides that shrink the quickstart (any domain) to a 2-block random-init ViT at 32 px and 2 steps
TINY_QUICKSTART = [
    "backbone.weights=null",
    "train.max_steps=2",
    "train.batch_size=8",
    "data.image_size=32",
    "backbone.img_size=32",
    "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
    "objective.options.out_dim=64",
    "adapter.options.blocks=1",
    "probe.knn_k=3",
    *TINY_PROBE,
]

# data and probe overrides that shrink a PneumoniaMNIST config to a few 32 px items
TINY_PNEUMONIA = [
    "data.max_items=16",
    "data.image_size=32",
    "probe.train.max_items=40",
    "probe.test.max_items=20",
    "probe.train.image_size=32",
    "probe.test.image_size=32",
    "probe.knn_k=3",
]


def tiny_config(root: Path, out_dir: Path, **sections: Any) -> dict[str, Any]:
    """A complete run config dict for a 2-block ViT at 32 px that trains in seconds."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "out_dir": str(out_dir),
        "data": {"domain": "images", "root": str(root), "image_size": 32},
        "backbone": dict(TINY_BACKBONE),
        "adapter": {"name": "bottleneck", "options": {"blocks": "all", "bottleneck_dim": 8}},
        "objective": {"name": "dino", "options": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "views": {"local_crops": 1}}},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
        "trainer": {"accelerator": "cpu"},
        "probe": {"knn_k": 3},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def tiny_package(path: Path, **save_kwargs: Any) -> tuple[Any, Any, Path]:
    """(backbone, adapters, package folder): a 2-block ViT with seeded non-zero bottleneck adapters, saved."""
    import torch

    from insitu.adapters import create_adapters
    from insitu.adapters.package import save_package
    from insitu.backbones import create_backbone

    torch.manual_seed(0)
    bb = create_backbone(TINY_BACKBONE)
    adapters = create_adapters(bb, {"blocks": "all", "bottleneck_dim": 8})
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.05)
    defaults = {"head_state": {"dino.w": torch.ones(2)}, "normalizer": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    return bb, adapters, save_package(path, bb, adapters, **{**defaults, **save_kwargs})
