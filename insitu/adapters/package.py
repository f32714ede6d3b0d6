"""The shareable adapter package: ``adapter.safetensors`` + ``insitu.json`` + ``README.md``.

A package is a folder or a ``.zip`` of those files, plus ``teacher.safetensors`` (the EMA teacher's
adapters) when the objective trained one; :func:`export_package` turns it into a package whose
adapters are the teacher's. Loading reads tensors only through safetensors
(nothing is ever unpickled), validates ``insitu.json`` against a schema, and refuses to attach to
a backbone whose fingerprint, width, patch size or channels differ, naming each differing field.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save

from insitu.adapters import AdaptedBackbone, AdapterSet, adapters_from_package
from insitu.backbones.vit import ViTBackbone
from insitu.errors import AdapterFormatError, AdapterMismatchError, ConfigError, NonFiniteLossError, SignatureError
from insitu.io import OutputExistsError, atomic_path, check_output_file
from insitu.package_format import (  # noqa: F401 - the format's names, re-exported
    CARD_FILE,
    FORMAT,
    FORMAT_VERSION,
    MAX_ABS_WEIGHT,
    META_FILE,
    SIGNATURE_FILE,
    TEACHER_FILE,
    TENSORS_FILE,
    BaseInfo,
    PackageMeta,
    TeacherInfo,
    VettedPackage,
    meta_bytes,
    vet_package,
    write_package_folder,
)
from insitu.privacy import redact_config
from insitu.sharing.signing import PackageDigests, Signer, TrustPolicy, digests_of


@dataclass
class AdapterPackage:
    """A validated package in memory: its metadata and its tensors (adapter.* and head.*)."""

    meta: PackageMeta
    tensors: dict[str, torch.Tensor]
    path: Path
    digests: PackageDigests | None = None  # what a signature is checked against
    signer: Signer | None = None  # set when a trust policy verified the package

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k[len("adapter.") :]: v for k, v in self.tensors.items() if k.startswith("adapter.")}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k[len("head.") :]: v for k, v in self.tensors.items() if k.startswith("head.")}


def base_info(backbone: ViTBackbone | AdaptedBackbone) -> dict[str, Any]:
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
    teacher: AdapterSet | None = None,
) -> Path:
    """Write a package folder; returns its path. Only tensors go into the safetensors file.

    ``teacher``: the EMA teacher's adapters (same kind and shapes as ``adapters``), written as
    ``teacher.safetensors`` and recorded, with its sha256, in ``insitu.json``'s ``teacher`` section.
    """
    out_dir = Path(out_dir)
    tensors = {f"adapter.{k}": v.detach().cpu().float().contiguous() for k, v in adapters.state_dict().items()}
    tensors.update({f"head.{k}": v.detach().cpu().float().contiguous() for k, v in (head_state or {}).items()})
    teacher_tensors = {f"adapter.{k}": v.detach().cpu().float().contiguous() for k, v in (teacher.state_dict() if teacher else {}).items()}
    damaged = [
        k
        for k, v in [*tensors.items(), *(("teacher " + n, t) for n, t in teacher_tensors.items())]
        if not torch.isfinite(v).all() or (v.numel() and v.abs().max() > MAX_ABS_WEIGHT)
    ]
    if damaged:
        raise NonFiniteLossError(
            f"refusing to write the package {out_dir}: tensors {damaged[:5]} hold NaN/Inf or values above {MAX_ABS_WEIGHT:g} "
            "(a diverged run). Lower train.lr, check the data for extreme values, or resume from an earlier checkpoint."
        )
    raw = save(tensors)
    files = {TENSORS_FILE: raw}
    if teacher_tensors:
        files[TEACHER_FILE] = save(teacher_tensors)
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
        config=redact_config(config or {}),
        content_sha256=hashlib.sha256(raw).hexdigest(),
        teacher=TeacherInfo(tensors=len(teacher_tensors), content_sha256=hashlib.sha256(files[TEACHER_FILE]).hexdigest())
        if teacher_tensors
        else None,
    )
    # the whole package appears at once or not at all; an earlier one stays whole until then
    files |= {CARD_FILE: model_card(meta).encode(), META_FILE: meta_bytes(meta)}
    return write_package_folder(out_dir, files)


def load_package(path: str | Path, trust: TrustPolicy | None = None, weights: str = "student") -> AdapterPackage:
    """Read and validate a package folder or ``.zip``; raises `AdapterFormatError` on anything off.

    Everything :func:`insitu.package_format.vet_package` checks (sizes, schema, bounds, header,
    content hash, finite values; the teacher file's too) happens before a tensor is made; so does
    the signature check when ``trust`` is given (`SignatureError`). ``weights="teacher"`` returns
    the package as :func:`export_package` would write it: the teacher's adapters, no heads
    (`ConfigError` when the package carries no teacher).
    """
    vetted = vet_package(path)
    digests = digests_of(vetted)
    signer = (trust or TrustPolicy()).check(digests, str(path))  # without trust: a present signature must still match
    meta, raw, name = vetted.meta, vetted.tensor_bytes, TENSORS_FILE
    if _weights(weights) == "teacher":
        meta, raw, name = teacher_meta(vetted), _teacher_bytes(vetted), TEACHER_FILE
    try:
        tensors = load_safetensors_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{path}/{name} is not a valid safetensors file: {exc}") from None
    return AdapterPackage(meta, tensors, Path(path), digests, signer)


def _weights(weights: str) -> str:
    if weights not in ("student", "teacher"):
        raise ConfigError(f"weights {weights!r} must be 'student' or 'teacher'.")
    return weights


def _teacher_bytes(vetted: VettedPackage) -> bytes:
    if vetted.teacher_bytes is None:
        objective = str(vetted.meta.objective.get("name", "?"))[:64]
        why = "its adapters already are the teacher's" if vetted.meta.weights == "teacher" else f"objective {objective!r}"
        raise ConfigError(
            f"{vetted.path} carries no teacher adapters ({TEACHER_FILE}; {why}). Use --weights student (the default), or "
            "pretrain with an objective that keeps an EMA teacher (dino, glare) to get a package that carries one."
        )
    return vetted.teacher_bytes


def teacher_meta(vetted: VettedPackage) -> PackageMeta:
    """``insitu.json`` of the teacher's package: the same base, adapter config and preprocessing; teacher adapters, no heads."""
    raw = _teacher_bytes(vetted)
    return vetted.meta.model_copy(
        update={
            "tensors": {"adapter": vetted.meta.teacher.tensors, "head": 0},
            "content_sha256": hashlib.sha256(raw).hexdigest(),
            "teacher": None,
            "weights": "teacher",
        }
    )


def export_package(src: str | Path, dst: str | Path, weights: str = "student", overwrite: bool = False) -> Path:
    """Write the package ``src`` as ``dst`` (a ``.zip`` when ``dst`` ends in ``.zip``, else a folder) with the chosen weights.

    ``weights="student"``: the package's files byte for byte (teacher file and signature included).
    ``weights="teacher"``: a new package whose ``adapter.safetensors`` holds the EMA teacher's
    adapters from ``teacher.safetensors`` (``insitu.json`` says ``"weights": "teacher"``; the
    objective's heads, trained for the student, are left out; no signature, since it signed other
    bytes), which loads, verifies, probes and applies like any package. `ConfigError` when ``src``
    carries no teacher (objectives without one, such as simclr). ``src`` is vetted first; an
    existing ``dst`` is replaced only with ``overwrite``.
    """
    src, dst = Path(src), Path(dst)
    vetted = vet_package(src)
    if _weights(weights) == "teacher":
        meta = teacher_meta(vetted)
        files = {TENSORS_FILE: _teacher_bytes(vetted), META_FILE: meta_bytes(meta), CARD_FILE: model_card(meta).encode()}
    else:
        files = {TENSORS_FILE: vetted.tensor_bytes, META_FILE: vetted.meta_bytes, CARD_FILE: vetted.card, SIGNATURE_FILE: vetted.signature}
        files |= {TEACHER_FILE: vetted.teacher_bytes}
    files = {n: d for n, d in files.items() if d is not None}
    if dst.suffix.lower() == ".zip":
        check_output_file(dst, overwrite)
        with atomic_path(dst) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return dst
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise OutputExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it, or pick another path.")
    return write_package_folder(dst, files)


def apply_package(package: AdapterPackage | str | Path, backbone: ViTBackbone, trust: TrustPolicy | None = None) -> AdaptedBackbone:
    """Attach a package's adapters to ``backbone``; refuses a package made for another base, or one ``trust`` refuses."""
    pkg = package if isinstance(package, AdapterPackage) else load_package(package, trust)
    if trust is not None and isinstance(package, AdapterPackage):
        if pkg.digests is None:  # made in memory: no file bytes a signature could be checked against
            raise SignatureError(f"{pkg.path}: this package was not read by load_package; pass its path so its signature can be checked.")
        pkg.signer = trust.check(pkg.digests, str(pkg.path))
    check_compatible(pkg.meta, backbone)
    adapters = adapters_from_package(pkg.meta.adapter)
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


def check_compatible(meta: PackageMeta, backbone: ViTBackbone | AdaptedBackbone) -> None:
    """Raise `AdapterMismatchError` naming every base field that differs."""
    want = meta.base.model_dump()
    have = base_info(backbone)
    fields = {k: (want[k], have[k]) for k in ("fingerprint", "embed_dim", "patch_size", "in_chans", "num_blocks") if want[k] != have[k]}
    blocks = meta.adapter.get("options", {}).get("blocks") or []
    if any(not 0 <= b < backbone.num_blocks for b in blocks):
        fields["adapter.blocks"] = (blocks, f"0..{backbone.num_blocks - 1}")
    if meta.adapter.get("dim") != backbone.embed_dim:
        fields["adapter.dim"] = (meta.adapter.get("dim"), backbone.embed_dim)
    if fields:
        detail = "; ".join(f"{k}: package {a!r} vs backbone {b!r}" for k, (a, b) in fields.items())
        raise AdapterMismatchError(
            f"Adapter package was made for base {meta.base.source!r}, not this backbone ({backbone.source!r}): {detail}. "
            "Load the base backbone it names (same weights) before applying it.",
            fields,
        )


def write_zip(package_dir: Path, zip_path: Path) -> Path:
    """Pack a package folder into one ``.zip`` (stored, so tensors stay byte-identical), with its signature if signed."""
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in (TENSORS_FILE, META_FILE, CARD_FILE, SIGNATURE_FILE, TEACHER_FILE):
            if name in (TENSORS_FILE, META_FILE) or (Path(package_dir) / name).is_file():  # the others are optional
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
        f"- Adapter: `{meta.adapter.get('kind')}` on blocks {meta.adapter.get('options', {}).get('blocks')}, {meta.trainable_params:,} trainable parameters",
        f"- Input: {json.dumps(meta.input)}",
        f"- Objective: `{meta.objective.get('name', '?')}`",
        "- Weights: "
        + {"teacher": "the EMA teacher's adapters (exported with `--weights teacher`)", "student": "the trained student's adapters"}[meta.weights]
        + (f"; `{TEACHER_FILE}` carries the EMA teacher's too (`insitu adapter export PKG --weights teacher`)" if meta.teacher else ""),
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
