"""EuroSAT-MS through the geotiff domain: real Sentinel-2 patches from ../shared/data (skipped when absent).

A few real files, linked into class folders under tmp_path, so the scan stays fast: 13 bands in the EuroSAT MS order,
uint16 digital numbers scaled to reflectance, the UTM georeferencing, labels from the class folders, one group per patch.
"""

from pathlib import Path

import numpy as np
import pytest
import rasterio

from insitu.config import load_config
from insitu.domains import create_domain
from insitu.domains.geotiff import GeoTiffError

ROOT = Path(__file__).resolve().parents[1]
EUROSAT = ROOT.parent / "shared" / "data" / "satellite" / "eurosat_ms"
CONFIG = ROOT / "configs" / "remote_sensing" / "eurosat_ms.yaml"
pytestmark = pytest.mark.skipif(not EUROSAT.is_dir(), reason=f"real EuroSAT-MS patches not found at {EUROSAT} (../shared/data is absent)")
CLASSES = ["Forest", "River", "SeaLake"]


@pytest.fixture()
def few(tmp_path):
    """Two real patches from each of three classes, linked as <root>/<Class>/<file>.tif."""
    for name in CLASSES:
        (tmp_path / name).mkdir()
        for src in sorted((EUROSAT / name).glob("*.tif"))[:2]:
            (tmp_path / name / src.name).symlink_to(src)
    return tmp_path


def test_the_config_reads_real_patches_with_labels_from_class_folders(few):
    cfg = load_config(CONFIG)
    assert cfg.backbone.in_chans == 13 and cfg.backbone.bands == cfg.data.options["band_names"]
    domain = create_domain(cfg.data.domain, cfg.data.options)
    manifest = domain.scan(few)
    assert manifest.class_names == CLASSES and not manifest.quarantine
    assert sorted(i.label for i in manifest.items) == [0, 0, 1, 1, 2, 2]
    assert len({i.group for i in manifest.items}) == 6  # folds by patch
    for item in manifest.items:
        assert Path(item.path).parent.name == CLASSES[item.label]
    sample = domain.load(manifest.items[0], manifest)
    image, meta = sample["image"], sample["meta"]
    assert image.shape == (13, 64, 64) and image.dtype.is_floating_point
    assert meta["bands"] == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]
    with rasterio.open(manifest.items[0].path) as src:  # uint16 DN, no band descriptions, UTM at 10 m
        raw = src.read()
        assert src.count == 13 and src.dtypes[0] == "uint16" and src.crs.to_string() == meta["crs"]
        assert src.crs.to_epsg() // 100 == 326 and abs(src.transform.a - 10.0) < 0.05  # ~10 m pixels
    assert np.allclose(image.numpy(), raw.astype(np.float32) * 1e-4, atol=1e-6)
    assert meta["transform"][:3] == pytest.approx(list(src.transform)[:3]) and meta["valid"].all()
    # reflectance in a plausible range; B8A (NIR, last) brighter than B04 (red) over forest
    forest = [domain.load(i, manifest)["image"] for i in manifest.items if i.label == 0]
    assert all(0.0 <= float(x.min()) and float(x.max()) < 2.0 for x in forest)
    assert all(float(x[12].mean()) > float(x[3].mean()) for x in forest)


def test_folder_labels_need_class_folders(few):
    (few / "loose.tif").symlink_to(sorted((EUROSAT / "River").glob("*.tif"))[0])
    domain = create_domain("geotiff", {"band_names": None, "scale": 1e-4, "tile_size": None, "labels": "folders"})
    with pytest.raises(GeoTiffError, match="not inside a class folder"):
        domain.scan(few)
    (few / "loose.tif").unlink()
    domain = create_domain("geotiff", {"tile_size": None, "labels": "folders", "class_names": ["Forest", "River"]})
    with pytest.raises(GeoTiffError, match="'SeaLake' .* not in data.options.class_names"):
        domain.scan(few)
