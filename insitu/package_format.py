"""Vetting an adapter package without torch: bounded reads, a strict schema, the safetensors header.

Labs exchange packages, so every byte of one is hostile until checked. This module reads a
package folder or ``.zip`` with size caps *before* reading (a zip's declared sizes can lie, so
reads are bounded too), parses ``insitu.json`` with a size cap, no NaN/Infinity tokens and a
nesting limit, bounds every shape-bearing field, reads only the safetensors *header* to check tensor
names, dtypes and shapes, and checks the content hash that ``insitu.json`` records for
``adapter.safetensors`` (and for ``teacher.safetensors``, the EMA teacher's adapters that packages
of objectives with a teacher carry, under the same checks). It imports no torch, so ``insitu adapter inspect`` stays light and fast;
``insitu.adapters.package`` builds on it to load tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from insitu.errors import AdapterFormatError, AdapterMismatchError
from insitu.io import atomic_write_bytes, replace_folder
from insitu.registry import ADAPTERS

FORMAT = "insitu-adapter"
FORMAT_VERSION = 1
TENSORS_FILE, META_FILE, CARD_FILE = "adapter.safetensors", "insitu.json", "README.md"
SIGNATURE_FILE = "signature.json"  # optional: an Ed25519 signature (insitu.sharing.signing)
# optional: the EMA teacher's adapters (adapter.* only), bound by the content_sha256 in insitu.json's ``teacher`` section
TEACHER_FILE = "teacher.safetensors"
PACKAGE_FILES = (TENSORS_FILE, META_FILE, CARD_FILE, SIGNATURE_FILE, TEACHER_FILE)
UNSAFE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
MAX_META_BYTES = 1 << 20  # insitu.json: a resolved config and a summary fit in far less
MAX_CARD_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 1 << 16  # a signature.json is a few hundred bytes
MAX_TENSOR_BYTES = 1 << 31  # adapters are megabytes; 2 GiB bounds a hostile file
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TOKENS = 4096  # (image_size / patch)^2 at inference: 1024 px at patch 16
MAX_ABS_WEIGHT = 1e6  # trained adapter and head weights are O(1); larger is damage or an attack
TENSOR_DTYPE = "F32"  # packages store float32; anything else would be cast silently
# head tensors: ``head.<ns>.…``, <ns> the training objective's namespace or one starting with it and ``_`` (dino_input_norm)
HEAD_NAMESPACES = ("dino", "glare", "gm", "convirt", "clip", "rsp", "cvrl", "simclr")
RESIZE_POLICIES = ("square-antialias",)  # input.resize (insitu.pipelines.preprocess); the first: views.resize_square
MAX_BAND_NAME = 64


class BaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    source: str = Field(max_length=512)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    embed_dim: int = Field(ge=1, le=16384)
    patch_size: int = Field(ge=1, le=1024)
    in_chans: int = Field(ge=1, le=1024)
    img_size: int = Field(ge=1, le=16384)
    num_blocks: int = Field(ge=1, le=1024)


class AdapterFields(BaseModel):
    """``adapter.options``: bounds on the shape-bearing options; the kind's own ``Options`` check all of them when it is built."""

    model_config = ConfigDict(extra="allow", strict=True)
    blocks: list[int] = Field(min_length=1, max_length=1024)
    bottleneck_dim: int | None = Field(default=None, ge=1, le=65536)
    scale: float | None = None
    rank: int | None = Field(default=None, ge=1, le=16384)
    alpha: float | None = None
    targets: list[Literal["qkv", "proj"]] | None = None

    @field_validator("scale", "alpha")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("blocks")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("must be distinct block indices >= 0")
        return value


class AdapterInfo(BaseModel):
    """``insitu.json``'s ``adapter`` section: ``{kind, dim, options}``, what rebuilds the adapter modules."""

    model_config = ConfigDict(extra="forbid", strict=True)
    kind: str
    dim: int = Field(ge=1, le=16384)
    options: AdapterFields

    @field_validator("kind")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in ADAPTERS:
            raise ValueError(f"must be one of {ADAPTERS.names()}")
        return value


def adapter_section(section: Any) -> Any:
    """An ``adapter`` section as ``{kind, dim, options}``: packages written before issue 18 stored the options flat."""
    if not isinstance(section, dict) or "options" in section:
        return section
    return {
        **{k: section[k] for k in ("kind", "dim") if k in section},
        "options": {k: v for k, v in section.items() if k not in ("kind", "dim")},
    }


class NormalizerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: list[float] = Field(min_length=1, max_length=1024)
    std: list[float] = Field(min_length=1, max_length=1024)
    lo: list[float] | None = Field(default=None, max_length=1024)
    hi: list[float] | None = Field(default=None, max_length=1024)

    @model_validator(mode="after")
    def _sane(self) -> NormalizerInfo:
        values = [*self.mean, *self.std, *(self.lo or []), *(self.hi or [])]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("holds a non-finite value")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be > 0 for every channel")
        if len(self.std) != len(self.mean) or any(x is not None and len(x) != len(self.mean) for x in (self.lo, self.hi)):
            raise ValueError("mean, std, lo and hi must have one value per channel")
        return self


class TeacherInfo(BaseModel):
    """``insitu.json``'s ``teacher`` section: the package carries ``teacher.safetensors`` (the EMA teacher's adapters)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tensors: int = Field(ge=1, le=1 << 20)
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PackageMeta(BaseModel):
    """The schema of ``insitu.json``.

    ``teacher`` and ``weights`` are left out of the file at their defaults (:func:`meta_bytes`), so a
    package without a teacher reads exactly as before.
    """

    model_config = ConfigDict(extra="forbid")
    format: str = Field(max_length=64)
    format_version: int
    base: BaseInfo
    adapter: Annotated[dict[str, Any], BeforeValidator(adapter_section)]
    input: dict[str, Any]
    normalizer: dict[str, Any] | None
    objective: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    trainable_params: int = Field(ge=0)
    tensors: dict[str, int]
    config: dict[str, Any]
    license: str = Field(default="unspecified", max_length=256)
    content_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    teacher: TeacherInfo | None = None
    # whose adapters adapter.safetensors holds: the trained student's, or the EMA teacher's (``adapter export --weights teacher``)
    weights: Literal["student", "teacher"] = "student"


def meta_bytes(meta: PackageMeta) -> bytes:
    """``insitu.json``'s bytes: ``teacher`` and ``weights`` only when they say something (older insitu reads the rest)."""
    data = meta.model_dump(mode="json")
    if data["teacher"] is None:
        del data["teacher"]
    if data["weights"] == "student":
        del data["weights"]
    return json.dumps(data, indent=2).encode()


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


@dataclass
class VettedPackage:
    """A package whose metadata, header and hash passed every check; tensors not yet loaded."""

    path: Path
    meta: PackageMeta
    adapter: AdapterInfo
    header: dict[str, TensorInfo]
    tensor_bytes: bytes
    meta_bytes: bytes = b""
    signature: bytes | None = None  # the raw signature.json, when the package has one
    card: bytes | None = None  # the raw README.md, when the package has one
    teacher_bytes: bytes | None = None  # the raw teacher.safetensors, when the package carries one (vetted like tensor_bytes)


def vet_package(path: str | Path) -> VettedPackage:
    """Read and check a package folder or ``.zip``; raises `AdapterFormatError` naming the field."""
    path = Path(path)
    if path.suffix.lower() in UNSAFE_SUFFIXES:
        raise AdapterFormatError(
            f"{path} is a pickle-based file; insitu never unpickles. Convert it to an adapter package "
            "(adapter.safetensors + insitu.json) with safetensors.torch.save_file on a trusted machine."
        )
    return vet_files(read_files(path), path)


def vet_files(files: dict[str, bytes], path: Path) -> VettedPackage:
    """Check a package's files already read (capped) into memory; ``path`` only names it in errors."""
    meta = parse_meta(files[META_FILE], path)
    adapter = check_fields(meta, path)
    raw = files[TENSORS_FILE]
    header = parse_header(raw, path)
    if meta.content_sha256 is not None and hashlib.sha256(raw).hexdigest() != meta.content_sha256:
        raise AdapterFormatError(
            f"{path}/{TENSORS_FILE} does not match the content_sha256 in {META_FILE}: the weights were changed or damaged "
            "after the package was written. Get the package again from its source."
        )
    check_tensor_names(header, meta, path)
    check_values(raw, header, path)
    teacher = files.get(TEACHER_FILE)
    check_teacher(teacher, header, meta, path)
    return VettedPackage(path, meta, adapter, header, raw, files[META_FILE], files.get(SIGNATURE_FILE), files.get(CARD_FILE), teacher)


