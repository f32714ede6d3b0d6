"""Ed25519 signatures on adapter packages: who made a package, that nothing changed since, and what it was released as.

A signature covers one canonical byte string (:func:`signed_payload`) that binds

* ``tensors_sha256``: the sha256 of ``adapter.safetensors``, recomputed from the file (the
  ``content_sha256`` that ``insitu.json`` records is never trusted for this);
* ``meta_sha256``: the sha256 of ``insitu.json`` in canonical form (parsed, keys sorted, no
  whitespace, ASCII), so every metadata field is bound while re-indenting the file is harmless;
* the signer's name and the sha256 fingerprint of the raw 32-byte public key;
* (signature version 2) ``card_sha256``, the sha256 of ``README.md`` (null: the package has no
  card, and one added later is refused); ``entry_name`` and ``entry_version``, the registry name and
  version the signer released the package as (null: not bound to a name); ``signed_at``, the UTC time
  of signing. A registry that lists the package under another name (a rollback: an old signed package
  republished as a new entry) is refused by ``pull``.

Version-1 signatures (insitu before issue 35) still verify, as "signed, not bound to a registry
name"; ``pull`` with trusted keys refuses them, since any registry could list them under any name.
Files other than the five package files are never read, copied or loaded, so they need no signature.

A package's ``teacher.safetensors`` (the EMA teacher's adapters) is bound through ``insitu.json``:
its ``teacher.content_sha256`` is part of the signed metadata, and vetting refuses a teacher file
that does not match it, so the teacher cannot change without breaking the signature.

It is stored as ``signature.json`` beside the package's files, with the signer's *public* key so
anyone can check that the files match it; trust comes only from a folder of public keys the
verifier chose (``<name>.pub``), looked up by fingerprint. Private keys are PEM (PKCS#8, mode
0600) and are never written into a package, an index or a log. Public keys are PEM
(SubjectPublicKeyInfo); a one-line base64 of the raw 32 bytes is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from insitu.errors import ConfigError, SignatureError
from insitu.io import OutputExistsError, atomic_path, atomic_write_bytes, read_capped
from insitu.package_format import CARD_FILE, META_FILE, SIGNATURE_FILE, TEACHER_FILE, TENSORS_FILE, VettedPackage, vet_package

if TYPE_CHECKING:
    from insitu.config import RunConfig

log = logging.getLogger(__name__)

SIGNATURE_FORMAT = "insitu-signature"
SIGNATURE_VERSION = 2  # 1: tensors, metadata, signer; 2: also the card, the registry name and version, the signing time
PASSPHRASE_ENV = "INSITU_KEY_PASSPHRASE"  # where an encrypted private key's passphrase is read from
PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"
MAX_KEY_BYTES = 16 * 1024
MAX_TRUSTED_KEYS = 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_HEX64 = r"^[0-9a-f]{64}$"
_UTC = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
_BINDING = ("card_sha256", "entry_name", "entry_version", "signed_at")  # the version-2 fields


class SignatureFile(BaseModel):
    """The schema of ``signature.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["insitu-signature"]
    version: Literal[1, 2]
    algorithm: Literal["ed25519"]
    signer: str = Field(pattern=NAME_PATTERN)
    key_fingerprint: str = Field(pattern=_HEX64)
    public_key: str = Field(max_length=64)  # base64 of the raw 32-byte key
    tensors_sha256: str = Field(pattern=_HEX64)
    meta_sha256: str = Field(pattern=_HEX64)
    # version 2 only (absent in version 1): what the signer released the package as
    card_sha256: str | None = Field(default=None, pattern=_HEX64)
    entry_name: str | None = Field(default=None, pattern=NAME_PATTERN)
    entry_version: str | None = Field(default=None, pattern=NAME_PATTERN)
    signed_at: str | None = Field(default=None, pattern=_UTC)
    signature: str = Field(max_length=128)  # base64 of the 64-byte signature

    @model_validator(mode="after")
    def _fields_of_version(self) -> SignatureFile:
        if self.version == 1 and any(getattr(self, f) is not None for f in _BINDING):
            raise ValueError(f"a version-1 signature has none of {list(_BINDING)}")
        if self.version == 2 and self.signed_at is None:
            raise ValueError("a version-2 signature records signed_at")
        return self

    def payload(self) -> bytes:
        """The exact bytes the signature covers (version 1: exactly what insitu before issue 35 signed)."""
        fields = {k: getattr(self, k) for k in ("format", "version", "signer", "key_fingerprint", "tensors_sha256", "meta_sha256")}
        if self.version >= 2:
            fields |= {k: getattr(self, k) for k in _BINDING}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Signer:
    """Who signed a package: the name they gave, their key's fingerprint, the trusted key file that matched, and what it binds."""

    name: str
    fingerprint: str
    key_name: str | None = None  # stem of the trusted ``<key_name>.pub``; None when no trust folder was consulted
    entry_name: str | None = None  # the registry name the signature binds; None: not bound (or a version-1 signature)
    entry_version: str | None = None
    signed_at: str | None = None  # UTC; None for version-1 signatures
    card_bound: bool = False  # README.md is covered (version 2)

    def binding(self) -> str:
        """What the signature binds beyond the files, in words."""
        if self.entry_name is None:
            return "not bound to a registry name" + (f", signed {self.signed_at}" if self.signed_at else " (version-1 signature)")
        version = f" version {self.entry_version}" if self.entry_version else ""
        return f"bound to registry name {self.entry_name!r}{version}, signed {self.signed_at}"


