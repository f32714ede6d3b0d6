"""insitu evaluate: frozen backbone vs adapter packages, mean ± std over seeds, CSV/JSON, few-shot, report."""

from __future__ import annotations

import csv
import json

import pytest

from insitu.cli import main
from insitu.config import load_config
from insitu.domains.synthetic import write_shape_pairs
from insitu.pipelines.evaluate import evaluate, table_rows
from insitu.pipelines.pretrain import pretrain
from tests.conftest import tiny_config, write_shapes


def test_evaluate_classification_table_files_and_few_shot(tmp_path):
    shapes = write_shapes(tmp_path / "shapes", 5)
    base = tiny_config(shapes, tmp_path / "runs", train={"max_steps": 1, "batch_size": 4}, probe={"test_fraction": 0.4, "knn_k": 3})
    adapter = pretrain(load_config(base), quiet=True).adapter_dir
    cfg = load_config({**base, "downstream": {"steps": 3, "batch_size": 8, "seeds": [0, 1], "shots": [1, 2]}})
    rows = evaluate(cfg, [adapter], tmp_path / "eval")
    assert [r.name for r in rows] == ["frozen backbone", "+ adapters (tiny)"]
    assert rows[0].trainable_params == rows[1].trainable_params  # heads only: same head either way
    assert all(len(r.seeds) == 2 and r.knn is not None and [s for s, *_ in r.few_shot] == [1, 2] for r in rows)
    acc = [s.metrics["accuracy"] for s in rows[0].seeds]
    mean, std = rows[0].metrics["accuracy"]
    assert abs(mean - sum(acc) / 2) < 1e-9 and abs(std - abs(acc[0] - acc[1]) / 2) < 1e-9
    headers, cells = table_rows(rows)
    assert headers[1] == "accuracy" and "±" in cells[0][1]
    # the adapted row's Δ is paired by seed against the frozen row (the probe issue's statistics)
    diffs = [a.metrics["accuracy"] - f.metrics["accuracy"] for f, a in zip(rows[0].seeds, rows[1].seeds, strict=True)]
    assert rows[0].delta is None and rows[1].delta[0] == pytest.approx(sum(diffs) / 2)
    assert rows[1].delta[1] <= rows[1].delta[0] <= rows[1].delta[2]
    with open(tmp_path / "eval" / "evaluate.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert {(r["model"], r["metric"]) for r in lines} >= {("frozen backbone", "accuracy"), ("+ adapters (tiny)", "knn_accuracy")}
    saved = json.loads((tmp_path / "eval" / "evaluate.json").read_text())
    assert saved[1]["name"] == "+ adapters (tiny)" and len(saved[1]["seeds"]) == 2
    assert (tmp_path / "eval" / "fewshot.csv").read_text().count("\n") == 1 + 2 * 2
    assert (tmp_path / "eval" / "report.html").stat().st_size > 1000 and (tmp_path / "eval" / "report.md").exists()
    # the exports carry the computed numbers, not just a file: the CSV's frozen accuracy row is the mean
    # and std of the seeds, and the report's results table has each model's row with its cells
    frozen = next(r for r in lines if (r["model"], r["metric"]) == ("frozen backbone", "accuracy"))
    assert float(frozen["mean"]) == pytest.approx(mean, abs=1e-5) and float(frozen["std"]) == pytest.approx(std, abs=1e-5)
    assert frozen["seeds"] == "2"
    report = (tmp_path / "eval" / "report.md").read_text()
    for row_cells in cells:
        assert "| " + " | ".join(str(c) for c in row_cells) + " |" in report, row_cells


def test_evaluate_segmentation_via_cli(tmp_path, capsys):
    root = write_shape_pairs(tmp_path / "pairs", n=8, size=32)
    data = {"domain": "video", "root": str(root), "image_size": 32, "options": {"crop_fov": False, "decode_size": 32}}
    cfg = tiny_config(root, tmp_path / "runs", data=data, probe={"test_fraction": 0.3})
    cfg["downstream"] = {"task": "segmentation", "head": "fpn", "steps": 2, "batch_size": 4, "decoder_dim": 8}
    import yaml

    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["-q", "evaluate", "-c", str(tmp_path / "seg.yaml"), "--out", str(tmp_path / "eval")]) == 0
    assert "insitu evaluate" in capsys.readouterr().out
    text = (tmp_path / "eval" / "evaluate.csv").read_text()
    assert "frozen backbone,mIoU," in text and "frozen backbone,dice," in text
    assert (tmp_path / "eval" / "predictions.png").stat().st_size > 0
