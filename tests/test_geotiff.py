"""GeoTIFF domain: windows, band handling, nodata, labels, bad input, real Landsat/BigEarthNet files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from insitu.cli import main
from insitu.domains import IGNORE_INDEX, create_domain
from insitu.domains.geotiff import GeoTiffDomain, GeoTiffError, SceneRef, check_label_alignment, fill_invalid, grid_offsets
from insitu.errors import ConfigError, EmptyDatasetError
from tests.conftest import shared
from tests.data.geotiff_fixtures import corrupt_block, write_band_set, write_labels, write_scene


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_grid_offsets_cover_with_overlap_and_end_flush():
    assert grid_offsets(100, 32, 24) == [0, 24, 48, 68]
    assert grid_offsets(64, 32, 32) == [0, 32]
    assert grid_offsets(20, 32, 24) == [0]


def test_scan_grid_and_random_windows(tmp_path):
    write_scene(tmp_path / "s.tif", height=48, width=64)
    grid = GeoTiffDomain({"tile_size": 32, "overlap": 8}).scan(tmp_path)
    windows = [tuple(i.extra["window"]) for i in grid.items]
    assert windows == [(r, c, 32, 32) for r in (0, 16) for c in (0, 24, 32)]
    assert len({i.item_id for i in grid.items}) == len(windows) and len({i.group for i in grid.items}) == 1
    rnd = GeoTiffDomain({"tile_size": 16, "sampling": "random", "tiles_per_scene": 5, "seed": 3})
    first, again = rnd.scan(tmp_path), rnd.scan(tmp_path)
    assert [i.extra["window"] for i in first.items] == [i.extra["window"] for i in again.items]
    assert all(0 <= r <= 32 and 0 <= c <= 48 for r, c, _, _ in (i.extra["window"] for i in first.items))


def test_load_reads_window_with_band_names_and_geometry(tmp_path):
    path = write_scene(tmp_path / "s.tif", bands=3, descriptions=["B04", "B03", "B02"])
    dom = GeoTiffDomain({"tile_size": 16, "bands": ["B02", "B04"], "scale": 1e-4})
    manifest = dom.scan(tmp_path)
    item = next(i for i in manifest.items if i.extra["window"] == [16, 32, 16, 16])
    sample = dom.load(item, manifest)
    with rasterio.open(path) as src:
        expected = src.read([3, 1], window=Window(32, 16, 16, 16)).astype(np.float32) * np.float32(1e-4)
        expected_transform = list(src.window_transform(Window(32, 16, 16, 16)))[:6]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (2, 16, 16)
    assert torch.allclose(sample["image"], torch.from_numpy(expected))
    assert sample["meta"]["bands"] == ["B02", "B04"] and sample["meta"]["crs"] == "EPSG:32633"
    assert sample["meta"]["transform"] == expected_transform


def test_missing_band_is_an_error_naming_it(tmp_path):
    write_scene(tmp_path / "s.tif", bands=3, descriptions=["B04", "B03", "B02"])
    with pytest.raises(EmptyDatasetError, match="band 'B08' is missing"):
        GeoTiffDomain({"bands": ["B02", "B08"]}).scan(tmp_path)
    with pytest.raises(ValueError, match=r"bands \['B99'\] are not in preset 'sentinel2_l2a'"):
        GeoTiffDomain({"preset": "sentinel2_l2a", "bands": ["B99"]})


def test_wrong_band_count_for_preset_is_quarantined(tmp_path):
    write_scene(tmp_path / "four.tif", bands=4)
    write_scene(tmp_path / "twelve.tif", bands=12, height=16, width=16)
    manifest = GeoTiffDomain({"preset": "sentinel2_l2a", "tile_size": 16}).scan(tmp_path)
    assert {Path(i.path).name for i in manifest.items} == {"twelve.tif"}
    [q] = manifest.quarantine
    assert q.path.endswith("four.tif") and "wrong band count for preset 'sentinel2_l2a'" in q.message and "has 4 bands" in q.message


def test_nodata_is_explicit_and_filled_with_band_mean_not_zero(tmp_path):
    path = write_scene(tmp_path / "s.tif", bands=2, border=10, nodata=0)
    before = _sha(path)
    dom = GeoTiffDomain({"tile_size": 16, "max_nodata_fraction": 0.7})
    manifest = dom.scan(tmp_path)
    # column 0 tiles have 10/16 nodata (kept), no tile is all nodata
    item = next(i for i in manifest.items if i.extra["window"][:2] == [0, 0])
    assert item.extra["valid_fraction"] == pytest.approx(6 / 16)
    sample = dom.load(item, manifest)
    valid, image = sample["meta"]["valid"], sample["image"]
    assert valid.dtype == torch.bool and not valid[:, :10].any() and valid[:, 10:].all()
    for b in range(2):
        assert torch.allclose(image[b, :, :10], image[b][valid].mean().expand(16, 10))
    assert (image != 0).all()
    strict = GeoTiffDomain({"tile_size": 16, "max_nodata_fraction": 0.5}).scan(tmp_path)
    assert len(strict.items) == len(manifest.items) - 3 and "3 of 12 windows" in strict.skipped[0].message
    assert _sha(path) == before


def test_fill_invalid_uses_valid_pixels_only():
    image = np.array([[[1.0, 0.0], [3.0, np.nan]]], dtype=np.float32)
    valid = np.array([[True, False], [True, False]])
    assert fill_invalid(image, valid).tolist() == [[[1.0, 2.0], [3.0, 2.0]]]
    with pytest.raises(ValueError, match="no valid pixel"):
        fill_invalid(image, np.zeros_like(valid))


def test_all_nodata_scene_is_quarantined(tmp_path):
    write_scene(tmp_path / "empty.tif", border=64, width=64)
    with pytest.raises(EmptyDatasetError, match="empty.tif: all nodata"):
        GeoTiffDomain({"tile_size": 16}).scan(tmp_path)
    write_scene(tmp_path / "good.tif")
    manifest = GeoTiffDomain({"tile_size": 16}).scan(tmp_path)
    assert [q.reason for q in manifest.quarantine] == ["all nodata"] and len(manifest.items) == 12


def test_corrupt_block_quarantines_that_window_and_scan_continues(tmp_path):
    path = write_scene(tmp_path / "s.tif", tiled=True)
    corrupt_block(path, 1, 2)
    manifest = GeoTiffDomain({"tile_size": 16}).scan(tmp_path)
    assert len(manifest.items) == 11
    [q] = manifest.quarantine
    assert q.path == str(path) and q.reason == "block read failed at window (row 16, col 32, 16x16)"
    assert "IReadBlock failed" in q.message


def test_label_raster_gives_mask_and_majority_tile_label(tmp_path):
    write_scene(tmp_path / "s.tif", border=4)
    write_labels(tmp_path / "s_label.tif", classes=3)
    dom = GeoTiffDomain({"tile_size": 16})
    manifest = dom.scan(tmp_path)
    assert manifest.class_names == ["0", "1", "2"] and all(i.label in (0, 1, 2) for i in manifest.items)
    sample = dom.load(next(i for i in manifest.items if i.extra["window"][:2] == [0, 0]), manifest)
    mask = sample["mask"]
    assert mask.dtype == torch.int64 and (mask[0] == IGNORE_INDEX).all() and (mask[:, :4] == IGNORE_INDEX).all()
    assert set(mask[1:, 4:].unique().tolist()) <= {0, 1, 2}
    counts = np.bincount(mask[mask != IGNORE_INDEX].numpy())
    assert sample["label"] == int(counts.argmax())


def test_label_crs_mismatch_names_both_files_or_reprojects(tmp_path):
    write_scene(tmp_path / "s.tif")
    write_labels(tmp_path / "s_label.tif", crs="EPSG:32632")
    with pytest.raises(EmptyDatasetError) as err:
        GeoTiffDomain({"tile_size": 16}).scan(tmp_path)
    assert "s_label.tif does not match image" in str(err.value) and "s.tif" in str(err.value)
    scene = GeoTiffDomain({"labels": "none"}).open_scene(SceneRef(str(tmp_path / "s.tif")))
    with pytest.raises(GeoTiffError, match=r"s_label.tif does not match image .*s.tif: CRS EPSG:32632 vs EPSG:32633.*label_reproject"):
        check_label_alignment(scene, str(tmp_path / "s_label.tif"))


def test_shifted_label_raster_is_reprojected_when_configured(tmp_path):
    write_scene(tmp_path / "s.tif")
    write_labels(tmp_path / "s_label.tif", shift=160.0)  # 16 pixels east of the image
    dom = GeoTiffDomain({"tile_size": 16, "label_reproject": True})
    manifest = dom.scan(tmp_path)
    sample = dom.load(next(i for i in manifest.items if i.extra["window"] == [16, 0, 16, 16]), manifest)
    assert (sample["mask"] == IGNORE_INDEX).all()  # the label raster starts 16 px to the east
    with rasterio.open(tmp_path / "s_label.tif") as lab:
        direct = lab.read(1, window=Window(0, 16, 16, 16))
    sample = dom.load(next(i for i in manifest.items if i.extra["window"] == [16, 16, 16, 16]), manifest)
    assert torch.equal(sample["mask"], torch.from_numpy(direct.astype(np.int64)))


def test_band_files_at_mixed_resolutions_stack_on_finest_grid(tmp_path):
    write_band_set(tmp_path / "p", "tile_7", {"B02": 10, "B05": 20, "B01": 60}, size_10m=24)
    dom = GeoTiffDomain({"tile_size": 12, "resampling": "nearest"})
    manifest = dom.scan(tmp_path)
    assert len(manifest.items) == 4 and manifest.items[0].extra["prefix"] == "tile_7"
    sample = dom.load(next(i for i in manifest.items if i.extra["window"] == [12, 12, 12, 12]), manifest)
    assert sample["image"].shape == (3, 12, 12) and sample["meta"]["bands"] == ["B01", "B02", "B05"]
    with rasterio.open(tmp_path / "p" / "tile_7_B05.tif") as src:
        b05 = src.read(1)[6:12, 6:12].astype(np.float32)
    assert torch.equal(sample["image"][2], torch.from_numpy(np.kron(b05, np.ones((2, 2), np.float32))))


def test_sar_to_db_and_nonpositive_power_is_invalid(tmp_path):
    folder = tmp_path / "sar"
    write_band_set(folder, "s1", {"VV": 10, "VH": 10}, size_10m=8, dtype="float32")
    with rasterio.open(folder / "s1_VV.tif", "r+") as dst:
        data = dst.read(1)
        data[0, 0] = 0.0
        dst.write(data, 1)
    dom = GeoTiffDomain({"preset": "sentinel1", "tile_size": None})
    manifest = dom.scan(tmp_path)
    sample = dom.load(manifest.items[0], manifest)
    assert sample["meta"]["bands"] == ["VV", "VH"]
    assert not sample["meta"]["valid"][0, 0] and sample["meta"]["valid"].sum() == 63
    assert torch.isclose(sample["image"][0, 1, 1], torch.tensor(10 * np.log10(data[1, 1])), atol=1e-4)
    assert torch.isfinite(sample["image"]).all()


def test_cli_scan_writes_manifest_and_exit_codes(tmp_path):
    write_scene(tmp_path / "data" / "good.tif")
    write_scene(tmp_path / "data" / "empty.tif", border=64)
    (tmp_path / "data" / "junk.tif").write_bytes(b"not a tiff")
    assert (
        main(["-q", "scan", str(tmp_path / "data"), "--domain", "geotiff", "--out", str(tmp_path / "m"), "--option", "tile_size=16"]) == 0
    )
    lines = (tmp_path / "m" / "manifest.csv").read_text().splitlines()
    quarantine = (tmp_path / "m" / "quarantine.csv").read_text()
    assert len(lines) == 13 and "empty.tif,all nodata" in quarantine and "junk.tif,cannot use scene" in quarantine
    args = ["-q", "scan", str(tmp_path / "data" / "empty.tif"), "--domain", "geotiff", "--out", str(tmp_path / "e")]
    assert main(args) == 1
    assert main(args + ["--option", "overlap=500"]) == 2


def test_domain_is_registered_and_options_validate():
    assert isinstance(create_domain("geotiff", {"preset": "landsat8"}), GeoTiffDomain)
    from insitu.config import validate_options

    with pytest.raises(ConfigError, match="did you mean 'data.options.tile_size'"):
        validate_options(GeoTiffDomain.Options, {"tile_sise": 3}, "data.options", "test")


# ---------------------------------------------------------------- real sample data


def test_bigearthnet_patch_stacks_12_bands_at_120px():
    root = shared("satellite", "bigearthnet", "S2")
    dom = GeoTiffDomain({"preset": "sentinel2_l2a", "tile_size": None})
    manifest = dom.scan(root)
    assert len(manifest.items) == 3 and not manifest.quarantine
    item = next(i for i in manifest.items if i.extra["prefix"].endswith("87_48"))
    sample = dom.load(item, manifest)
    assert sample["image"].shape == (12, 120, 120)
    assert sample["meta"]["bands"][8] == "B8A" and "B10" not in sample["meta"]["bands"]
    assert sample["meta"]["tags"] == ["Non-irrigated arable land", manifest.class_names[0]]
    assert sample["multilabel"].sum() == 2
    with rasterio.open(next(Path(item.path).glob("*_B01.tif"))) as src:  # 60 m: 20x20 -> 120x120
        b01 = src.read(1).astype(np.float32) * np.float32(1e-4)
    assert torch.isclose(sample["image"][0].mean(), torch.tensor(b01.mean()), rtol=0.02)
    assert 0.0 < float(sample["image"].min()) and float(sample["image"].max()) < 1.5  # reflectance, not DN


def test_bigearthnet_s1_patch_in_db():
    root = shared("satellite", "bigearthnet", "S1")
    dom = GeoTiffDomain({"preset": "sentinel1_db", "tile_size": None})
    manifest = dom.scan(root)
    sample = dom.load(manifest.items[0], manifest)
    assert sample["image"].shape == (2, 120, 120) and float(sample["image"].mean()) < 0
    with pytest.raises(EmptyDatasetError, match="to_db: false"):
        GeoTiffDomain({"preset": "sentinel1", "tile_size": None}).scan(root)


def test_landsat_nodata_border_is_masked():
    path = shared("satellite", "rasterio", "RGB.byte.tif")
    before = _sha(path)
    dom = GeoTiffDomain({"band_names": ["red", "green", "blue"], "tile_size": 64, "max_nodata_fraction": 0.9})
    manifest = dom.scan(path)
    item = min(manifest.items, key=lambda i: i.extra["valid_fraction"])  # a tile on the nodata border
    sample = dom.load(item, manifest)
    with rasterio.open(path) as src:
        raw = src.read(window=Window(item.extra["window"][1], item.extra["window"][0], 64, 64))
    valid = sample["meta"]["valid"].numpy()
    assert 0 < valid.mean() < 0.9 and np.array_equal(valid, (raw != 0).all(axis=0))  # nodata=0 in every band
    assert (sample["image"].numpy()[:, ~valid] > 0).all()  # filled with band means, not zeros
    assert _sha(path) == before
