"""The shareable adapter package: ``adapter.safetensors`` + ``insitu.json`` + ``README.md``.

A package is a folder or a ``.zip`` of those files. Loading reads tensors only through safetensors
(nothing is ever unpickled), validates ``insitu.json`` against a schema, and refuses to attach to
a backbone whose fingerprint, width, patch size or channels differ, naming each differing field.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from insitu.adapters import AdaptedBackbone, AdapterSet, adapters_from_config
from insitu.backbones.vit import ViTBackbone
from insitu.errors import AdapterFormatError, AdapterMismatchError

FORMAT = "insitu-adapter"
FORMAT_VERSION = 1
TENSORS_FILE, META_FILE, CARD_FILE = "adapter.safetensors", "insitu.json", "README.md"
MAX_HEADER_BYTES = 16 * 1024 * 1024
UNSAFE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


class BaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    fingerprint: str
    embed_dim: int
    patch_size: int
    in_chans: int
    img_size: int
    num_blocks: int


class PackageMeta(BaseModel):
    """The schema of ``insitu.json``."""

    model_config = ConfigDict(extra="forbid")
    format: str
    format_version: int
    base: BaseInfo
    adapter: dict[str, Any]
    input: dict[str, Any]
    normalizer: dict[str, Any] | None
    objective: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    trainable_params: int
    tensors: dict[str, int]
    config: dict[str, Any]
    license: str = "unspecified"


@dataclass
class AdapterPackage:
    """A validated package in memory: its metadata and its tensors (adapter.* and head.*)."""

    meta: PackageMeta
    tensors: dict[str, torch.Tensor]
    path: Path

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k[len("adapter.") :]: v for k, v in self.tensors.items() if k.startswith("adapter.")}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k[len("head.") :]: v for k, v in self.tensors.items() if k.startswith("head.")}


def base_info(backbone: ViTBackbone) -> dict[str, Any]:
    return {
        "source": backbone.source,
        "fingerprint": backbone.fingerprint,
        "embed_dim": backbone.embed_dim,
        "patch_size": backbone.patch_size,
        "in_chans": backbone.in_chans,
        "img_size": backbone.img_size,
        "num_blocks": backbone.num_blocks,
    }


def save_package(
    out_dir: Path,
    backbone: ViTBackbone,
    adapters: AdapterSet,
    *,
    head_state: dict[str, torch.Tensor] | None = None,
    input_info: dict[str, Any] | None = None,
    normalizer: dict[str, Any] | None = None,
    objective: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a package folder; returns its path. Only tensors go into the safetensors file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in (head_state or {}).items()})
    save_file(tensors, str(out_dir / TENSORS_FILE))
    meta = PackageMeta(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        base=BaseInfo(**base_info(backbone)),
        adapter=adapters.config(),
        input=input_info or {},
        normalizer=normalizer,
        objective=objective or {},
        training=training or {},
        metrics=metrics or {},
        trainable_params=sum(p.numel() for p in adapters.parameters()),
        tensors={"adapter": sum(k.startswith("adapter.") for k in tensors), "head": sum(k.startswith("head.") for k in tensors)},
        config=redact_paths(config or {}),
    )
    (out_dir / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2))
    (out_dir / CARD_FILE).write_text(model_card(meta))
    return out_dir


def load_package(path: str | Path) -> AdapterPackage:
    """Read and validate a package folder or ``.zip``; raises `AdapterFormatError` on anything off."""
    path = Path(path)
    if path.suffix.lower() in UNSAFE_SUFFIXES:
        raise AdapterFormatError(
            f"{path} is a pickle-based file; insitu never unpickles. Convert it to an adapter package "
            "(adapter.safetensors + insitu.json) with safetensors.torch.save_file on a trusted machine."
        )
    files = _read_files(path)
    meta = _parse_meta(files[META_FILE], path)
    tensors = _parse_tensors(files[TENSORS_FILE], path)
    return AdapterPackage(meta, tensors, path)


def apply_package(package: AdapterPackage | str | Path, backbone: ViTBackbone) -> AdaptedBackbone:
    """Attach a package's adapters to ``backbone``; refuses a package made for another base."""
    pkg = package if isinstance(package, AdapterPackage) else load_package(package)
    check_compatible(pkg.meta, backbone)
    adapters = adapters_from_config(pkg.meta.adapter)
    state = pkg.adapter_state()
    expected = adapters.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterFormatError(f"{pkg.path}: adapter tensors do not match its config: missing {missing}, unexpected {unexpected}.")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        raise AdapterFormatError(f"{pkg.path}: tensors with wrong shapes: {bad}.")
    adapters.load_state_dict(state, strict=True)
    return AdaptedBackbone(backbone, adapters)


