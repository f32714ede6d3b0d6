"""The shipped remote-sensing configs and the geotiff quickstart demo run end to end at tiny size."""

from __future__ import annotations

import json

import pytest
import rasterio

from insitu.cli import main
from insitu.config import load_config
from insitu.domains.geotiff import DEMO_BANDS, DEMO_CLASSES, GeoTiffDomain
from insitu.pipelines.pretrain import pretrain
from tests.conftest import REPO, SHARED_DATA

TINY = [
    "backbone.img_size=32",
    "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
    "train.max_steps=1",
    "objective.options.out_dim=64",
    "data.image_size=32",
]


@pytest.mark.parametrize(("name", "max_items", "batch"), [("landsat_tiles", 8, 4), ("sentinel2_glare", 3, 3)])
def test_remote_sensing_config_runs_tiny(tmp_path, monkeypatch, name, max_items, batch):
    if not SHARED_DATA.exists():
        pytest.skip("shared data not available")
    monkeypatch.chdir(REPO)
    cfg = load_config(
        REPO / "configs" / "remote_sensing" / f"{name}.yaml",
        TINY + [f"out_dir={tmp_path}", f"data.max_items={max_items}", f"train.batch_size={batch}"],
    )
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and result.items == max_items and result.quarantined == 0
    meta = json.loads((result.adapter_dir / "insitu.json").read_text())
    assert len(meta["normalizer"]["mean"]) == cfg.backbone.in_chans


def test_demo_scene_is_real_geotiff_with_balanced_tile_labels(tmp_path):
    demo = GeoTiffDomain.make_demo(tmp_path, seed=0, n_per_class=4, size=16)
    with rasterio.open(tmp_path / "train" / "scene00.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.descriptions == DEMO_BANDS and src.nodata == 0
    dom = GeoTiffDomain(demo.data["options"])
    manifest = dom.scan(tmp_path / "train")
    assert manifest.class_names == list(DEMO_CLASSES) and demo.in_chans == len(DEMO_BANDS)
    assert sorted(i.label for i in manifest.items) == sorted(list(range(4)) * 4)
    sample = dom.load(manifest.items[0], manifest)
    assert sample["mask"].shape == (16, 16) and sample["image"].shape == (6, 16, 16)


def test_quickstart_geotiff_tiny(tmp_path, capsys):
    out = tmp_path / "qs"
    overrides = TINY[:-2] + [
        "train.max_steps=2",
        "train.batch_size=8",
        "objective.options.out_dim=64",
        "data.image_size=32",
        "probe.knn_k=3",
    ]
    args = ["--quiet", "quickstart", "--domain", "geotiff", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["pretrain"]["items"] == 160 and summary["pretrain"]["steps"] == 2
    rows = summary["probe"]
    assert len(rows) == 3 and all(r["n_train"] == 160 and r["n_test"] == 80 for r in rows)  # frozen, adapted, frozen + PCA whitening
    # four spectrally distinct classes: even a random frozen tiny ViT separates them well above chance
    assert rows[0]["linear_acc"] > 0.5
