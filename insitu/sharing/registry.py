"""A package registry: a plain folder (local, a shared drive, or a Hugging Face Hub model repo).

Layout::

    <registry>/index.json          # one entry per published package (below)
    <registry>/<name>/adapter.safetensors
    <registry>/<name>/insitu.json
    <registry>/<name>/README.md    # when the package has one
    <registry>/<name>/signature.json  # when the package is signed

An index entry records what a site needs to choose a package without downloading it (base
fingerprint and source, domain, channels/bands, objective, a data description, metrics, the
signer) and what makes a pull safe (the sha256 of every file and the package's content hash).
Publishing vets the package, never replaces a name, writes the package folder under a temporary
name and renames it, and rewrites the index last. Pulling re-reads every file with a size cap,
checks it against the index *and* the package's own hashes, checks every claim the index makes
about the package (base, signer, version, metrics, item counts) against the package itself, and
with trusted keys requires a signature by one of them that binds this very entry name, all before
anything is written to ``out``. The index is as hostile as any package: it is read with a size cap
and a strict schema, and neither it nor an entry's files are followed through symbolic links. No
network: a Hub registry is downloaded or uploaded with the Hub's own tools (see docs/sharing.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from insitu.errors import RegistryError, SignatureError
from insitu.io import atomic_write_bytes, claim_folder
from insitu.package_format import (
    CARD_FILE,
    MAX_CARD_BYTES,
    MAX_META_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_TENSOR_BYTES,
    META_FILE,
    SIGNATURE_FILE,
    TEACHER_FILE,
    TENSORS_FILE,
    VettedPackage,
    vet_files,
    vet_package,
    write_package_folder,
)
from insitu.sharing.signing import NAME_PATTERN, Signer, TrustPolicy, digests_of, load_trusted_keys, signature_claim

INDEX_FILE = "index.json"
REGISTRY_FORMAT = "insitu-registry"
REGISTRY_VERSION = 1
MAX_INDEX_BYTES = 64 << 20
LOCK_FILE = ".index.lock"
FILE_CAPS = {TENSORS_FILE: MAX_TENSOR_BYTES, META_FILE: MAX_META_BYTES, CARD_FILE: MAX_CARD_BYTES, SIGNATURE_FILE: MAX_SIGNATURE_BYTES}
FILE_CAPS[TEACHER_FILE] = MAX_TENSOR_BYTES  # the EMA teacher's adapters, when the package carries them
_HEX64 = r"^[0-9a-f]{64}$"


class SignerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=NAME_PATTERN)
    fingerprint: str = Field(pattern=_HEX64)


class IndexEntry(BaseModel):
    """One published package, as ``index.json`` lists it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=NAME_PATTERN)
    base_fingerprint: str = Field(pattern=_HEX64)
    base_source: str = Field(max_length=512)
    domain: str | None = Field(default=None, max_length=64)
    channels: int | None = Field(default=None, ge=1, le=1024)
    bands: list[str] | None = Field(default=None, max_length=1024)
    objective: str = Field(max_length=128)
    data: str = Field(default="", max_length=512)
    metrics: dict[str, float | int | bool] = Field(default_factory=dict, max_length=256)
    signer: SignerInfo | None = None  # checked against the key it names at publish time; trust is the puller's call
    version: str | None = Field(default=None, pattern=NAME_PATTERN)  # the version the signature binds (omitted when none)
    signed_at: str | None = Field(default=None, max_length=64)  # when it was signed (version-2 signatures; omitted when none)
    content_sha256: str = Field(pattern=_HEX64)
    files: dict[str, str]
    size_bytes: int = Field(ge=0)
    published: str = Field(max_length=64)

    @field_validator("files")
    @classmethod
    def _known_files(cls, value: dict[str, str]) -> dict[str, str]:
        if not {TENSORS_FILE, META_FILE} <= set(value) or not set(value) <= set(FILE_CAPS):
            raise ValueError(f"must list {TENSORS_FILE} and {META_FILE}, and only package files {sorted(FILE_CAPS)}")
        if not all(re.fullmatch(_HEX64, h) for h in value.values()):
            raise ValueError("every file hash must be 64 lowercase hex digits")
        return value