@dataclass(frozen=True)
class PackageDigests:
    """What a signature is checked against, computed from a vetted package's bytes."""

    tensors_sha256: str
    meta_sha256: str
    signature: bytes | None
    card_sha256: str | None = None  # README.md's sha256; None when the package has no card (or an empty one)


@dataclass(frozen=True)
class TrustPolicy:
    """Which packages to accept: ``keys`` is a folder of trusted ``.pub`` files.

    With ``keys``, a package must carry a valid signature by one of them: a trust folder given
    means a signature is required (an unsigned package, or one whose signature was stripped, is
    refused); ``require_signature`` says so explicitly. Without ``keys`` no signer is trusted, but a
    signature that is present must still match the files (a present-but-invalid signature is always
    refused); ``require_signature`` without ``keys`` is a config error: nothing could satisfy it.
    """

    keys: Path | None = None
    require_signature: bool = False

    def __post_init__(self) -> None:
        if self.require_signature and self.keys is None:
            raise ConfigError("require_signature needs a folder of trusted public keys: pass --trusted-keys DIR (or set trust.keys).")

    def check(self, digests: PackageDigests, where: str) -> Signer | None:
        """The trusted signer; None without ``keys`` (after checking a present signature); `SignatureError` otherwise."""
        if self.keys is None:
            signature_claim(digests, where)  # trusted or not, a signature that is there must match the files
            return None
        return verify_digests(digests, load_trusted_keys(self.keys), where)


def digests_of(vetted: VettedPackage) -> PackageDigests:
    card = hashlib.sha256(vetted.card).hexdigest() if vetted.card else None
    return PackageDigests(
        hashlib.sha256(vetted.tensor_bytes).hexdigest(), canonical_meta_sha256(vetted.meta_bytes), vetted.signature, card
    )


def canonical_meta_sha256(meta_bytes: bytes) -> str:
    """sha256 of ``insitu.json`` parsed and re-serialised canonically (sorted keys, no whitespace, ASCII)."""
    data = json.loads(meta_bytes)  # already parsed once by vet_package: valid JSON without NaN tokens
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def signed_payload(sig: SignatureFile) -> bytes:
    """The exact bytes an Ed25519 signature covers (:meth:`SignatureFile.payload`)."""
    return sig.payload()