def check_compatible(meta: PackageMeta, backbone: ViTBackbone) -> None:
    """Raise `AdapterMismatchError` naming every base field that differs."""
    want = meta.base.model_dump()
    have = base_info(backbone)
    fields = {k: (want[k], have[k]) for k in ("fingerprint", "embed_dim", "patch_size", "in_chans", "num_blocks") if want[k] != have[k]}
    if fields:
        detail = "; ".join(f"{k}: package {a!r} vs backbone {b!r}" for k, (a, b) in fields.items())
        raise AdapterMismatchError(
            f"Adapter package was made for base {meta.base.source!r}, not this backbone ({backbone.source!r}): {detail}. "
            "Load the base backbone it names (same weights) before applying it.",
            fields,
        )


def redact_paths(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config with local paths removed (folder names can identify people)."""
    out = json.loads(json.dumps(config, default=str))
    probe = out.get("probe", {}) or {}
    dense = probe.get("dense") or {}
    for section in (out.get("data"), *probe.values(), *dense.values()):
        if isinstance(section, dict) and "root" in section:
            section["root"] = "<local path>"
            if (section.get("options") or {}).get("masks"):
                section["options"]["masks"] = "<local path>"
    if "out_dir" in out:
        out["out_dir"] = "<local path>"
    bb = out.get("backbone") or {}
    if bb.get("weights"):
        bb["weights"] = Path(str(bb["weights"])).name
    return out


def write_zip(package_dir: Path, zip_path: Path) -> Path:
    """Pack a package folder into one ``.zip`` (stored, so tensors stay byte-identical)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in (TENSORS_FILE, META_FILE, CARD_FILE):
            zf.write(Path(package_dir) / name, arcname=name)
    return zip_path


def model_card(meta: PackageMeta) -> str:
    """A human-readable README for the package."""
    t, b = meta.training, meta.base
    lines = [
        "# insitu adapter package",
        "",
        f"- Base backbone: `{b.source}` (fingerprint `{b.fingerprint[:16]}…`, {b.num_blocks} blocks, "
        f"width {b.embed_dim}, patch {b.patch_size}, {b.in_chans} input channels)",
        f"- Adapter: `{meta.adapter.get('kind')}` on blocks {meta.adapter.get('blocks')}, {meta.trainable_params:,} trainable parameters",
        f"- Input: {json.dumps(meta.input)}",
        f"- Objective: `{meta.objective.get('name', '?')}`",
        f"- Training: {t.get('steps', '?')} steps, seed {t.get('seed', '?')}, {t.get('items', '?')} items "
        f"({t.get('quarantined', 0)} quarantined), device {t.get('device', '?')}",
        f"- License: {meta.license}",
        "",
        "## Metrics",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in meta.metrics.items()] or ["- none recorded"]
    lines += ["", "Load it with `insitu.load_adapter(path, backbone)`; it refuses any other base."]
    return "\n".join(lines) + "\n"


def _read_files(path: Path) -> dict[str, bytes]:
    names = (META_FILE, TENSORS_FILE)
    if path.is_dir():
        for bad in path.iterdir():
            if bad.suffix.lower() in UNSAFE_SUFFIXES:
                raise AdapterFormatError(f"{bad} is a pickle-based file inside the package; remove it (insitu never unpickles).")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise AdapterFormatError(f"{path} is not an adapter package: missing {missing}.")
        return {n: (path / n).read_bytes() for n in names}
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            missing = [n for n in names if n not in members]
            if missing:
                raise AdapterFormatError(f"{path} is not an adapter package: the zip lacks {missing}.")
            return {n: zf.read(n) for n in names}
    raise AdapterFormatError(f"{path} is neither a package folder nor a .zip package.")


def _parse_meta(raw: bytes, path: Path) -> PackageMeta:
    try:
        meta = PackageMeta.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}/{META_FILE} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise AdapterFormatError(f"{path}/{META_FILE} fails the schema: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    if meta.format != FORMAT or meta.format_version != FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{path}: format {meta.format!r} v{meta.format_version} is not {FORMAT!r} v{FORMAT_VERSION}; "
            "upgrade insitu or re-export the package.",
            {"format_version": (meta.format_version, FORMAT_VERSION)},
        )
    return meta


def _parse_tensors(raw: bytes, path: Path) -> dict[str, torch.Tensor]:
    if len(raw) < 8:
        raise AdapterFormatError(f"{path}/{TENSORS_FILE} is truncated ({len(raw)} bytes).")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(raw) - 8:
        raise AdapterFormatError(f"{path}/{TENSORS_FILE} has an impossible header length ({header_len} bytes).")
    try:
        return load_safetensors_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{path}/{TENSORS_FILE} is not a valid safetensors file: {exc}") from None
