"""Every shipped config validates; the foundation's configs also run at tiny size."""

from pathlib import Path

import pytest

from insitu.config import load_config
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe
from tests.conftest import REPO, SHARED_DATA, TINY_PNEUMONIA, TINY_RUN

# configs/base/ holds base-pretraining configs (a different schema, checked in test_fractals_base).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "base")
TINY = TINY_RUN


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    if "../shared/data" in path.read_text() and not SHARED_DATA.exists():
        pytest.skip("shared data not available")
    cfg = load_config(path)
    assert cfg.name


def test_pneumoniamnist_config_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / "medical" / "pneumoniamnist.yaml"
    if not SHARED_DATA.exists():
        pytest.skip("shared data not available")
    overrides = [*TINY, f"out_dir={tmp_path}", *TINY_PNEUMONIA]
    cfg = load_config(path, overrides)
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and result.items == 16
    rows = run_probe(cfg, [result.adapter_dir])
    assert [r.name.split(" (")[0] for r in rows] == ["frozen backbone", "+ adapters", "frozen + PCA whitening"]
    assert all(0.0 <= r.linear_acc <= 1.0 and r.n_test == 20 for r in rows)
