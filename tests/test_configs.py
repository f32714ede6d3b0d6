"""Every shipped config validates; the foundation's configs also run at tiny size."""

from pathlib import Path

import pytest
import yaml

from insitu.config import load_config
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe
from insitu.raw_config import upgrade_config
from tests.conftest import REPO, SHARED_DATA, TINY_PNEUMONIA, TINY_RUN

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))  # the base-pretraining configs (configs/base/) included: one schema
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


@pytest.mark.parametrize("path", [*CONFIGS, REPO / "insitu" / "pipelines" / "quickstart.yaml"], ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_are_written_in_the_one_component_shape(path: Path):
    """Every component section as {name, options}: nothing for `upgrade_config` to rewrite (old shapes load with a note)."""
    raw = yaml.safe_load(path.read_text())
    assert upgrade_config(raw) == raw
    if isinstance(raw.get("adapter"), dict):
        assert set(raw["adapter"]) <= {"name", "options"}
