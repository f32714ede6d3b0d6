"""The documented import path of `insitu.domains.geotiff.write.predict_scene` (README, docs/remote_sensing.md)."""

from insitu.domains.geotiff.write import predict_scene

__all__ = ["predict_scene"]
