"""The pairs domain on real rows of the COVID-19 chest image notes (../shared/data/medical/covid_cxr_notes), and the
patient-level intervals of `insitu retrieve`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from insitu.config import load_config
from insitu.domains import create_domain
from insitu.domains.base import stable_id
from insitu.pipelines.data import ScannedData
from insitu.pipelines.retrieval import group_interval, paired_seed_delta, seed_pooled_interval
from tests.conftest import REPO, TINY_BACKBONE, shared
from tests.data.text_fixtures import build_tiny_bert

CONFIG = REPO / "configs" / "medical" / "covid_cxr_convirt.yaml"
# one row of each kind the config must handle: COVID-19 (X-ray and CT), an other pneumonia, No Finding, todo, ARDS
WANTED = ["COVID-19", "Pneumocystis", "Streptococcus", "No Finding", "todo", "ARDS", "COVID-19, ARDS"]


def real_rows(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """A pairs.csv of a few real rows (absolute image paths), two per wanted finding, plus one CT row."""
    source = shared("medical", "covid_cxr_notes", "pairs.csv")
    with open(source, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked = []
    for finding in WANTED:
        picked += [r for r in rows if r["finding"] == finding and r["modality"] == "X-ray"][:2]
    picked += [r for r in rows if r["modality"] == "CT"][:1]
    for r in picked:
        r["image"] = str(source.parent / r["image"])
    out = tmp_path / "pairs.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
    return out, picked


def options(**extra: object) -> dict:
    opts = dict(load_config(CONFIG, check_paths=False).data.options)
    opts.pop("holdout")
    return {**opts, **extra}


def test_real_rows_text_group_and_labels(tmp_path: Path) -> None:
    table, rows = real_rows(tmp_path)
    domain = create_domain("pairs", options())
    manifest = domain.scan(table)
    xray = [r for r in rows if r["modality"] == "X-ray"]
    assert len(manifest.items) == len(xray), "keep: {modality: [X-ray]} drops the CT row and nothing else"
    assert not manifest.quarantine
    names = manifest.class_names
    assert names == ["covid19", "other_pneumonia", "no_finding"]
    expected = {"COVID-19": "covid19", "COVID-19, ARDS": "covid19", "Pneumocystis": "other_pneumonia"}
    expected |= {"Streptococcus": "other_pneumonia", "No Finding": "no_finding", "todo": None, "ARDS": None}
    for item, row in zip(manifest.items, xray, strict=True):
        assert domain.report(item) == row["text"], "the free-text note is read verbatim"
        assert item.group == stable_id(row["patient"]), "group = patient (hashed, never the raw id)"
        want = expected[row["finding"]]
        assert (names[item.label] if item.label is not None else None) == want, row["finding"]
        sample = domain.load(item, manifest)
        assert sample["image"].shape[0] == 1 and sample["text"] in row["text"]
    same_patient = [i.group for i, r in zip(manifest.items, xray, strict=True) if r["patient"] == xray[0]["patient"]]
    assert len(set(same_patient)) == 1
    labelled = domain.__class__(options(labelled_only=True)).scan(table)
    assert len(labelled.items) == sum(expected[r["finding"]] is not None for r in xray)


def test_unmapped_finding_is_quarantined_with_the_fix(tmp_path: Path) -> None:
    table, _ = real_rows(tmp_path)
    label_map = {k: v for k, v in options()["label_map"].items() if k != "Pneumocystis"}
    manifest = create_domain("pairs", options(label_map=label_map)).scan(table)
    reasons = {q.reason for q in manifest.quarantine}
    assert reasons == {"unmapped label"} and len(manifest.quarantine) == 2
    assert "label_map" in manifest.quarantine[0].message


def test_holdout_never_puts_a_patient_on_both_sides() -> None:
    shared("medical", "covid_cxr_notes", "pairs.csv")
    cfg = load_config(CONFIG)
    train = ScannedData.scan(cfg.data).manifest.items
    test = ScannedData.scan(cfg.probe.test).manifest.items  # labelled_only: the same split, fewer rows
    probe_train = ScannedData.scan(cfg.probe.train).manifest.items
    all_test = cfg.probe.test.model_copy(update={"options": {**cfg.probe.test.options, "labelled_only": False}})
    test_all = ScannedData.scan(all_test).manifest.items
    assert not {i.group for i in train} & {i.group for i in test_all}
    assert not {i.group for i in probe_train} & {i.group for i in test}
    assert {i.item_id for i in test} <= {i.item_id for i in test_all}
    everything = cfg.data.model_copy(update={"options": {**cfg.data.options, "holdout": None}})
    assert len(train) + len(test_all) == len(ScannedData.scan(everything).manifest.items)
    share = len({i.group for i in test_all}) / len({i.group for i in train} | {i.group for i in test_all})
    assert 0.2 < share < 0.4, share
    assert all(i.label is not None for i in test) and {i.label for i in test} >= {0, 1}


def test_patient_intervals() -> None:
    rng = np.random.default_rng(0)
    groups = [f"p{i // 2}" for i in range(60)]  # 30 patients, 2 queries each
    hits = (rng.random(60) < 0.5).astype(int)
    low, high = group_interval(hits, groups)
    assert low < hits.mean() < high and high - low < 0.5
    partly = np.where(np.arange(60) % 3 == 0, -1, hits)  # -1: not scored (unlabelled for zero-shot)
    low2, high2 = group_interval(partly, groups)
    assert low2 < partly[partly >= 0].mean() < high2
    assert all(np.isnan(group_interval(hits[:4], groups[:4])))  # 2 patients: no interval
    seeds = np.stack([hits, hits, np.roll(hits, 1)])
    rate, lo, hi = seed_pooled_interval(seeds, groups)
    assert rate == pytest.approx(seeds.mean()) and lo < rate < hi
    better = np.ones_like(seeds)
    d, lo, hi = paired_seed_delta(better, seeds, groups)
    assert d == pytest.approx(1 - seeds.mean()) and lo > 0


def test_frozen_image_tower_and_projection_only_baselines(tmp_path: Path) -> None:
    """image_tower: frozen reads the bare backbone (adapters get no gradient); trainable_layers: 0 leaves only g_v, g_u."""
    from insitu.adapters import AdaptedBackbone, create_adapters
    from insitu.backbones import create_backbone
    from insitu.config import BackboneConfig
    from insitu.objectives import create_objective

    bert = build_tiny_bert(tmp_path / "bert")
    backbone = create_backbone(BackboneConfig(**TINY_BACKBONE))
    student = AdaptedBackbone(backbone, create_adapters(backbone, {"bottleneck_dim": 8}))
    for p in student.adapters.parameters():  # non-zero adapters: the frozen path must not read them
        torch.nn.init.normal_(p, std=0.5)
    options = {"text_encoder": str(bert), "proj_dim": 16, "image_tower": "frozen", "trainable_layers": 0}
    objective = create_objective("convirt", backbone.embed_dim, backbone.patch_size, 32, options, 1)
    images = torch.randn(4, 3, 32, 32)
    bare = backbone.forward_tokens(images)[0]
    assert torch.allclose(objective.image_features(student, images), bare)
    assert not torch.allclose(student.forward_tokens(images)[0], bare)  # the adapters do change the features
    out = objective({"views": [images], "text": ["Clear lungs.", "Pneumonia.", "Effusion.", "Fever and cough."]}, student)
    out["loss"].backward()
    assert all(p.grad is None for p in student.adapters.parameters())
    assert all(p.grad is None for p in objective.text.parameters())
    assert objective.image_proj[0].weight.grad is not None and objective.text_proj[0].weight.grad is not None
