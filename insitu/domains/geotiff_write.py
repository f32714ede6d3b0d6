"""The old import path of `insitu.domains.geotiff.write` (whole-scene prediction) and the demo scene writer."""

from __future__ import annotations

from insitu.domains.geotiff.demo import DEMO_SPECTRA, write_demo_scene
from insitu.domains.geotiff.write import Predictor, predict_scene, tent_weights

__all__ = ["DEMO_SPECTRA", "Predictor", "predict_scene", "tent_weights", "write_demo_scene"]
