"""Nothing insitu writes for sharing names a local path: folder names can identify patients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from insitu.adapters import create_adapters, package
from insitu.backbones import create_backbone
from insitu.cli import main
from insitu.config import BackboneConfig, load_config
from insitu.domains import create_domain
from insitu.domains.base import Manifest
from insitu.privacy import redact_config, scrub_text, shareable_path, shown_weights
from tests.conftest import TINY_BACKBONE, tiny_config, write_shapes
from tests.data.dicom_fixtures import ct_volume, write_series
from tests.data.geotiff_fixtures import write_scene

PHI = "DOE^JOHN_1234567"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep any salt a test creates out of the real ~/.cache."""
    monkeypatch.setenv("INSITU_CACHE", str(tmp_path / "private-cache"))
    monkeypatch.delenv("INSITU_SALT", raising=False)
    return tmp_path / "private-cache"


def _assert_clean(files: list[Path]) -> None:
    for f in files:
        assert f.is_file(), f
        assert PHI not in f.read_text(encoding="utf-8"), f"{f} names the patient folder"
        assert "DOE^JOHN" not in f.read_text(encoding="utf-8"), f


def _phi_shapes(tmp_path: Path) -> Path:
    root = write_shapes(tmp_path / PHI / "shapes", n_per_class=3)
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG not really")  # quarantined with the decoder's message
    return root


def test_redact_config_removes_every_local_path(tmp_path):
    encoder = tmp_path / PHI / "encoder"
    encoder.mkdir(parents=True)
    config = {
        "out_dir": str(tmp_path / PHI / "runs"),
        "data": {"root": str(tmp_path / PHI), "options": {"cache_dir": str(tmp_path / PHI / "cache"), "manifest_paths": "token"}},
        "backbone": {"name": "vit_tiny_patch16_224", "weights": "insitu:fractal_vit_tiny"},
        "objective": {"options": {"text_encoder": str(encoder), "pooling": "mean", "other": f"rel/{PHI}/x"}},
        "probe": {"train": {"root": str(tmp_path / PHI), "options": {"cache_dir": f"~/{PHI}"}}, "cache_dir": f"{PHI}/probe"},
        "extra": {"weights_file": "vit.safetensors", "tokenizer": "microsoft/BiomedVLP-CXR-BERT-specialized", "windows": ["lung"]},
    }
    out = redact_config(config)
    assert PHI not in json.dumps(out)
    assert out["backbone"] == config["backbone"]  # the insitu: base id and the timm name stay
    assert out["data"]["options"]["manifest_paths"] == "token"
    assert out["objective"]["options"]["pooling"] == "mean"
    assert out["extra"]["tokenizer"] == config["extra"]["tokenizer"] and out["extra"]["windows"] == ["lung"]
    assert out["extra"]["weights_file"] == "<local path>"
    assert config["data"]["root"].endswith(PHI)  # the input is not modified


def test_shareable_path_and_scrub(tmp_path):
    root = tmp_path / PHI
    assert shareable_path(root / "a" / "b.png", root) == "a/b.png"
    assert shareable_path("dcm-0123", root) == "dcm-0123"
    token = shareable_path(tmp_path / "elsewhere" / f"{PHI}.png", root, salt="s")
    assert token.startswith("file-") and PHI not in token
    assert shareable_path(tmp_path / "elsewhere" / "x.png", root, salt="t") != shareable_path(
        tmp_path / "elsewhere" / "x.png", root, salt="s"
    )
    assert scrub_text(f"cannot identify image file '{root}/a.png'", [root]) == "cannot identify image file '<data root>/a.png'"
    assert shown_weights(str(root / "vit.safetensors")) == "weights <local path>"
    assert shown_weights("insitu:fractal_vit_tiny") == "weights insitu:fractal_vit_tiny"


def test_pretrain_probe_report_files_never_name_the_data_root(tmp_path, capsys):
    root = _phi_shapes(tmp_path)
    weights = tmp_path / PHI / "weights" / "vit.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in create_backbone(BackboneConfig(**TINY_BACKBONE)).vit.state_dict().items()}, str(weights))
    cfg = tiny_config(root, tmp_path / PHI / "runs", backbone={"weights": str(weights)}, train={"max_steps": 2, "batch_size": 4})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "pretrain", "-c", str(config), "--probe"]) == 0
    run = tmp_path / PHI / "runs" / "tiny"
    manifest = run / "manifest"
    _assert_clean(
        [run / "report.md", run / "report.html", run / "summary.json", *(run / "adapter").glob("*.json"), *manifest.glob("*.csv")]
    )
    _assert_clean([run / "adapter" / "README.md", manifest / "manifest.json"])
    assert "<data root>" in (run / "report.md").read_text()
    rows = (manifest / "manifest.csv").read_text()
    assert "circle/circle_0.png" in rows and str(tmp_path) not in rows  # relative to the scanned root
    assert "circle/broken.png,cannot decode image" in (manifest / "quarantine.csv").read_text()
    assert str(tmp_path) not in (manifest / "quarantine.csv").read_text()
    back = Manifest.read(manifest, data_root=root)
    assert Path(back.items[0].path).is_file()  # a reader who has the data can find each item again


