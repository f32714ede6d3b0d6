"""The documented Python API (README "Python API")."""

import numpy as np

import insitu
from insitu.adapters.package import load_package
from tests.conftest import tiny_config


def test_api_pretrain_load_embed_probe(tmp_path, shapes_dir):
    cfg = insitu.load_config(tiny_config(shapes_dir, tmp_path / "runs"))
    result = insitu.pretrain(cfg)
    pkg = load_package(result.adapter_dir)
    model = insitu.load_adapter(result.adapter_dir, cfg.backbone)
    feats, ids = insitu.embed_folder(shapes_dir, model, image_size=32, normalizer=pkg.meta.normalizer)
    assert feats.shape == (24, 2 * 48) and len(set(ids)) == 24 and np.isfinite(feats).all()
    rows = insitu.probe(cfg, [result.adapter_dir])
    assert len(rows) == 3 and rows[1].trainable_params > 0 and rows[2].name == "frozen + PCA whitening"  # frozen, adapted, baseline
