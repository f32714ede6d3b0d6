"""Whole-scene tiled prediction written back as georeferenced GeoTIFF/COG."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from insitu.domains import IGNORE_INDEX
from insitu.domains.geotiff import GeoTiffDomain
from insitu.domains.geotiff.write import predict_scene, tent_weights
from tests.conftest import shared
from tests.data.geotiff_fixtures import write_scene


def brightest_band(tile: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'classifier': softmax over bands, so the class is the brightest band."""
    return torch.softmax(tile / 500.0, dim=0)


def test_prediction_matches_direct_per_pixel_result_and_keeps_georeferencing(tmp_path):
    src_path = write_scene(tmp_path / "s.tif", bands=3, height=50, width=70, border=5, seed=1)
    dom = GeoTiffDomain({"tile_size": 16, "overlap": 6})
    out = predict_scene(dom, src_path, brightest_band, tmp_path / "pred" / "classes.tif", 3, probabilities_path=tmp_path / "pred" / "p.tif")
    with rasterio.open(src_path) as src, rasterio.open(out) as pred, rasterio.open(tmp_path / "pred" / "p.tif") as prob:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.nodata == IGNORE_INDEX and pred.dtypes == ("uint8",)
        raw = src.read().astype(np.float32)
        classes, probs = pred.read(1), prob.read()
    expected = raw.argmax(axis=0)
    assert (classes[:, :5] == IGNORE_INDEX).all() and np.isnan(probs[:, :, :5]).all()
    assert np.array_equal(classes[:, 5:], expected[:, 5:])  # a per-pixel model is unchanged by blending
    direct = torch.softmax(torch.from_numpy(raw) / 500.0, dim=0).numpy()
    assert np.allclose(probs[:, :, 5:], direct[:, :, 5:], atol=1e-5)


def test_cog_output_on_real_landsat_scene(tmp_path):
    path = shared("satellite", "rasterio", "RGB.byte.tif")
    dom = GeoTiffDomain({"band_names": ["red", "green", "blue"], "tile_size": 128, "overlap": 32})
    out = predict_scene(dom, path, lambda t: torch.stack([t[0] < t[2], t[0] >= t[2]]).float(), tmp_path / "landsat.tif", 2, cog=True)
    with rasterio.open(path) as src, rasterio.open(out) as pred:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        nodata = (src.read() == 0).any(axis=0)  # a pixel is nodata when any of its bands is
        classes = pred.read(1)
    assert (classes[nodata] == IGNORE_INDEX).all() and set(np.unique(classes[~nodata])) <= {0, 1}


def test_documented_import_path_still_works():
    from insitu.domains.geotiff_write import predict_scene as documented  # README and docs/remote_sensing.md

    assert documented is predict_scene


def test_tent_weights_positive_and_centred():
    w = tent_weights(5, 4)
    assert (w > 0).all() and w[2, 1] == w.max() and w[0, 0] == w.min()
    # by hand: rows ramp 1,2,3,2,1 over ceil(5/2) = 3; columns 1,2,2,1 over 2; weights are their outer product
    rows, cols = np.array([1, 2, 3, 2, 1]) / 3, np.array([1, 2, 2, 1]) / 2
    assert np.allclose(w, np.outer(rows, cols)) and w.dtype == np.float32
    assert np.array_equal(tent_weights(6, 6), tent_weights(6, 6)[::-1, ::-1])  # symmetric about the centre


def test_wrong_prediction_shape_is_a_clear_error(tmp_path):
    path = write_scene(tmp_path / "s.tif", bands=2, height=16, width=16)
    with pytest.raises(ValueError, match=r"expected \(3, 16, 16\)"):
        predict_scene(GeoTiffDomain({"tile_size": 16}), path, lambda t: t, tmp_path / "o.tif", 3)
