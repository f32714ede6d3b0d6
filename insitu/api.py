"""The Python API for scripts: a few functions that hospital and lab workflows call directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from insitu.adapters import AdaptedBackbone, MultiAdapterBackbone
from insitu.adapters.package import AdapterPackage, apply_package, load_package
from insitu.backbones import ViTBackbone, create_backbone
from insitu.config import BackboneConfig, RunConfig, load_config
from insitu.domains.near_duplicates import split_class_folders
from insitu.domains.normalize import Normalizer
from insitu.errors import ConfigError
from insitu.pipelines.data import ScannedData
from insitu.pipelines.preprocess import resolve_preprocessing
from insitu.pipelines.pretrain import PretrainResult
from insitu.pipelines.pretrain import pretrain as _pretrain
from insitu.pipelines.probe import ProbeRow, extract_features
from insitu.pipelines.probe import run_probe as _run_probe


def pretrain(
    config: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | None = None, resume: bool = False, quiet: bool = True
) -> PretrainResult:
    """Run continual pretraining from a YAML path, a dict or a `RunConfig`."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return _pretrain(cfg, resume=resume, quiet=quiet)


def probe(config: str | Path | dict[str, Any] | RunConfig, adapters: list[str | Path] | None = None) -> list[ProbeRow]:
    """Repeated linear-probe/kNN (and dense) evaluation of the frozen backbone and each adapter package.

    One ``ProbeRow`` per model: ``linear_acc``/``knn_acc`` are full-label means over folds × repeats;
    ``results`` holds every probe × label share × metric with mean ± std and, for adapted models,
    adapted − frozen with its paired bootstrap CI and verdict (docs/evaluation.md).
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    return _run_probe(cfg, [Path(a) for a in adapters or []])


def load_adapter(path: str | Path, backbone: ViTBackbone | BackboneConfig | dict[str, Any]) -> AdaptedBackbone:
    """Attach an adapter package to a backbone (built from a spec if needed); checks the fingerprint."""
    bb = backbone if isinstance(backbone, ViTBackbone) else create_backbone(backbone)
    return apply_package(path, bb)


def load_adapters(
    paths: dict[str, str | Path] | list[str | Path], backbone: ViTBackbone | BackboneConfig | dict[str, Any]
) -> MultiAdapterBackbone:
    """Several adapter packages on one frozen backbone, switched by name with ``.use(name)``.

    ``paths`` maps names to packages (a list is named by each package's folder/file stem). Every
    package is checked against the backbone's fingerprint, as in :func:`load_adapter`; the first
    one is active. One backbone in memory serves every site or sensor.
    """
    bb = backbone if isinstance(backbone, ViTBackbone) else create_backbone(backbone)
    named = paths if isinstance(paths, dict) else {Path(p).stem: p for p in paths}
    if len(named) != len(paths):
        raise ConfigError(f"two adapter packages share a name: {[str(p) for p in paths]}; pass a dict of distinct names.")
    multi = MultiAdapterBackbone(bb)
    for name, path in named.items():
        multi.add(name, apply_package(path, bb).adapters)
    return multi


def embed_folder(
    root: str | Path,
    model: AdaptedBackbone | ViTBackbone,
    domain: str = "images",
    options: dict[str, Any] | None = None,
    image_size: int | None = None,
    normalizer: Normalizer | dict[str, Any] | None = None,
    batch_size: int = 64,
    package: AdapterPackage | str | Path | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Features (CLS ‖ mean patch token) for every usable item under ``root``, with their item ids.

    With an adapter package, pass it as ``package`` (its whole preprocessing contract is used and
    checked against the folder: normaliser, stored size unless ``image_size`` is given, channels and
    bands), or pass its ``meta.normalizer`` as ``normalizer``; otherwise statistics are fitted on the
    folder itself (`insitu.pipelines.preprocess`).
    """
    from insitu.config import DataConfig

    model = model if isinstance(model, AdaptedBackbone) else AdaptedBackbone(model, None)
    data = ScannedData.scan(DataConfig(domain=domain, root=Path(root), options=options or {}, image_size=image_size or model.img_size))
    items = data.manifest.items
    pkg = load_package(package) if isinstance(package, (str, Path)) else package
    stored = pkg if pkg is not None else Normalizer.from_dict(normalizer) if isinstance(normalizer, dict) else normalizer
    prep = resolve_preprocessing(stored, data, items, image_size, model)  # size None: the package's, else the model's
    feats, _ = extract_features(model, prep.dataset(data, items), batch_size)
    return feats, [i.item_id for i in items]


__all__ = [
    "MultiAdapterBackbone",
    "embed_folder",
    "load_adapter",
    "load_adapters",
    "load_config",
    "load_package",
    "pretrain",
    "probe",
    "split_class_folders",
]