def check_teacher(raw: bytes | None, student: dict[str, TensorInfo], meta: PackageMeta, path: Path) -> None:
    """``teacher.safetensors`` under the same checks as ``adapter.safetensors``, present exactly when ``insitu.json`` records it.

    Its sha256 must equal ``teacher.content_sha256`` (so a signature, which binds ``insitu.json``,
    binds the teacher file too), and it holds the student's adapter tensors' names and shapes, nothing else.
    """
    where = f"{path}/{TEACHER_FILE}"
    if meta.teacher is None:
        if raw is not None:
            raise AdapterFormatError(
                f"{where} is not recorded in {META_FILE} (no teacher section): it was added after the package was written. "
                "Remove it, or get the package again from its source."
            )
        return
    if meta.weights == "teacher":
        raise AdapterFormatError(f"{path}/{META_FILE}: a package whose weights are the teacher's carries no second teacher file.")
    if raw is None:
        raise AdapterFormatError(f"{path}: {META_FILE} records a {TEACHER_FILE} that the package lacks; get the package again from its source.")
    header = parse_header(raw, path, TEACHER_FILE)
    if hashlib.sha256(raw).hexdigest() != meta.teacher.content_sha256:
        raise AdapterFormatError(
            f"{where} does not match teacher.content_sha256 in {META_FILE}: the teacher weights were changed or damaged "
            "after the package was written. Get the package again from its source."
        )
    want = {n: i.shape for n, i in student.items() if n.startswith("adapter.")}
    have = {n: i.shape for n, i in header.items()}
    if have != want:
        odd = sorted(set(have) ^ set(want)) or sorted(n for n in have if have[n] != want[n])
        raise AdapterFormatError(
            f"{where} must hold the student's adapter tensors (same adapter.* names and shapes, no heads); these differ: {odd[:8]}."
        )
    if meta.teacher.tensors != len(header):
        raise AdapterFormatError(f"{path}/{META_FILE}: teacher.tensors {meta.teacher.tensors} does not match {TEACHER_FILE} ({len(header)}).")
    check_values(raw, header, path, TEACHER_FILE)


def check_values(raw: bytes, header: dict[str, TensorInfo], path: Path, file: str = TENSORS_FILE) -> None:
    """Every weight finite and of a plausible size (NaN, Inf or 1e38 weights are damage, not a model)."""
    import numpy as np

    start = 8 + struct.unpack("<Q", raw[:8])[0]
    for name, info in header.items():
        values = np.frombuffer(raw, dtype="<f4", count=math.prod(info.shape), offset=start + info.offsets[0])
        if not np.isfinite(values).all():
            raise AdapterFormatError(f"{path}/{file}: tensor {name!r} holds NaN or Inf values; the package is damaged.")
        if values.size and float(np.abs(values).max()) > MAX_ABS_WEIGHT:
            raise AdapterFormatError(
                f"{path}/{file}: tensor {name!r} holds values above {MAX_ABS_WEIGHT:g} in magnitude; "
                "no trained adapter looks like that (a diverged run or a tampered file)."
            )


OPTIONAL_CAPS = {SIGNATURE_FILE: MAX_SIGNATURE_BYTES, CARD_FILE: MAX_CARD_BYTES, TEACHER_FILE: MAX_TENSOR_BYTES}


def read_files(path: Path) -> dict[str, bytes]:
    """The package's files, each read with a size cap: the two required ones, and the optional ones present."""
    caps = {META_FILE: MAX_META_BYTES, TENSORS_FILE: MAX_TENSOR_BYTES}
    if path.is_dir():
        for bad in path.iterdir():
            if bad.suffix.lower() in UNSAFE_SUFFIXES:
                raise AdapterFormatError(f"{bad} is a pickle-based file inside the package; remove it (insitu never unpickles).")
        missing = [n for n in caps if not (path / n).is_file()]
        if missing:
            raise AdapterFormatError(f"{path} is not an adapter package: missing {missing}.")
        caps |= {n: cap for n, cap in OPTIONAL_CAPS.items() if (path / n).is_file()}
        for name, cap in caps.items():
            if (path / name).stat().st_size > cap:
                raise AdapterFormatError(f"{path}/{name} is larger than insitu allows ({cap:,} bytes); it is not an adapter package.")
        return {n: (path / n).read_bytes() for n in caps}
    if path.is_file() and zipfile.is_zipfile(path):
        return _read_zip(path, caps)
    raise AdapterFormatError(f"{path} is neither a package folder nor a .zip package.")


