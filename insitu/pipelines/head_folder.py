"""A fine-tuned model's folder, as ``insitu predict`` reads it: ``head.safetensors``, ``head.json``, ``config.yaml``.

The folder names its adapter package by a path relative to itself and the package's content hash,
never by an absolute path (head folders are shared).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from insitu.adapters.package import load_package
from insitu.config import RunConfig, dump_config
from insitu.domains.normalize import Normalizer
from insitu.errors import ConfigError
from insitu.io import write_json
from insitu.pipelines.downstream_model import DownstreamModel, FinetuneResult, build_model, downstream_of
from insitu.pipelines.preprocess import Preprocessing

HEAD_FILE, HEAD_META = "head.safetensors", "head.json"


def save_head(
    model: DownstreamModel,
    cfg: RunConfig,
    adapter: Path | None,
    prep: Preprocessing,
    k: int,
    class_names: list[str],
    result: FinetuneResult,
    out_dir: Path,
) -> Path:
    """Write ``head.safetensors`` (head, plus adapters when they were trained) and ``head.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = downstream_of(cfg)
    tensors = {f"head.{k_}": v.detach().contiguous() for k_, v in model.head.state_dict().items()}
    if model.adapted.adapters is not None:
        tensors |= {f"adapter.{k_}": v.detach().contiguous() for k_, v in model.adapted.adapters.state_dict().items()}
    save_file(tensors, str(out_dir / HEAD_FILE))
    meta = {
        "task": ds.task,
        "num_classes": k,
        "class_names": class_names,
        "image_size": prep.image_size,
        "in_chans": prep.in_chans,
        "preprocessing": prep.to_dict(),
        "adapter_package": package_ref(Path(adapter), out_dir) if adapter is not None else None,
        "metrics": result.metrics,
        "trainable_params": result.trainable_params,
        "domain": (cfg.probe.train or cfg.data).domain,
        "domain_options": (cfg.probe.train or cfg.data).options,
    }
    write_json(out_dir / HEAD_META, meta)
    dump_config(cfg, out_dir / "config.yaml")
    return out_dir


def load_head(model_dir: Path) -> tuple[DownstreamModel, dict[str, Any], Normalizer | None]:
    """Rebuild a saved downstream model (backbone from its config, adapters and head from safetensors).

    Returns the model, ``head.json`` (with ``preprocessing``: the contract training used, as a
    `Preprocessing`) and the contract's normaliser. Head folders written before the contract
    existed store ``normalizer`` and ``image_size`` only; they load too.
    """
    from insitu.config import load_config

    model_dir = Path(model_dir)
    if not (model_dir / HEAD_META).is_file():
        raise ConfigError(f"{model_dir} holds no {HEAD_META}; pass the folder `insitu finetune --out` wrote.")
    meta = json.loads((model_dir / HEAD_META).read_text())
    cfg = load_config(model_dir / "config.yaml", check_paths=False)
    adapter = resolve_package_ref(model_dir, meta["adapter_package"])
    model = build_model(cfg, adapter, meta["num_classes"])
    tensors = load_file(str(model_dir / HEAD_FILE))
    model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    if model.adapted.adapters is not None:
        model.adapted.adapters.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
    stored = meta.get("preprocessing") or {
        "normalizer": meta.get("normalizer"),
        "image_size": meta["image_size"],
        "in_chans": meta["in_chans"],
    }
    meta["preprocessing"] = Preprocessing.from_dict(stored, source=f"{model_dir}/{HEAD_META}")
    return model.eval(), meta, meta["preprocessing"].normalizer


def package_ref(adapter: Path, head_dir: Path) -> dict[str, Any]:
    """How a head folder names its adapter package: a path relative to the head folder (never an
    absolute one: head folders are shared) and the package's content hash."""
    rel = os.path.relpath(Path(adapter).resolve(), Path(head_dir).resolve())
    return {"path": Path(rel).as_posix(), "content_sha256": load_package(adapter).meta.content_sha256}


def resolve_package_ref(head_dir: Path, ref: str | dict[str, Any] | None) -> Path | None:
    """The adapter package a head folder was trained with; a typed error when it moved or changed.

    Head folders written before the relative form stored an absolute path (a plain string).
    """
    if not ref:
        return None
    path = Path(ref) if isinstance(ref, str) else (Path(head_dir) / ref["path"]).resolve()
    where = ref if isinstance(ref, str) else f"{ref['path']} (relative to the head folder)"
    if not path.exists():
        raise ConfigError(
            f"{head_dir}/{HEAD_META} was trained with the adapter package at {where}, which is not there. "
            "Keep the head folder and its adapter package where they were relative to each other (copy both together)."
        )
    expected = None if isinstance(ref, str) else ref.get("content_sha256")
    found = load_package(path).meta.content_sha256
    if expected and found != expected:
        raise ConfigError(
            f"{head_dir}/{HEAD_META} was trained with an adapter package of content hash {expected[:12]}…, "
            f"but {path} holds {str(found)[:12]}…: this head only fits the package it was trained with."
        )
    return path
