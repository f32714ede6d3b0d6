"""The dicom domain on the real shared files, the shipped configs, the demo, and the privacy guarantee."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from insitu.config import load_config
from insitu.domains import create_domain
from insitu.pipelines.pretrain import pretrain
from tests.conftest import REPO, TINY_BACKBONE, TINY_PROBE, shared, tiny_config
from tests.data.dicom_fixtures import SENTINEL_NESTED, SENTINEL_PRIVATE, SENTINEL_UID_ROOT, SENTINELS, ct_volume, write_series

TINY = [
    "backbone.img_size=32",
    "backbone.patch_size=8",
    "backbone.name=vit_tiny_patch16_224",
    "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
    "train.max_steps=1",
    "train.batch_size=4",
    "objective.options.out_dim=64",
    "objective.options.views={global_crops: 2, local_crops: 1}",
    "data.image_size=32",
    "trainer.accelerator=cpu",
]


def test_t1_series_is_a_35_slice_volume(tmp_path):
    root = shared("medical", "mr_brain_series", "HFS")
    d = create_domain("dicom", {"cache_dir": str(tmp_path / "c")})
    m = d.scan(root)
    volumes = [u for u in d.units.values() if not u.stack]
    assert [u.n_slices for u in volumes] == [35]
    v = d.volume(volumes[0])
    assert v.array[:, 0].shape == (35, 256, 256)
    assert np.all(np.diff(v.positions) > 0)
    assert len([i for i in m.items if i.extra["unit"] == volumes[0].key]) == 35
    assert 0 <= np.percentile(v.array, 50) <= 1  # MR percentiles scale to about [0, 1]


def test_ct_hounsfield_air_and_soft_tissue(tmp_path):
    root = shared("medical", "ct_chest_tcia_covid19nysbu")
    d = create_domain("dicom", {"cache_dir": str(tmp_path / "c")})
    m = d.scan(root)
    assert len(m.items) == 30 and m.counts()["groups"] == 5 and not m.quarantine
    hu = np.concatenate([d.load(i, m)["image"].numpy().ravel() for i in m.items[:6]])
    air = hu[(hu > -1100) & (hu < -900)]
    assert abs(np.median(air) + 1000) < 40
    counts, edges = np.histogram(hu, bins=np.arange(-60, 201, 20))  # above fat (about -100 HU)
    assert 0 <= edges[np.argmax(counts)] < 100  # the soft-tissue peak


def test_every_shared_dicom_decodes_or_is_quarantined(tmp_path):
    root = shared("medical", "dicom_pydicom")
    d = create_domain("dicom", {"cache_dir": str(tmp_path / "c"), "manifest_paths": "relative"})
    m = d.scan(root)
    for item in m.items:
        assert np.isfinite(d.load(item, m)["image"].numpy()).all()
    assert all(q.reason for q in m.quarantine)
    listed = {q.path for q in m.quarantine} | {q.path for q in m.skipped} | {d.display(f) for u in d.units.values() for f in u.files}
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert files == listed  # every file is accounted for: used, quarantined, or skipped with a reason


@pytest.mark.parametrize("name", ["ct_glare", "mr_series"])
def test_medical_configs_run_tiny(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shared("medical")
    overrides = TINY + [f"out_dir={tmp_path}", "data.max_items=8", f"data.options.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(REPO / "configs" / "medical" / f"{name}.yaml", overrides=overrides)
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and (result.adapter_dir / "adapter.safetensors").exists()


def test_quickstart_dicom_demo(tmp_path):
    from insitu.pipelines.quickstart import quickstart

    # the quickstart's own objective (simclr, two views) and cached views need a frozen block before the adapters
    tiny = [o for o in TINY[:-1] if not o.startswith("objective.options.views")]
    overrides = tiny + ["adapter.blocks=1", "train.max_steps=2", "train.batch_size=8", "probe.knn_k=3", "trainer.accelerator=cpu", *TINY_PROBE]
    summary = quickstart(tmp_path / "qs", domain="dicom", overrides=overrides, quiet=True)
    assert summary["pretrain"]["items"] > 0 and summary["pretrain"]["quarantined"] == 0
    assert all(0 <= row["linear_acc"] <= 1 for row in summary["probe"])
    assert list((tmp_path / "qs" / "data" / "train").iterdir())  # real DICOM folders were written


def test_demo_is_learnable_real_dicom(tmp_path):
    from insitu.domains.dicom import DicomDomain

    demo = DicomDomain.make_demo(tmp_path, seed=0, n_per_class=8, size=32)
    d = create_domain("dicom", demo.data["options"])
    m = d.scan(Path(demo.data["root"]))
    assert m.class_names == ["fatty", "normal"] and {i.label for i in m.items} == {0, 1}
    abdomen = {lab: np.mean([d.load(i, m)["image"][1].mean().item() for i in m.items if i.label == lab]) for lab in (0, 1)}
    assert abdomen[1] > abdomen[0] + 0.008  # the normal liver is denser: the abdomen-window channel separates the classes


def _sha(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_identifying_value_reaches_any_output(tmp_path, caplog, capsys):
    from insitu.cli import main

    root = tmp_path / "pacs"
    for p in range(2):
        # a PACS-style export tree: folders named after the patient and the study date
        folder = root / f"{SENTINELS['PatientName']}_{p}" / f"{SENTINELS['StudyDate']}_{SENTINELS['AccessionNumber']}"
        write_series(folder, ct_volume(p, (3, 32, 32)), patient_id=f"{SENTINELS['PatientID']}{p}", sentinels=True, seed=p)
    before = _sha(root)
    out = tmp_path / "out"
    cache = tmp_path / "private-cache"
    caplog.set_level(logging.DEBUG)
    assert main(["scan", str(root), "--domain", "dicom", "--out", str(out / "scan"), "--option", f"cache_dir={cache}"]) == 0
    cfg = tiny_config(
        root,
        out / "runs",
        data={"domain": "dicom", "root": str(root), "image_size": 32, "options": {"cache_dir": str(cache)}},
        backbone={**TINY_BACKBONE, "in_chans": 1},
        train={"max_steps": 1, "batch_size": 4},
    )
    pretrain(load_config(cfg), quiet=True)
    printed = capsys.readouterr()
    texts = [printed.out, printed.err, caplog.text]
    for f in out.rglob("*"):
        if f.is_file():
            texts.append(f.read_bytes().decode("latin-1"))
    needles = [*SENTINELS.values(), SENTINEL_PRIVATE, SENTINEL_NESTED, SENTINEL_UID_ROOT, "SENTINEL"]
    needles += [v.split("^")[0] for v in SENTINELS.values() if "^" in v]
    # the run's resolved config names data.root (the user's own choice), so only what lies *below* root counts
    for text in texts:
        text = text.replace(str(root), "<root>")
        leaked = [n for n in needles if n.lower() in text.lower()]
        assert not leaked, leaked
    assert _sha(root) == before


def test_quickstart_dicom_views_keep_hu_and_set_wins(tmp_path):
    from insitu.pipelines.quickstart import quickstart_config

    cfg, _ = quickstart_config(tmp_path / "ct", "dicom")
    views = cfg.objective.options["views"]
    # the CT recipe replaces the intensity jitter and the crop range and keeps the quickstart's other view settings
    assert views["intensity"] == 0.0 and list(views["global_scale"]) == [0.7, 1.0] and views["global_crops"] == 2
    assert cfg.objective.options["temperature"] == 0.2
    cfg, _ = quickstart_config(tmp_path / "set", "dicom", ["objective.options.views.intensity=0.3"])
    assert cfg.objective.options["views"]["intensity"] == 0.3 and list(cfg.objective.options["views"]["global_scale"]) == [0.7, 1.0]
    cfg, _ = quickstart_config(tmp_path / "rgb", "images")
    assert cfg.objective.options["views"]["intensity"] == 0.6  # other demos keep the image recipe