def test_evaluate_report_never_names_local_weights(tmp_path):
    from insitu.pipelines.evaluate import evaluate

    root = write_shapes(tmp_path / PHI / "shapes", 3)
    weights = tmp_path / PHI / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone(BackboneConfig(**TINY_BACKBONE)).vit.state_dict().items()}, str(weights))
    cfg = tiny_config(root, tmp_path / "runs", backbone={"weights": str(weights)}, probe={"test_fraction": 0.4, "knn_k": 2})
    cfg["downstream"] = {"steps": 1, "batch_size": 8, "shots": [1]}
    evaluate(load_config(cfg), [], tmp_path / "eval")
    _assert_clean([tmp_path / "eval" / "report.md", tmp_path / "eval" / "report.html"])


def test_adapter_package_config_is_redacted(tmp_path):
    backbone = create_backbone(BackboneConfig(**TINY_BACKBONE))
    adapters = create_adapters(backbone, {"blocks": "all", "bottleneck_dim": 4})
    config = {"data": {"root": str(tmp_path / PHI), "options": {"cache_dir": str(tmp_path / PHI / "cache")}}}
    out = package.save_package(tmp_path / "adapter", backbone, adapters, config=config)
    _assert_clean([out / "insitu.json", out / "README.md"])


@pytest.mark.parametrize("domain", ["images", "geotiff"])
def test_cli_scan_writes_relative_paths(tmp_path, domain):
    root = tmp_path / PHI / "data"
    if domain == "images":
        write_shapes(root, n_per_class=1)
        (root / "circle" / "bad.png").write_bytes(b"junk")
    else:
        write_scene(root / "scene.tif", bands=3, height=16, width=16)
        (root / "junk.tif").write_bytes(b"not a tiff")
    out = tmp_path / "scan"
    assert (
        main(
            [
                "-q",
                "scan",
                str(root),
                "--domain",
                domain,
                "--out",
                str(out),
                "--option",
                "tile_size=16" if domain == "geotiff" else "workers=1",
            ]
        )
        == 0
    )
    _assert_clean([out / "manifest.csv", out / "quarantine.csv", out / "manifest.json"])
    assert str(tmp_path) not in (out / "manifest.csv").read_text() + (out / "quarantine.csv").read_text()


def test_dicom_scan_tokens_are_salted(tmp_path, monkeypatch):
    root = tmp_path / PHI / "pacs"
    write_series(root / f"{PHI}_CT" / "s1", ct_volume(0, (3, 16, 16)))
    (root / f"{PHI}_CT" / "broken.dcm").write_bytes(b"\x00" * 10)
    cache = tmp_path / PHI / "cache"

    def tokens(salt: str) -> list[str]:
        monkeypatch.setenv("INSITU_SALT", salt)
        m = create_domain("dicom", {"cache_dir": str(cache), "workers": 1}).scan(root)
        return [m.items[0].path, m.quarantine[0].path]

    a, b = tokens("salt-a"), tokens("salt-b")
    assert a == tokens("salt-a") and all(x != y for x, y in zip(a, b, strict=True))
    out = tmp_path / "scan"
    assert main(["-q", "scan", str(root), "--domain", "dicom", "--out", str(out), "--option", f"cache_dir={cache}"]) == 0
    _assert_clean([out / "manifest.csv", out / "quarantine.csv", out / "manifest.json"])


def test_dicom_salt_is_kept_private_without_the_environment(tmp_path):
    root = tmp_path / "pacs"
    write_series(root / "s1", ct_volume(0, (3, 16, 16)))
    first = create_domain("dicom", {"cache_dir": str(tmp_path / "c1"), "workers": 1}).scan(root).items[0].path
    again = create_domain("dicom", {"cache_dir": str(tmp_path / "c1"), "workers": 1}).scan(root).items[0].path
    other = create_domain("dicom", {"cache_dir": str(tmp_path / "c2"), "workers": 1}).scan(root).items[0].path
    assert first == again != other  # one random salt per private cache, reused
    assert (tmp_path / "c1" / "salt").is_file()