class RegistryIndex(BaseModel):
    """The schema of ``index.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["insitu-registry"] = REGISTRY_FORMAT
    version: Literal[1] = REGISTRY_VERSION
    packages: list[IndexEntry] = Field(default_factory=list, max_length=100_000)

    def get(self, name: str) -> IndexEntry | None:
        return next((e for e in self.packages if e.name == name), None)


def _read_no_link(path: Path, cap: int) -> bytes | None:
    """``path``'s bytes (None above ``cap``), refusing a symbolic link: a registry's files are its own, never links elsewhere."""
    if path.is_symlink():
        raise RegistryError(f"{path} is a symbolic link; a registry holds plain files. Replace it with the file itself.")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # no window between the check and the open
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RegistryError(f"{path} is a symbolic link; a registry holds plain files. Replace it with the file itself.") from None
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    return data if len(data) <= cap else None


def read_index(registry: str | Path) -> RegistryIndex:
    """The registry's index, read with a size cap (never through a link) and checked against the schema."""
    path = Path(registry) / INDEX_FILE
    if not path.is_file():
        raise RegistryError(f"{registry} is not an insitu registry (no {INDEX_FILE}); pass the folder you published into.")
    raw = _read_no_link(path, MAX_INDEX_BYTES)
    if raw is None:
        raise RegistryError(f"{path} is larger than insitu allows ({MAX_INDEX_BYTES:,} bytes); it is not a registry index.")
    try:
        index = RegistryIndex.model_validate(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RecursionError, ValidationError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else exc
        raise RegistryError(f"{path} is not a valid registry index ({detail}); restore it from the registry's history.") from None
    names = [e.name for e in index.packages]
    if len(set(names)) != len(names):
        raise RegistryError(f"{path} lists a package name twice; restore it from the registry's history.")
    return index


def _write_index(registry: Path, index: RegistryIndex) -> None:
    index.packages.sort(key=lambda e: e.name)
    data = index.model_dump(mode="json")
    for entry in data["packages"]:  # left out when empty, so an insitu from before these fields still reads the index
        for key in ("version", "signed_at"):
            if entry[key] is None:
                del entry[key]
    atomic_write_bytes(registry / INDEX_FILE, (json.dumps(data, indent=2) + "\n").encode())


def _open_registry(registry: Path) -> RegistryIndex:
    """The index of ``registry``, creating an empty registry in a missing or empty folder."""
    if (registry / INDEX_FILE).is_file():
        return read_index(registry)
    if registry.exists() and (not registry.is_dir() or any(registry.iterdir())):
        raise RegistryError(
            f"{registry} is not empty and holds no {INDEX_FILE}: it is not an insitu registry. "
            "Pass an existing registry, or a folder that does not exist yet to start one."
        )
    registry.mkdir(parents=True, exist_ok=True)
    index = RegistryIndex()
    _write_index(registry, index)
    return index


@contextlib.contextmanager
def _locked(registry: Path) -> Iterator[None]:
    """Serialise publishers on this machine (an advisory lock; shared drives may not honour it). Never through a link."""
    try:
        fd = os.open(registry / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RegistryError(f"{registry / LOCK_FILE} is a symbolic link; remove it (insitu makes its own lock file).") from None
        raise
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): publish unlocked
            pass
        yield
    finally:
        os.close(fd)


def default_name(vetted: VettedPackage) -> str:
    """``<objective>-<first 12 hex digits of the content hash>``: unique enough, and names no local folder."""
    objective = re.sub(r"[^A-Za-z0-9._-]", "-", str(vetted.meta.objective.get("name") or "adapter"))[:40].strip("-._") or "adapter"
    return f"{objective}-{hashlib.sha256(vetted.tensor_bytes).hexdigest()[:12]}"


def check_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name or "") or name.startswith("."):  # fullmatch: "$" would let "name\n" through
        raise RegistryError(f"package name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    return name


def _data_description(training: dict[str, Any]) -> str:
    """A short description of the training data: counts only, never a path."""
    text = training.get("data_description")
    if isinstance(text, str) and "/" not in text and "\\" not in text:
        return text[:512]
    items, quarantined = training.get("items"), training.get("quarantined")
    if type(items) is not int:
        return ""
    return f"{items} items" + (f" ({quarantined} quarantined)" if type(quarantined) is int and quarantined else "")


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float | int | bool]:
    ok = {k: v for k, v in metrics.items() if isinstance(v, (bool, int, float)) and (not isinstance(v, float) or math.isfinite(v))}
    return dict(list(ok.items())[:256])


