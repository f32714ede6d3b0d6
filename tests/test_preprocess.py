"""The preprocessing contract: stored in adapter packages, resolved by one rule, applied as prediction applies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from insitu.adapters.package import load_package
from insitu.config import BackboneConfig, DataConfig
from insitu.domains.normalize import Normalizer
from insitu.errors import AdapterFormatError, ConfigError
from insitu.pipelines import preprocess
from insitu.pipelines.data import ScannedData, fit_normalizer, model_input
from insitu.pipelines.preprocess import Preprocessing, package_preprocessing, resolve_comparison, resolve_preprocessing
from tests.conftest import TINY_BACKBONE, tiny_package
from tests.data.geotiff_fixtures import write_scene

BACKBONE = BackboneConfig(**TINY_BACKBONE, bands=["red", "green", "blue"])


def _shapes(root: Path, **options) -> ScannedData:
    return ScannedData.scan(DataConfig(domain="images", root=root, image_size=32, options=options))


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_contract_round_trips_through_a_saved_package(shapes_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = _shapes(shapes_dir)
    items = data.manifest.items
    made = resolve_preprocessing(None, data, items, 32, BACKBONE)  # what pretraining stores
    assert made.normalizer == fit_normalizer(data, items) and made.bands == ("red", "green", "blue") and made.channel_init == "mean"
    _, _, path = tiny_package(tmp_path / "pkg", input_info=made.input_section("images"), normalizer=made.normalizer.to_dict())
    pkg = load_package(path)
    assert package_preprocessing(pkg) == made
    assert Preprocessing.from_dict(json.loads(json.dumps(made.to_dict()))) == made

    def no_fit(*_):  # a package with a normaliser is never refitted
        raise AssertionError("fit_normalizer called")

    monkeypatch.setattr(preprocess, "fit_normalizer", no_fit)
    assert resolve_preprocessing(pkg, data, items, None, BACKBONE) == made
    assert resolve_preprocessing(pkg, data, items, 48, BACKBONE).image_size == 48  # an explicit size wins; the rest is stored


def test_stored_contract_holds_no_path_or_identifier(shapes_dir: Path, tmp_path: Path) -> None:
    made = resolve_preprocessing(None, _shapes(shapes_dir), _shapes(shapes_dir).manifest.items, 32, BACKBONE)
    _, _, path = tiny_package(tmp_path / "pkg", input_info=made.input_section("images"), normalizer=made.normalizer.to_dict())
    stored = load_package(path).meta.input | {"normalizer": made.to_dict()["normalizer"]}
    assert set(stored) == {"domain", "channels", "image_size", "resize", "in_chans", "bands", "channel_init", "normalizer"}
    assert _strings(stored) == ["images", "square-antialias", "red", "green", "blue", "mean"]
    assert str(tmp_path) not in json.dumps(stored) and str(shapes_dir) not in json.dumps(stored)
    with pytest.raises(ConfigError, match="without path separators"):
        Preprocessing(None, 32, 1, bands=["/home/site/scan.tif"])


def test_apply_is_model_input_byte_for_byte() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = Normalizer([100.0, 50.0, 0.0], [20.0, 10.0, 2.0], [60.0, 20.0, -4.0], [140.0, 80.0, 4.0])
    prep = Preprocessing(norm, 32, 3)
    for h, w in ((50, 40), (20, 24), (32, 32)):  # shrinking (antialiased), enlarging, unchanged
        image = torch.randn(3, h, w, generator=gen) * 30 + 80
        out = prep.apply(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.numpy().tobytes() == model_input(image, norm, 32).numpy().tobytes()
        assert not torch.equal(out, model_input(image, None, 32))  # the normaliser is applied


def test_old_package_still_resolves(shapes_dir: Path, tmp_path: Path) -> None:
    data = _shapes(shapes_dir)
    items = data.manifest.items
    _, _, old = tiny_package(tmp_path / "old", input_info={"image_size": 32, "channels": 3})  # before the contract
    prep = resolve_preprocessing(load_package(old), data, items, None, BACKBONE)
    assert prep == Preprocessing(Normalizer([0.0] * 3, [1.0] * 3), 32, 3, None, None, "square-antialias")
    _, _, bare = tiny_package(tmp_path / "bare", input_info={}, normalizer=None)  # no input, no normaliser (federated-like)
    prep = resolve_preprocessing(load_package(bare), data, items, None, BACKBONE)
    assert prep.image_size == 32 and prep.in_chans == 3 and prep.normalizer == fit_normalizer(data, items)


def test_comparison_rule_frozen_row_sees_the_first_stored_normaliser(shapes_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = _shapes(shapes_dir)
    items = data.manifest.items
    own = Normalizer([10.0] * 3, [3.0] * 3)
    _, _, none_path = tiny_package(tmp_path / "fed", input_info={"image_size": 32}, normalizer=None)
    _, _, own_path = tiny_package(tmp_path / "own", input_info={"image_size": 32}, normalizer=own.to_dict())
    fed, with_own = load_package(none_path), load_package(own_path)
    preps = resolve_comparison([None, fed, with_own], data, items, 32, BACKBONE)
    assert [p.normalizer for p in preps] == [own, own, own]
    fits = []
    monkeypatch.setattr(preprocess, "fit_normalizer", lambda d, i: fits.append(1) or fit_normalizer(d, i))
    preps = resolve_comparison([None, fed], data, items, 32, BACKBONE)
    assert fits == [1] and preps[0].normalizer == preps[1].normalizer == fit_normalizer(data, items)


def test_channel_and_band_mismatch_name_the_package_and_the_fix(tmp_path: Path) -> None:
    write_scene(tmp_path / "scenes" / "s.tif", bands=3, descriptions=["B04", "B03", "B02"])
    data = ScannedData.scan(DataConfig(domain="geotiff", root=tmp_path / "scenes", options={"tile_size": 32}, image_size=32))
    backbone = BackboneConfig(**TINY_BACKBONE)
    made = resolve_preprocessing(None, data, data.manifest.items, 32, backbone)
    assert made.bands == ("B04", "B03", "B02")  # the data's own band names
    _, _, path = tiny_package(tmp_path / "pkg", input_info=made.input_section("geotiff"), normalizer=made.normalizer.to_dict())
    pkg = load_package(path)

    def scan(bands: list[str]) -> ScannedData:
        return ScannedData.scan(DataConfig(domain="geotiff", root=tmp_path / "scenes", options={"tile_size": 32, "bands": bands}))

    reordered = scan(["B02", "B03", "B04"])
    with pytest.raises(ConfigError, match=r"in the order.*data\.options\.bands: \['B04', 'B03', 'B02'\]") as err:
        resolve_preprocessing(pkg, reordered, reordered.manifest.items, None, backbone)
    assert str(path) in str(err.value)
    fewer = scan(["B04", "B03"])
    with pytest.raises(ConfigError, match=r"expects 3 input channels \(B04, B03, B02\) but the data gives 2") as err:
        resolve_preprocessing(pkg, fewer, fewer.manifest.items, None, backbone)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match=r"backbone.in_chans is 4\. Set backbone.in_chans: 3"):
        resolve_preprocessing(pkg, data, data.manifest.items, None, BackboneConfig(**{**TINY_BACKBONE, "in_chans": 4}))
    fixed = scan(["B04", "B03", "B02"])
    assert resolve_preprocessing(pkg, fixed, fixed.manifest.items, None, backbone) == made  # the fix works


def test_backbone_without_package_checks_the_data_channels(shapes_dir: Path) -> None:
    grey = _shapes(shapes_dir, channels=1)
    fix = r"gives 1 channels per image but the backbone takes 3 \(backbone.in_chans\)\. Set backbone.in_chans: 1"
    with pytest.raises(ConfigError, match=fix):
        resolve_preprocessing(None, grey, grey.manifest.items, 32, BACKBONE)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resize", "crop", "input.resize 'crop' is not one of"),
        ("bands", ["B04", "B03"], "input.bands must be 3 band names"),
        ("in_chans", 4, "input.in_chans 4 is not the base's in_chans 3"),
    ],
)
def test_package_schema_checks_contract_keys(tmp_path: Path, field: str, value, message: str) -> None:
    _, _, path = tiny_package(tmp_path / "pkg", input_info={"image_size": 32, field: value})
    with pytest.raises(AdapterFormatError, match=message):
        load_package(path)
