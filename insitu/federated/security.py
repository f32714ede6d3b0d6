"""Who may take part in a federation: TLS on the channel, and an Ed25519 key that signs every site reply.

What Flower offers on the entry points ``insitu federate server``/``site`` use (the legacy
``flwr.server.start_server`` / ``flwr.client.start_client``, gRPC "bidi" transport, flwr 1.42):

* **TLS with a server certificate**: ``start_server(certificates=(ca, cert, key))`` and
  ``start_client(root_certificates=ca)``. insitu wires these (``federated.tls``).
* **No client authentication.** The server's gRPC credentials are built with
  ``require_client_auth=False`` (``flwr.supercore.grpc.generic_create_grpc_server``) and
  ``start_client`` takes no client certificate, so mutual TLS is not available. ``start_client``
  accepts ``authentication_keys`` (SuperNode authentication, EC keys) but on this transport it only
  logs "SuperNode authentication is not supported for this transport type" and connects anyway;
  node authentication exists only in Flower's SuperLink/SuperNode deployment (``flower-superlink
  --enable-supernode-auth``), which insitu does not use.

So sites are authenticated by insitu itself: each round the server sends a fresh random nonce with
the round's instructions; a site signs its reply (nonce, round, the sha256 of its tensors, its item
count and every metric) with its Ed25519 key (``federated.site_key``, made by ``insitu adapter
keygen``); the server (``federated.site_keys``: a folder of trusted ``<site>.pub``) drops, and
records with the round, every reply that is unsigned, signed by a key it does not trust, whose
signature does not match, or a second reply signed by the same key in one round. A peer without a
trusted key can still connect and receive the global adapter tensors (the server cannot refuse the
connection itself); it can never change them.

Off a loopback address both are required unless ``federated.insecure: true``; on loopback a run
without them logs a warning.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.config import address_host, insecure_message, is_loopback  # noqa: F401 - re-exported: the pure address rules live with the config
from insitu.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from insitu.config import FederatedConfig
    from insitu.federated.flower import FederationState

log = logging.getLogger("insitu")

NONCE, SIGNATURE, KEY = "auth_nonce", "auth_signature", "auth_key"  # FitIns config key; the reply's metric keys
REPLY_FORMAT = "insitu-federated-reply"
MAX_CERT_BYTES = 1024 * 1024
DOCS = "docs/federated.md, 'Security: TLS and site keys'"


def check_role(fed: FederatedConfig, role: str) -> None:
    """Refuse a ``server``/``site`` that would run unauthenticated off loopback; warn about it on loopback."""
    missing = []
    if fed.tls is None:
        missing.append("federated.tls")
    elif role == "server" and (fed.tls.server_cert is None or fed.tls.server_key is None):
        missing.append("federated.tls.server_cert and federated.tls.server_key")
    if role == "server" and fed.site_keys is None:
        missing.append("federated.site_keys")
    if role == "site" and fed.site_key is None:
        missing.append("federated.site_key")
    if not missing:
        return
    if fed.insecure:
        log.warning("federated.insecure is true: the %s runs without %s; use this only for a lab test", role, ", ".join(missing))
    elif is_loopback(fed.address):
        log.warning("the %s runs on loopback (%s) without %s: fine on one machine, never across a network", role, fed.address, ", ".join(missing))
    else:
        raise ConfigError(f"the federation {role} needs {', '.join(missing)}. " + insecure_message(fed.address))


def _read(path: Path, key: str) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{key} {path} does not exist; make the certificates as {DOCS} shows.")
    data = path.read_bytes()[: MAX_CERT_BYTES + 1]
    if len(data) > MAX_CERT_BYTES or b"-----BEGIN" not in data:
        raise ConfigError(f"{key} {path} is not a PEM file (or is larger than {MAX_CERT_BYTES:,} bytes); make it as {DOCS} shows.")
    return data


def server_certificates(fed: FederatedConfig) -> tuple[bytes, bytes, bytes] | None:
    """``(ca, server certificate, server key)`` PEM bytes for ``start_server``, or None without ``federated.tls``."""
    tls = fed.tls
    if tls is None or tls.server_cert is None or tls.server_key is None:
        return None
    return (
        _read(tls.ca_cert, "federated.tls.ca_cert"),
        _read(tls.server_cert, "federated.tls.server_cert"),
        _read(tls.server_key, "federated.tls.server_key"),
    )


def root_certificate(fed: FederatedConfig) -> bytes | None:
    """The CA a site trusts for the server's certificate (``start_client(root_certificates=...)``), or None."""
    return None if fed.tls is None else _read(fed.tls.ca_cert, "federated.tls.ca_cert")


# ---- site keys --------------------------------------------------------------------------------


def tensors_sha256(arrays: list[np.ndarray]) -> str:
    """sha256 over each tensor's dtype, shape and C-order bytes (what the server decodes is what the site sent)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def reply_payload(fingerprint: str, nonce: str, server_round: int, arrays: list[np.ndarray], items: int, metrics: dict[str, Any]) -> bytes:
    """The exact bytes a site's reply signature covers."""
    fields = {
        "format": REPLY_FORMAT,
        "version": 1,
        "key_fingerprint": fingerprint,
        "nonce": nonce,
        "round": int(server_round),
        "tensors_sha256": tensors_sha256(arrays),
        "items": int(items),
        "metrics": {k: v for k, v in metrics.items() if k not in (SIGNATURE, KEY)},
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=repr).encode()


