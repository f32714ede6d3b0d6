"""Ed25519 signatures on adapter packages: who made a package, and that nothing changed since.

A signature covers one canonical byte string (:func:`signed_payload`) that binds

* ``tensors_sha256``: the sha256 of ``adapter.safetensors``, recomputed from the file (the
  ``content_sha256`` that ``insitu.json`` records is never trusted for this);
* ``meta_sha256``: the sha256 of ``insitu.json`` in canonical form (parsed, keys sorted, no
  whitespace, ASCII), so every metadata field is bound while re-indenting the file is harmless;
* the signer's name and the sha256 fingerprint of the raw 32-byte public key.

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
import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from insitu.errors import ConfigError, SignatureError
from insitu.io import OutputExistsError, atomic_path, atomic_write_bytes, read_capped
from insitu.package_format import CARD_FILE, META_FILE, SIGNATURE_FILE, TEACHER_FILE, TENSORS_FILE, VettedPackage, vet_package

if TYPE_CHECKING:
    from insitu.config import RunConfig

log = logging.getLogger(__name__)

SIGNATURE_FORMAT = "insitu-signature"
SIGNATURE_VERSION = 1
PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"
MAX_KEY_BYTES = 16 * 1024
MAX_TRUSTED_KEYS = 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_HEX64 = r"^[0-9a-f]{64}$"


class SignatureFile(BaseModel):
    """The schema of ``signature.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["insitu-signature"]
    version: Literal[1]
    algorithm: Literal["ed25519"]
    signer: str = Field(pattern=NAME_PATTERN)
    key_fingerprint: str = Field(pattern=_HEX64)
    public_key: str = Field(max_length=64)  # base64 of the raw 32-byte key
    tensors_sha256: str = Field(pattern=_HEX64)
    meta_sha256: str = Field(pattern=_HEX64)
    signature: str = Field(max_length=128)  # base64 of the 64-byte signature


@dataclass(frozen=True)
class Signer:
    """Who signed a package: the name they gave, their key's fingerprint, and the trusted key file that matched."""

    name: str
    fingerprint: str
    key_name: str | None = None  # stem of the trusted ``<key_name>.pub``; None when no trust folder was consulted


@dataclass(frozen=True)
class PackageDigests:
    """What a signature is checked against, computed from a vetted package's bytes."""

    tensors_sha256: str
    meta_sha256: str
    signature: bytes | None


@dataclass(frozen=True)
class TrustPolicy:
    """Which packages to accept: ``keys`` is a folder of trusted ``.pub`` files.

    With ``keys``, a signed package must carry a valid signature by one of them; with
    ``require_signature`` an unsigned package is refused too. Without ``keys`` nothing is checked
    (and ``require_signature`` is a config error: nothing could satisfy it).
    """

    keys: Path | None = None
    require_signature: bool = False

    def __post_init__(self) -> None:
        if self.require_signature and self.keys is None:
            raise ConfigError("require_signature needs a folder of trusted public keys: pass --trusted-keys DIR (or set trust.keys).")

    def check(self, digests: PackageDigests, where: str) -> Signer | None:
        """The trusted signer, None for an accepted unsigned package; raises `SignatureError` otherwise."""
        if self.keys is None or (digests.signature is None and not self.require_signature):
            return None
        return verify_digests(digests, load_trusted_keys(self.keys), where)


def digests_of(vetted: VettedPackage) -> PackageDigests:
    return PackageDigests(hashlib.sha256(vetted.tensor_bytes).hexdigest(), canonical_meta_sha256(vetted.meta_bytes), vetted.signature)