def _read_zip(path: Path, caps: dict[str, int]) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AdapterFormatError(f"{path} holds {dupes} more than once; a package zip has one of each file.")
        missing = [n for n in caps if n not in names]
        if missing:
            raise AdapterFormatError(f"{path} is not an adapter package: the zip lacks {missing}.")
        caps = caps | {n: cap for n, cap in OPTIONAL_CAPS.items() if n in names}
        out = {}
        for name, cap in caps.items():
            if zf.getinfo(name).file_size > cap:
                raise AdapterFormatError(f"{path}: {name} inflates past what insitu allows ({cap:,} bytes).")
            with zf.open(name) as member:
                data = member.read(cap + 1)  # the declared size can lie: never read past the cap
            if len(data) > cap:
                raise AdapterFormatError(f"{path}: {name} inflates past what insitu allows ({cap:,} bytes).")
            out[name] = data
        return out


def _no_constants(token: str) -> None:
    raise ValueError(f"{token} is not a number JSON allows")


def parse_meta(raw: bytes, path: Path) -> PackageMeta:
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise AdapterFormatError(f"{path}/{META_FILE} is nested too deeply to be an insitu.json.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}/{META_FILE} is not valid JSON: {exc}") from None
    try:
        meta = PackageMeta.model_validate(data)
    except ValidationError as exc:
        raise AdapterFormatError(f"{path}/{META_FILE} fails the schema: {_where(exc)}") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}/{META_FILE} is nested too deeply to be an insitu.json.") from None
    if meta.format != FORMAT or meta.format_version != FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{path}: format {meta.format!r} v{meta.format_version} is not {FORMAT!r} v{FORMAT_VERSION}; "
            "upgrade insitu or re-export the package.",
            {"format_version": (meta.format_version, FORMAT_VERSION)},
        )
    return meta