def sign_reply(
    key: Ed25519PrivateKey, nonce: str, server_round: int, arrays: list[np.ndarray], items: int, metrics: dict[str, Any]
) -> dict[str, str]:
    """The two metrics a signed reply adds: the key's fingerprint and the base64 signature."""
    from insitu.sharing.signing import key_fingerprint

    fingerprint = key_fingerprint(key.public_key())
    signature = key.sign(reply_payload(fingerprint, nonce, server_round, arrays, items, metrics))
    return {KEY: fingerprint, SIGNATURE: base64.b64encode(signature).decode()}


def verify_reply(
    trusted: dict[str, tuple[str, Ed25519PublicKey]], nonce: str, server_round: int, arrays: list[np.ndarray], items: int, metrics: dict[str, Any]
) -> tuple[str | None, str]:
    """``(trusted key name, "")`` for a valid signature, else ``(None, reason to drop the reply)``."""
    from cryptography.exceptions import InvalidSignature

    fingerprint, signature = metrics.get(KEY), metrics.get(SIGNATURE)
    if not isinstance(fingerprint, str) or not isinstance(signature, str):
        return None, "its reply is not signed (the site has no federated.site_key)"
    if fingerprint not in trusted:
        return None, f"its reply is signed by a key not in federated.site_keys (fingerprint {fingerprint[:16]}...)"
    name, public = trusted[fingerprint]
    try:
        public.verify(base64.b64decode(signature, validate=True), reply_payload(fingerprint, nonce, server_round, arrays, items, metrics))
    except (InvalidSignature, binascii.Error, ValueError):
        return None, f"its reply's signature by key {name!r} does not match the reply (altered, replayed or from another round)"
    return name, ""


def load_site_key(fed: FederatedConfig) -> Ed25519PrivateKey | None:
    if fed.site_key is None:
        return None
    from insitu.sharing.signing import load_private_key

    if not Path(fed.site_key).is_file():
        raise ConfigError(f"federated.site_key {fed.site_key} does not exist; make it with `insitu adapter keygen` ({DOCS}).")
    return load_private_key(fed.site_key)


def load_site_keys(fed: FederatedConfig) -> dict[str, tuple[str, Ed25519PublicKey]] | None:
    """``{fingerprint: (name, key)}`` of the trusted site keys, or None when ``federated.site_keys`` is not set."""
    if fed.site_keys is None:
        return None
    from insitu.sharing.signing import load_trusted_keys

    keys = load_trusted_keys(fed.site_keys)
    if not keys:
        raise ConfigError(f"federated.site_keys {fed.site_keys} holds no .pub file; copy each site's public key there ({DOCS}).")
    return keys


def signed_site(inner: Any, key: Ed25519PrivateKey) -> Any:
    """A Flower NumPyClient that runs ``inner`` and signs every fit reply with ``key``."""
    from flwr.client import NumPyClient

    class SignedSite(NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return inner.get_parameters(config)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            arrays, items, metrics = inner.fit(parameters, config)
            arrays = [np.asarray(a) for a in arrays]
            metrics = dict(metrics)
            metrics.update(sign_reply(key, str(config.get(NONCE, "")), int(config.get("round", 0)), arrays, int(items), metrics))
            return arrays, items, metrics

    return SignedSite()


def authenticated_strategy(inner: Any, state: FederationState, trusted: dict[str, tuple[str, Ed25519PublicKey]]) -> Any:
    """A Flower strategy around ``inner`` that sends a nonce each round and drops every reply not signed by a trusted key.

    The drops are added to the round's record (``rounds.csv``/``rounds.json``) as ``unauthenticated-N``."""
    import flwr.common as common
    from flwr.server.strategy import Strategy

    class AuthenticatedStrategy(Strategy):
        def __init__(self) -> None:
            super().__init__()
            self.nonces: dict[int, str] = {}

        def initialize_parameters(self, client_manager: Any) -> Any:
            return inner.initialize_parameters(client_manager)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            nonce = self.nonces[server_round] = secrets.token_hex(32)
            pairs = inner.configure_fit(server_round, parameters, client_manager)
            return [(c, common.FitIns(ins.parameters, {**ins.config, NONCE: nonce})) for c, ins in pairs]

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            nonce, kept, dropped, signers = self.nonces.pop(server_round, ""), [], {}, set()
            for client, res in results:
                metrics = res.metrics or {}
                try:
                    arrays = common.parameters_to_ndarrays(res.parameters)
                except Exception as exc:  # the inner strategy drops undecodable bytes too; here the signature cannot be checked
                    name, reason = None, f"its reply did not decode ({type(exc).__name__})"
                else:
                    name, reason = verify_reply(trusted, nonce, server_round, arrays, int(res.num_examples), metrics)
                if name is not None and name in signers:
                    name, reason = None, f"a second reply signed by key {name!r} in this round"
                if name is None:
                    dropped[f"unauthenticated-{len(dropped) + 1}"] = reason
                else:
                    signers.add(name)
                    kept.append((client, res))
            for site, reason in dropped.items():
                log.warning("round %d: site %s dropped: %s", server_round, site, reason)
            if signers:
                log.info("round %d: replies signed by %s", server_round, ", ".join(sorted(signers)))
            parameters, metrics = inner.aggregate_fit(server_round, kept, failures)
            if state.rounds and state.rounds[-1].round == server_round:
                state.rounds[-1].dropped.update(dropped)
            return parameters, {**metrics, "unauthenticated": len(dropped)}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            return inner.configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
            return inner.aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round: int, parameters: Any) -> tuple[float, dict[str, Any]] | None:
            return inner.evaluate(server_round, parameters)

    return AuthenticatedStrategy()


__all__ = [
    "authenticated_strategy",
    "check_role",
    "is_loopback",
    "load_site_key",
    "load_site_keys",
    "root_certificate",
    "server_certificates",
    "sign_reply",
    "signed_site",
    "verify_reply",
]