def canonical_meta_sha256(meta_bytes: bytes) -> str:
    """sha256 of ``insitu.json`` parsed and re-serialised canonically (sorted keys, no whitespace, ASCII)."""
    data = json.loads(meta_bytes)  # already parsed once by vet_package: valid JSON without NaN tokens
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def signed_payload(signer: str, fingerprint: str, tensors_sha256: str, meta_sha256: str) -> bytes:
    """The exact bytes an Ed25519 signature covers."""
    fields = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "signer": signer,
        "key_fingerprint": fingerprint,
        "tensors_sha256": tensors_sha256,
        "meta_sha256": meta_sha256,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_fingerprint(public: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key."""
    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def _check_name(name: str, what: str) -> str:
    if not re.match(NAME_PATTERN, name or ""):
        raise ConfigError(f"{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit).")
    return name


def generate_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, PEM, mode 0600) and ``<name>.pub`` (public, PEM) into ``out_dir``."""
    out_dir = Path(out_dir)
    _check_name(name, "key name")
    private_path, public_path = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise OutputExistsError(f"{path} already exists; insitu never replaces a key. Pick another --name or --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
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


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (ValueError, TypeError):
        key = None  # the library's message is not repeated: it could quote the file
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an unencrypted Ed25519 private key in PEM; make one with `insitu adapter keygen`.")
    return key


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


def sign_package(pkg_path: str | Path, key_path: str | Path, signer: str | None = None) -> Signer:
    """Add ``signature.json`` to a package folder (or rewrite a ``.zip`` with it); returns who signed."""
    pkg_path, key_path = Path(pkg_path), Path(key_path)
    if pkg_path.is_dir() and key_path.resolve().parent == pkg_path.resolve():
        raise SignatureError(f"{key_path} lies inside the package {pkg_path}; move the private key out of it before signing.")
    vetted = vet_package(pkg_path)  # never sign a package that would not load
    key = load_private_key(key_path)
    name = _check_name(signer or key_path.stem, "signer name")
    digests, fingerprint = digests_of(vetted), key_fingerprint(key.public_key())
    payload = signed_payload(name, fingerprint, digests.tensors_sha256, digests.meta_sha256)
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = SignatureFile(
        format=SIGNATURE_FORMAT,
        version=SIGNATURE_VERSION,
        algorithm="ed25519",
        signer=name,
        key_fingerprint=fingerprint,
        public_key=base64.b64encode(raw_public).decode(),
        tensors_sha256=digests.tensors_sha256,
        meta_sha256=digests.meta_sha256,
        signature=base64.b64encode(key.sign(payload)).decode(),
    )
    data = (json.dumps(doc.model_dump(), indent=2) + "\n").encode()
    if pkg_path.is_dir():
        atomic_write_bytes(pkg_path / SIGNATURE_FILE, data)
    else:
        _rewrite_zip(pkg_path, vetted, data)
    log.info("signed %s as %s (key %s)", pkg_path.name, name, fingerprint[:16])
    return Signer(name, fingerprint)


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
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig.public_key, validate=True))
        signature = base64.b64decode(sig.signature, validate=True)
    except (ValueError, binascii.Error):
        raise SignatureError(f"{where}/{SIGNATURE_FILE}: the public key or signature is not valid base64 of the right length.") from None
    if key_fingerprint(public) != sig.key_fingerprint:
        raise SignatureError(f"{where}/{SIGNATURE_FILE}: key_fingerprint does not match its public_key; the signature file was edited.")
    try:
        public.verify(signature, signed_payload(sig.signer, sig.key_fingerprint, sig.tensors_sha256, sig.meta_sha256))
    except InvalidSignature:
        raise SignatureError(
            f"{where}/{SIGNATURE_FILE}: bad signature; the package or its signature was altered. Get it again from its source."
        ) from None
    return Signer(sig.signer, sig.key_fingerprint)


def verify_digests(digests: PackageDigests, trusted: dict[str, tuple[str, Ed25519PublicKey]], where: str) -> Signer:
    """The signer, when the signature is valid and made by one of the ``trusted`` keys; `SignatureError` otherwise."""
    claim = signature_claim(digests, where)
    if claim is None:
        raise SignatureError(
            f"{where} is not signed (no {SIGNATURE_FILE}) and a signature is required; ask the sender to run "
            "`insitu adapter sign`, or drop --require-signature (trust.require_signature) to accept unsigned packages."
        )
    if claim.fingerprint not in trusted:
        raise SignatureError(
            f"{where} is signed by {claim.name!r} with key {claim.fingerprint[:16]}…, which is not among the trusted keys; "
            "if you trust this signer, get their .pub file through a channel you trust and put it in the trusted keys folder."
        )
    return Signer(claim.name, claim.fingerprint, trusted[claim.fingerprint][0])


def verify_signature(pkg_path: str | Path, trusted_keys_dir: str | Path) -> Signer:
    """Who signed the package at ``pkg_path``, checked against the public keys in ``trusted_keys_dir``."""
    trusted = load_trusted_keys(trusted_keys_dir)
    return verify_digests(digests_of(vet_package(pkg_path)), trusted, str(pkg_path))


def trust_of(cfg: RunConfig) -> TrustPolicy | None:
    """The run config's ``trust`` section as a policy; None when it checks nothing."""
    if cfg.trust.keys is None:
        return None
    return TrustPolicy(cfg.trust.keys, cfg.trust.require_signature)
