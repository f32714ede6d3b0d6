"""A simulated site's seed is the run's seed + 1000 x its index: the fifth site (seed 5000) must train, not crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from insitu.config import load_config
from tests.conftest import tiny_config, write_shapes


def test_a_site_whose_seed_times_the_round_stride_passes_2_to_the_32_still_trains(tmp_path: Path) -> None:
    from insitu.federated.flower import initial_state, site_configs
    from insitu.federated.site import SiteTrainer

    roots = [write_shapes(tmp_path / f"site_{i}", n_per_class=2, seed=i) for i in range(5)]
    raw = tiny_config(roots[0], tmp_path / "runs", objective={"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    raw["federated"] = {"rounds": 2, "local_steps": 1, "sites": [{"root": str(r), "image_size": 32} for r in roots]}
    cfg = load_config(raw)
    state, _ = initial_state(cfg)
    site_cfg, shard = site_configs(cfg, None)[4]
    assert site_cfg.seed * 1_000_003 > 2**32  # the case that crashed in numpy's seed check before
    trainer = SiteTrainer(site_cfg, shard)
    arrays, loss = trainer.train_round([a.copy() for a in state.arrays], step_offset=1, steps=1)
    assert loss is not None and np.isfinite(loss)
    assert [a.shape for a in arrays] == state.shapes