def _entry(name: str, vetted: VettedPackage, files: dict[str, bytes], signer: Signer | None, published: str | None = None) -> IndexEntry:
    """The index entry for a package: every field computed from the package (``published`` aside)."""
    meta, inp = vetted.meta, vetted.meta.input
    bands = inp.get("bands")
    return IndexEntry(
        name=name,
        base_fingerprint=meta.base.fingerprint,
        base_source=meta.base.source,
        domain=str(inp["domain"])[:64] if inp.get("domain") is not None else None,
        channels=inp["channels"] if type(inp.get("channels")) is int else meta.base.in_chans,
        bands=[str(b)[:64] for b in bands][:1024] if isinstance(bands, list) else None,
        objective=str(meta.objective.get("name", "?"))[:128],
        data=_data_description(meta.training),
        metrics=_scalar_metrics(meta.metrics),
        signer=SignerInfo(name=signer.name, fingerprint=signer.fingerprint) if signer else None,
        version=signer.entry_version if signer else None,
        signed_at=signer.signed_at if signer else None,
        content_sha256=hashlib.sha256(vetted.tensor_bytes).hexdigest(),
        files={n: hashlib.sha256(data).hexdigest() for n, data in files.items()},
        size_bytes=sum(len(d) for d in files.values()),
        published=published or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _package_files(vetted: VettedPackage) -> dict[str, bytes]:
    files = {TENSORS_FILE: vetted.tensor_bytes, META_FILE: vetted.meta_bytes, CARD_FILE: vetted.card, SIGNATURE_FILE: vetted.signature}
    files[TEACHER_FILE] = vetted.teacher_bytes
    return {n: d for n, d in files.items() if d is not None}


def publish(pkg: str | Path, registry: str | Path, name: str | None = None) -> IndexEntry:
    """Copy a vetted package into ``registry`` under ``name`` and list it in the index; returns its entry.

    A signed package's signature must match its files (`SignatureError` otherwise); one bound to a
    registry name is published under that name (the default) and refused under another. A name
    already published is refused (`RegistryError`): entries are never replaced.
    """
    registry = Path(registry)
    vetted = vet_package(pkg)
    signer = signature_claim(digests_of(vetted), str(pkg))
    bound = signer.entry_name if signer else None
    if bound is not None and name is not None and name != bound:
        raise SignatureError(
            f"{pkg} is signed for the registry name {bound!r}, not {name!r}; publish it as {bound!r} (leave out --name), "
            f"or ask its signer to sign it again with --name {name}."
        )
    name = check_name(name or bound or default_name(vetted))
    files = _package_files(vetted)
    entry = _entry(name, vetted, files, signer)  # before anything is written: a bad entry leaves no orphan folder
    _open_registry(registry)
    with _locked(registry):
        index = read_index(registry)  # re-read under the lock: another publisher may have added names
        folder = registry / name
        if index.get(name) is not None or folder.exists() or folder.is_symlink():
            raise RegistryError(
                f"{registry} already holds a package named {name!r}; pick another name with --name (entries are never replaced)."
            )
        _write_package_folder(registry, name, files)
        index.packages.append(entry)
        _write_index(registry, index)
    return entry


def _write_package_folder(registry: Path, name: str, files: dict[str, bytes]) -> None:
    """Write the files under a temporary name, then rename: a reader sees the whole folder or none."""
    write_package_folder(registry / name, files)


def list_packages(registry: str | Path, base: str | None = None) -> list[IndexEntry]:
    """The index's entries, optionally only those whose base fingerprint starts with ``base``."""
    entries = read_index(Path(registry)).packages
    if base:
        prefix = base.strip().lower()
        entries = [e for e in entries if e.base_fingerprint.startswith(prefix)]
    return entries


def _read_capped(path: Path, cap: int) -> bytes:
    data = _read_no_link(path, cap)
    if data is None:
        raise RegistryError(f"{path} is larger than insitu allows ({cap:,} bytes); the registry entry is damaged.")
    return data


def read_entry(registry: Path, entry: IndexEntry) -> dict[str, bytes]:
    """The entry's files, each checked against the sha256 the index records (never read through a link)."""
    folder = registry / entry.name
    if folder.is_symlink():
        raise RegistryError(f"{folder} is a symbolic link; a registry entry is a plain folder. Ask its publisher to publish it again.")
    files = {}
    for file_name, digest in entry.files.items():
        path = folder / file_name
        if not path.is_file() and not path.is_symlink():
            raise RegistryError(f"{path} is missing; the registry entry {entry.name!r} is damaged. Ask its publisher to publish it again.")
        data = _read_capped(path, FILE_CAPS[file_name])
        if hashlib.sha256(data).hexdigest() != digest:
            raise RegistryError(
                f"{path} does not match the sha256 that {INDEX_FILE} records: the entry {entry.name!r} is corrupted or was changed "
                "after publishing. Nothing was written; ask its publisher to publish it again under a new name."
            )
        files[file_name] = data
    return files


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RegistryError(f"{out} exists and is not empty; pull into a new folder (insitu never writes into a full one).")


def pull(
    name: str,
    registry: str | Path,
    out: str | Path,
    trusted_keys: str | Path | None = None,
    require_signature: bool = False,
    version: str | None = None,
) -> tuple[IndexEntry, Signer | None]:
    """Copy the package ``name`` from ``registry`` into the new folder ``out`` after checking every byte.

    Returns the index entry and the signer (verified against ``trusted_keys`` when given; the
    signature's own claim otherwise; None when unsigned). Refuses a corrupted entry or an index
    whose claims differ from the package (`RegistryError`); a present signature that does not match
    the files, or one bound to another registry name or version (`SignatureError`); with
    ``trusted_keys``, an unsigned package, an untrusted signer, or a signature bound to no name
    (a rollback: an old signed package listed under a new name); and an ``out`` that exists and is
    not empty. ``version``: the version the signature must bind.
    """
    registry, out = Path(registry), Path(out)
    trust = TrustPolicy(Path(trusted_keys) if trusted_keys is not None else None, require_signature)
    entry = read_index(registry).get(check_name(name))
    if entry is None:
        raise RegistryError(f"{registry} has no package named {name!r}; `insitu adapter list {registry}` shows what it holds.")
    _check_empty(out)
    files = read_entry(registry, entry)
    where = registry / entry.name
    vetted = vet_files(files, where)  # the package's own checks, content_sha256 included
    if hashlib.sha256(vetted.tensor_bytes).hexdigest() != entry.content_sha256:
        raise RegistryError(f"{where}: the content hash differs from the index's; the entry {name!r} is corrupted.")
    digests = digests_of(vetted)
    signer = trust.check(digests, str(where)) or signature_claim(digests, str(where))
    _check_binding(entry, signer, trust, version, where)
    _check_claims(entry, vetted, files, signer, where)
    _check_empty(out)
    folder = claim_folder(out, "adapter pull")
    for file_name, data in files.items():
        atomic_write_bytes(out / file_name, data)
    folder.record()
    return entry, signer


def _check_binding(entry: IndexEntry, signer: Signer | None, trust: TrustPolicy, version: str | None, where: Path) -> None:
    """The signature names this very entry (and ``version``): an old signed package under a new name is a rollback."""
    if signer is None:
        if version is not None:
            raise SignatureError(f"{where} is not signed, so nothing binds it to version {version!r}; drop --version or ask for a signed package.")
        return
    if signer.entry_name is None and (trust.keys is not None or version is not None):
        raise SignatureError(
            f"{where} is signed by {signer.name!r} ({signer.binding()}): any registry could list it under any name, so "
            f"it cannot be pulled as {entry.name!r} with trusted keys. Ask the signer to sign it again with "
            f"`insitu adapter sign PKG --key KEY --name {entry.name} [--version V]` and publish that."
        )
    if signer.entry_name is not None and signer.entry_name != entry.name:
        raise SignatureError(
            f"{where} is signed for the registry name {signer.entry_name!r}, but the index lists it as {entry.name!r}: "
            "a signed package republished under another name (a rollback). Nothing was written; pull it by its own name, "
            "or tell the registry's maintainers."
        )
    if version is not None and signer.entry_version != version:
        raise SignatureError(
            f"{where} is signed as version {signer.entry_version!r} of {entry.name!r}, not {version!r}; nothing was written."
        )


def _check_claims(entry: IndexEntry, vetted: VettedPackage, files: dict[str, bytes], signer: Signer | None, where: Path) -> None:
    """Every field the index shows about the entry (``list``) must be what the package itself says."""
    want = _entry(entry.name, vetted, files, signer, entry.published).model_dump(mode="json")
    have = entry.model_dump(mode="json")
    wrong = sorted(k for k in want if want[k] != have[k])
    if wrong:
        raise RegistryError(
            f"{where}: {INDEX_FILE} claims {wrong} that differ from the package itself (what `list` shows is not what "
            f"the package holds). Nothing was written; the entry {entry.name!r} was altered after publishing. Ask its publisher "
            "to publish it again."
        )


def trusted_key_name(entry: IndexEntry, trusted: dict[str, tuple[str, object]]) -> str | None:
    """The trusted key file (stem) whose fingerprint the entry's signer claims; None when untrusted or unsigned.

    This is the index's *claim*: ``pull`` checks it against the signature itself.
    """
    if entry.signer is None or entry.signer.fingerprint not in trusted:
        return None
    return trusted[entry.signer.fingerprint][0]


def trusted_keys_of(folder: str | Path | None) -> dict[str, tuple[str, object]] | None:
    return load_trusted_keys(folder) if folder is not None else None