def _where(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
    return f"{loc}: {err['msg']}"


def check_fields(meta: PackageMeta, path: Path) -> AdapterInfo:
    """Bound every shape-bearing field against the package's own base before anything is allocated."""
    try:
        adapter = AdapterInfo.model_validate(meta.adapter)
    except ValidationError as exc:
        raise AdapterFormatError(f"{path}/{META_FILE} fails the schema: {_where(exc, 'adapter')}") from None
    base = meta.base
    problems = []
    if adapter.dim != base.embed_dim:
        problems.append(f"adapter.dim {adapter.dim} is not the base's embed_dim {base.embed_dim}")
    opts = adapter.options
    if max(opts.blocks) >= base.num_blocks:
        problems.append(f"adapter.options.blocks {opts.blocks} has an index outside the base's 0..{base.num_blocks - 1}")
    if opts.bottleneck_dim is not None and opts.bottleneck_dim > 4 * base.embed_dim:
        problems.append(f"adapter.options.bottleneck_dim {opts.bottleneck_dim} exceeds 4 x embed_dim ({4 * base.embed_dim})")
    if opts.rank is not None and opts.rank > base.embed_dim:
        problems.append(f"adapter.options.rank {opts.rank} exceeds embed_dim ({base.embed_dim})")
    problems += _input_problems(meta)
    if meta.normalizer is not None:
        try:
            norm = NormalizerInfo.model_validate(meta.normalizer)
        except ValidationError as exc:
            raise AdapterFormatError(f"{path}/{META_FILE} fails the schema: {_where(exc, 'normalizer')}") from None
        if len(norm.mean) != base.in_chans:
            problems.append(f"normalizer has {len(norm.mean)} channels, the base takes {base.in_chans}")
    if problems:
        raise AdapterFormatError(f"{path}/{META_FILE}: " + "; ".join(problems) + ".")
    return adapter


def _input_problems(meta: PackageMeta) -> list[str]:
    """The ``input`` section (the preprocessing contract); each key is checked only when present (older packages lack some)."""
    inp, chans, patch = meta.input, meta.base.in_chans, meta.base.patch_size
    size, bands, init = inp.get("image_size"), inp.get("bands"), inp.get("channel_init")
    wrong = [k for k in ("channels", "in_chans") if inp.get(k) not in (None, chans)]
    problems = [f"input.{k} {inp[k]!r} is not the base's in_chans {chans}" for k in wrong]
    if size is not None and (type(size) is not int or size < patch or (size // patch) ** 2 > MAX_TOKENS):
        problems.append(f"input.image_size {size!r} is not whole pixels from the patch size {patch} up to {MAX_TOKENS} tokens per image")
    elif size is not None and size % patch:  # the backbone cannot cut such an image into patches: the package could never run
        problems.append(f"input.image_size {size} is not a multiple of the base's patch size {patch}; re-export it with a multiple of {patch}")
    if "resize" in inp and inp["resize"] not in RESIZE_POLICIES:
        problems.append(f"input.resize {inp['resize']!r} is not one of {list(RESIZE_POLICIES)}")
    if init is not None and not (isinstance(init, str) and len(init) <= 32):
        problems.append("input.channel_init is not a short name")
    names_ok = isinstance(bands, list) and len(bands) == chans and all(isinstance(b, str) and 0 < len(b) <= MAX_BAND_NAME for b in bands)
    if bands is not None and not names_ok:
        problems.append(f"input.bands must be {chans} band names of at most {MAX_BAND_NAME} characters, one per base channel")
    return problems


def parse_header(raw: bytes, path: Path, file: str = TENSORS_FILE) -> dict[str, TensorInfo]:
    """The safetensors header, checked: JSON, offsets inside the file, no overlap, sizes match."""
    where = f"{path}/{file}"
    if len(raw) < 8:
        raise AdapterFormatError(f"{where} is truncated ({len(raw)} bytes).")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(raw) - 8:
        raise AdapterFormatError(f"{where} has an impossible header length ({header_len} bytes).")
    try:
        header = json.loads(raw[8 : 8 + header_len], parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFormatError(f"{where} is not a valid safetensors file: bad header ({exc}).") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{where} is not a valid safetensors file: the header is not a mapping.")
    header.pop("__metadata__", None)
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    out, data_len = {}, len(raw) - 8 - header_len
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{where}: tensor {name!r} has a malformed header entry.") from None
        if dtype != TENSOR_DTYPE:
            raise AdapterFormatError(f"{where}: tensor {name!r} is {dtype}; packages store {TENSOR_DTYPE} only (nothing is cast silently).")
        if any(s < 0 for s in shape) or not (0 <= start <= end <= data_len) or end - start != math.prod(shape) * sizes[dtype]:
            raise AdapterFormatError(f"{where} is not a valid safetensors file: tensor {name!r} has offsets or a shape that do not fit it.")
        out[name] = TensorInfo(dtype, shape, (start, end))
    return out


def check_tensor_names(header: dict[str, TensorInfo], meta: PackageMeta, path: Path) -> None:
    """Only adapter tensors and the objective's own heads; the counts insitu.json records."""
    foreign = [n for n in header if not (n.startswith("adapter.") or (n.startswith("head.") and _head_namespace_ok(n)))]
    if foreign:
        raise AdapterFormatError(
            f"{path}/{TENSORS_FILE} holds tensors that are not adapters or objective heads: {sorted(foreign)[:8]}. "
            "A package carries adapter.* and head.<objective>.* tensors only."
        )
    counts = {"adapter": sum(n.startswith("adapter.") for n in header), "head": sum(n.startswith("head.") for n in header)}
    if meta.tensors != counts:
        raise AdapterFormatError(f"{path}/{META_FILE}: tensors {meta.tensors} does not match adapter.safetensors ({counts}).")


def _head_namespace_ok(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and any(parts[1] == ns or parts[1].startswith(ns + "_") for ns in HEAD_NAMESPACES)


def write_package_folder(out_dir: str | Path, files: dict[str, bytes]) -> Path:
    """Write a package's ``files`` (name -> bytes) as the folder ``out_dir``, all at once.

    The files are written into a temporary sibling folder, ``insitu.json`` last, which then replaces
    ``out_dir`` (:func:`insitu.io.replace_folder`): an interrupted write never leaves a half package
    that loads, and an earlier package there stays whole until the new one is complete. An earlier
    package's signature is not carried over (it signed other bytes).
    """
    out_dir = Path(out_dir)
    with replace_folder(out_dir, PACKAGE_FILES) as tmp:
        for name in sorted(files, key=lambda n: n == META_FILE):
            atomic_write_bytes(tmp / name, files[name])
    return out_dir