def key_fingerprint(public: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key."""
    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def _check_name(name: str, what: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name or ""):  # fullmatch: "$" alone would let a trailing newline through
        raise ConfigError(f"{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit).")
    return name


def generate_keypair(out_dir: str | Path, name: str, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, PEM, mode 0600; encrypted with ``passphrase`` when given) and ``<name>.pub`` into ``out_dir``."""
    out_dir = Path(out_dir)
    _check_name(name, "key name")
    private_path, public_path = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise OutputExistsError(f"{path} already exists; insitu never replaces a key. Pick another --name or --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.chmod(private_path, 0o600)
        f.write(pem)
    atomic_write_bytes(
        public_path, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    log.info("wrote key pair %s (fingerprint %s)", name, key_fingerprint(key.public_key()))
    return private_path, public_path


def _read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass a key file written by `insitu adapter keygen`.")
    data = read_capped(path, MAX_KEY_BYTES)
    if data is None:
        raise SignatureError(f"{path} is larger than a key file can be ({MAX_KEY_BYTES:,} bytes); pass a key from `insitu adapter keygen`.")
    return data


def check_private_key_mode(path: Path) -> None:
    """Refuse a private key that other users can read (POSIX): whoever reads it can sign as you."""
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SignatureError(
            f"{path} can be read or written by other users (mode {mode:03o}); a private key must be yours alone. "
            f"Run `chmod 600 {path}`, and if others could have read it, make a new key pair."
        )


def load_private_key(path: str | Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key in PEM; an encrypted one needs ``passphrase`` (or ``$INSITU_KEY_PASSPHRASE``)."""
    path = Path(path)
    data = _read_key_file(path)
    check_private_key_mode(path)
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
        if passphrase is None:
            raise SignatureError(f"{path} is encrypted; set {PASSPHRASE_ENV} to its passphrase (or type it when asked).")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError):
        key = None  # the library's message is not repeated: it could quote the file
    if not isinstance(key, Ed25519PrivateKey):
        wrong = "or the passphrase is wrong" if encrypted else "in PEM"
        raise SignatureError(f"{path} is not an Ed25519 private key {wrong}; make one with `insitu adapter keygen`.")
    return key


def private_key_is_encrypted(path: str | Path) -> bool:
    return b"ENCRYPTED" in _read_key_file(Path(path)).split(b"\n", 1)[0]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A PEM public key, or one line of base64 holding the raw 32 bytes."""
    path = Path(path)
    data = _read_key_file(path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except (ValueError, TypeError, binascii.Error):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"{path} is not an Ed25519 public key (PEM, or base64 of 32 raw bytes); remove it from the trusted keys folder."
        )
    return key


def load_trusted_keys(folder: str | Path) -> dict[str, tuple[str, Ed25519PublicKey]]:
    """``{fingerprint: (key name, key)}`` for every ``*.pub`` in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"trusted keys folder {folder} does not exist; pass a folder holding the .pub files of signers you trust.")
    paths = sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))[: MAX_TRUSTED_KEYS + 1]
    if len(paths) > MAX_TRUSTED_KEYS:
        raise SignatureError(f"{folder} holds more than {MAX_TRUSTED_KEYS} public keys; keep only the signers you trust there.")
    keys = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_fingerprint(key)] = (path.stem, key)
    return keys


def sign_package(
    pkg_path: str | Path,
    key_path: str | Path,
    signer: str | None = None,
    *,
    entry_name: str | None = None,
    entry_version: str | None = None,
    passphrase: bytes | None = None,
) -> Signer:
    """Add ``signature.json`` to a package folder (or rewrite a ``.zip`` with it); returns who signed.

    ``entry_name`` / ``entry_version``: the registry name (and version) the package is released
    as; ``publish`` then lists it under that name only, and ``pull`` refuses it under any other.
    """
    pkg_path, key_path = Path(pkg_path), Path(key_path)
    if pkg_path.is_dir() and key_path.resolve().parent == pkg_path.resolve():
        raise SignatureError(f"{key_path} lies inside the package {pkg_path}; move the private key out of it before signing.")
    vetted = vet_package(pkg_path)  # never sign a package that would not load
    key = load_private_key(key_path, passphrase)
    name = _check_name(signer or key_path.stem, "signer name")
    entry_name = _check_name(entry_name, "registry name") if entry_name is not None else None
    entry_version = _check_name(entry_version, "version") if entry_version is not None else None
    if entry_version is not None and entry_name is None:
        raise ConfigError("a version is bound together with a registry name: pass --name NAME with --version.")
    digests, fingerprint = digests_of(vetted), key_fingerprint(key.public_key())
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fields = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": "ed25519",
        "signer": name,
        "key_fingerprint": fingerprint,
        "public_key": base64.b64encode(raw_public).decode(),
        "tensors_sha256": digests.tensors_sha256,
        "meta_sha256": digests.meta_sha256,
        "card_sha256": digests.card_sha256,
        "entry_name": entry_name,
        "entry_version": entry_version,
        "signed_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    unsigned = SignatureFile.model_validate({**fields, "signature": ""})
    doc = unsigned.model_copy(update={"signature": base64.b64encode(key.sign(unsigned.payload())).decode()})
    data = (json.dumps(doc.model_dump(), indent=2) + "\n").encode()
    if pkg_path.is_dir():
        atomic_write_bytes(pkg_path / SIGNATURE_FILE, data)
    else:
        _rewrite_zip(pkg_path, vetted, data)
    log.info("signed %s as %s (key %s)", pkg_path.name, name, fingerprint[:16])
    return _signer_of(doc)


def _signer_of(sig: SignatureFile, key_name: str | None = None) -> Signer:
    return Signer(sig.signer, sig.key_fingerprint, key_name, sig.entry_name, sig.entry_version, sig.signed_at, sig.version >= 2)


def _rewrite_zip(zip_path: Path, vetted: VettedPackage, signature: bytes) -> None:
    """The same zip with ``signature.json`` added (or replaced), swapped in atomically."""
    members = {TENSORS_FILE: vetted.tensor_bytes, META_FILE: vetted.meta_bytes, CARD_FILE: vetted.card, SIGNATURE_FILE: signature}
    members[TEACHER_FILE] = vetted.teacher_bytes
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            if data is not None:
                zf.writestr(name, data)


def parse_signature(raw: bytes, where: str) -> SignatureFile:
    try:
        return SignatureFile.model_validate(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RecursionError, ValidationError):
        raise SignatureError(
            f"{where}/{SIGNATURE_FILE} is not a valid insitu signature; ask the sender to sign the package again."
        ) from None


def signature_claim(digests: PackageDigests, where: str) -> Signer | None:
    """Who signed, checked against the files and the key the signature names (not against any trust folder).

    None for an unsigned package; `SignatureError` when the files changed after signing or the
    signature is not valid for the key it names.
    """
    if digests.signature is None:
        return None
    sig = parse_signature(digests.signature, where)
    if sig.tensors_sha256 != digests.tensors_sha256:
        raise SignatureError(
            f"{where}/{TENSORS_FILE} changed after it was signed by {sig.signer!r}; get the package again from its source."
        )
    if sig.meta_sha256 != digests.meta_sha256:
        raise SignatureError(f"{where}/{META_FILE} changed after it was signed by {sig.signer!r}; get the package again from its source.")
    if sig.version >= 2 and sig.card_sha256 != digests.card_sha256:
        what = "was added" if sig.card_sha256 is None else ("was removed" if digests.card_sha256 is None else "changed")
        raise SignatureError(f"{where}/{CARD_FILE} {what} after it was signed by {sig.signer!r}; get the package again from its source.")
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig.public_key, validate=True))
        signature = base64.b64decode(sig.signature, validate=True)
    except (ValueError, binascii.Error):
        raise SignatureError(f"{where}/{SIGNATURE_FILE}: the public key or signature is not valid base64 of the right length.") from None
    if key_fingerprint(public) != sig.key_fingerprint:
        raise SignatureError(f"{where}/{SIGNATURE_FILE}: key_fingerprint does not match its public_key; the signature file was edited.")
    try:
        public.verify(signature, signed_payload(sig))
    except InvalidSignature:
        raise SignatureError(
            f"{where}/{SIGNATURE_FILE}: bad signature; the package or its signature was altered. Get it again from its source."
        ) from None
    return _signer_of(sig)


def verify_digests(digests: PackageDigests, trusted: dict[str, tuple[str, Ed25519PublicKey]], where: str) -> Signer:
    """The signer, when the signature is valid and made by one of the ``trusted`` keys; `SignatureError` otherwise."""
    claim = signature_claim(digests, where)
    if claim is None:
        raise SignatureError(
            f"{where} is not signed (no {SIGNATURE_FILE}) and a signature is required: trusted keys were given "
            "(--trusted-keys, trust.keys), so only a package signed by one of them is accepted. Ask the sender to run "
            "`insitu adapter sign`, or leave out the trusted keys to accept packages from anyone."
        )
    if claim.fingerprint not in trusted:
        raise SignatureError(
            f"{where} is signed by {claim.name!r} with key {claim.fingerprint[:16]}…, which is not among the trusted keys; "
            "if you trust this signer, get their .pub file through a channel you trust and put it in the trusted keys folder."
        )
    return dataclasses.replace(claim, key_name=trusted[claim.fingerprint][0])


def verify_signature(pkg_path: str | Path, trusted_keys_dir: str | Path) -> Signer:
    """Who signed the package at ``pkg_path``, checked against the public keys in ``trusted_keys_dir``."""
    trusted = load_trusted_keys(trusted_keys_dir)
    return verify_digests(digests_of(vet_package(pkg_path)), trusted, str(pkg_path))


def trust_of(cfg: RunConfig) -> TrustPolicy | None:
    """The run config's ``trust`` section as a policy; None when it checks nothing."""
    if cfg.trust.keys is None:
        return None
    return TrustPolicy(cfg.trust.keys, cfg.trust.require_signature)


_RUN_TRUST: contextvars.ContextVar[TrustPolicy | None] = contextvars.ContextVar("insitu_run_trust", default=None)


@contextlib.contextmanager
def run_trust(policy: TrustPolicy | None) -> Iterator[None]:
    """Within the block, :func:`current_trust` is ``policy``: how a run hands its trust policy to what it builds.

    Objectives that load a package themselves (self_distill) are built from their options alone;
    the pipeline wraps their construction in this block so they load through the run's policy.
    """
    token = _RUN_TRUST.set(policy)
    try:
        yield
    finally:
        _RUN_TRUST.reset(token)


def current_trust() -> TrustPolicy | None:
    """The trust policy of the run being built (:func:`run_trust`); None outside one (a present signature is still checked)."""
    return _RUN_TRUST.get()
