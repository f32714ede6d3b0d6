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

So sites are authenticated by insitu itself, twice, with each site's Ed25519 key
(``federated.site_key``, made by ``insitu adapter keygen``) against the server's folder of trusted
``<site>.pub`` (``federated.site_keys``):

* **Admission, before any tensor is sent** (:class:`Admission`). Before a round's instructions go
  out, the server challenges every connected peer it has not yet admitted: Flower's legacy
  ``ClientProxy.get_properties`` carries a fresh random nonce and the server's label for the
  connection; the site signs both (a payload of its own format, so the signature can stand for
  nothing else). Only peers whose signature verifies against a trusted key, one connection per key,
  are shown to the round's sampling (a filtered view of Flower's ``ClientManager``), so a peer
  without a trusted key never receives ``FitIns``/``EvaluateIns`` and never sees the global
  tensors. It stays connected (the legacy transport cannot refuse a connection), is listed in every
  round's record as ``refused-N`` with the reason, and is never asked again. When fewer than
  ``federated.min_sites`` peers are admitted within ``federated.round_timeout_s``, the server
  disconnects every peer and raises :class:`FederationError`.
* **Every reply**: each round's instructions carry a fresh nonce; a site signs its reply (nonce,
  round, the sha256 of its tensors, its item count and every metric); the server drops, and records
  with the round, every reply that is unsigned, signed by a key it does not trust, whose signature
  does not match, or a second reply signed by the same key in one round.

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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.config import address_host, insecure_message, is_loopback  # noqa: F401 - re-exported: the pure address rules live with the config
from insitu.errors import ConfigError, InsituError
from insitu.federated.aggregate import site_text

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from insitu.config import FederatedConfig
    from insitu.federated.flower import FederationState

log = logging.getLogger("insitu")

NONCE, SIGNATURE, KEY = "auth_nonce", "auth_signature", "auth_key"  # FitIns config key; the reply's metric keys
CHALLENGE, PEER = "auth_challenge", "auth_peer"  # the admission challenge's config keys (GetPropertiesIns)
REPLY_FORMAT = "insitu-federated-reply"
CHALLENGE_FORMAT = "insitu-federated-challenge"
CHALLENGE_TIMEOUT_S = 30.0  # a peer that does not answer a challenge within this (or round_timeout_s, when shorter) is refused
POLL_S = 2.0  # how often the server looks for newly connected peers while it waits for min_sites admitted ones


class FederationError(InsituError):
    """The federation cannot go on: fewer peers proved a trusted site key than ``federated.min_sites`` within the timeout."""
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


def challenge_payload(fingerprint: str, nonce: str, peer: str) -> bytes:
    """The exact bytes a site's admission signature covers: its key, the server's nonce and the server's label for the connection."""
    fields = {"format": CHALLENGE_FORMAT, "version": 1, "key_fingerprint": fingerprint, "nonce": nonce, "peer": peer}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def answer_challenge(key: Ed25519PrivateKey, config: dict[str, Any]) -> dict[str, str]:
    """A site's answer to the server's admission challenge (``get_properties`` config): its key fingerprint and signature.

    Anything that is not a well-formed challenge gets an empty answer: the site signs nothing else."""
    from insitu.sharing.signing import key_fingerprint

    nonce, peer = config.get(CHALLENGE), config.get(PEER)
    if not isinstance(nonce, str) or not isinstance(peer, str) or not 32 <= len(nonce) <= 256 or not 0 < len(peer) <= 256:
        return {}
    fingerprint = key_fingerprint(key.public_key())
    return {KEY: fingerprint, SIGNATURE: base64.b64encode(key.sign(challenge_payload(fingerprint, nonce, peer))).decode()}


def verify_challenge(trusted: dict[str, tuple[str, Ed25519PublicKey]], nonce: str, peer: str, answer: dict[str, Any]) -> tuple[str | None, str]:
    """``(trusted key name, "")`` when ``answer`` signs this challenge with a trusted key, else ``(None, reason to refuse the peer)``."""
    from cryptography.exceptions import InvalidSignature

    fingerprint, signature = answer.get(KEY), answer.get(SIGNATURE)
    if not isinstance(fingerprint, str) or not isinstance(signature, str):
        return None, "it did not sign the admission challenge (the site has no federated.site_key)"
    if fingerprint not in trusted:
        return None, f"it signed the admission challenge with a key not in federated.site_keys (fingerprint {site_text(fingerprint, 16)}...)"
    name, public = trusted[fingerprint]
    try:
        public.verify(base64.b64decode(signature, validate=True), challenge_payload(fingerprint, nonce, peer))
    except (InvalidSignature, binascii.Error, ValueError):
        return None, f"its admission signature by key {name!r} does not match the challenge"
    return name, ""


class Admission:
    """Which connected peers proved a trusted site key; the server's rounds only ever see these (:meth:`admitted_view`).

    Each new peer is challenged once (:func:`challenge_payload`), in parallel, with a timeout; a
    refused one keeps its label (``refused-N``) and reason for the round records and is never asked
    again. A key admits one connection at a time: a second peer signing with a key whose peer is
    still connected is refused."""

    def __init__(self, trusted: dict[str, tuple[str, Ed25519PublicKey]], min_sites: int = 1, timeout_s: float | None = None) -> None:
        self.trusted, self.min_sites, self.timeout_s = trusted, max(1, min_sites), timeout_s
        self.names: dict[str, str] = {}  # peer id -> trusted key name
        self.refused: dict[str, tuple[str, str]] = {}  # peer id -> (label, reason)

    def admit(self, client_manager: Any) -> Any:
        """Challenge every new peer until ``min_sites`` are admitted; the admitted view of ``client_manager``.

        Raises :class:`FederationError` (after disconnecting every peer) when the timeout passes first."""
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            connected = dict(client_manager.all())
            self._challenge([p for cid, p in connected.items() if cid not in self.names and cid not in self.refused], set(connected))
            admitted = self.admitted(client_manager)
            if len(admitted) >= self.min_sites:
                return self.admitted_view(client_manager)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                refused = sum(1 for cid in self.refused if cid in client_manager.all())
                disconnect_all(client_manager)
                raise FederationError(
                    f"only {len(admitted)} connected site(s) proved a key in federated.site_keys within federated.round_timeout_s "
                    f"({self.timeout_s:g} s); federated.min_sites is {self.min_sites} ({refused} connected peer(s) refused, reasons in the log). "
                    f"Check that each site's federated.site_key has its .pub in the server's federated.site_keys ({DOCS})."
                )
            client_manager.wait_for(len(connected) + 1, timeout=POLL_S if left is None else max(0.05, min(POLL_S, left)))

    def admitted(self, client_manager: Any) -> dict[str, Any]:
        """The connected, admitted peers ``{peer id: proxy}``."""
        return {cid: p for cid, p in client_manager.all().items() if cid in self.names}

    def admitted_view(self, client_manager: Any) -> Any:
        return AdmittedClients(client_manager, self)

    def refusals(self, client_manager: Any) -> dict[str, str]:
        """``{label: reason}`` for every refused peer still connected: what a round's record lists."""
        connected = client_manager.all()
        return {label: reason for cid, (label, reason) in self.refused.items() if cid in connected}

    def _challenge(self, proxies: list[Any], connected: set[str]) -> None:
        if not proxies:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(proxies))) as pool:
            answers = list(pool.map(self._ask, proxies))
        for proxy, (nonce, answer) in zip(proxies, answers, strict=True):
            if isinstance(answer, str):
                name, reason = None, answer
            else:
                name, reason = verify_challenge(self.trusted, nonce, proxy.cid, answer)
            if name is not None and name in self.names.values():
                holder = next(cid for cid, n in self.names.items() if n == name)
                if holder in connected:
                    name, reason = None, f"a second connection signed with key {name!r}, whose site is already connected"
                else:
                    del self.names[holder]  # that site's earlier connection is gone: this one takes its place
            if name is None:
                label = f"refused-{len(self.refused) + 1}"
                self.refused[proxy.cid] = (label, reason)
                log.warning("peer %s refused before any parameters were sent: %s", label, reason)
            else:
                self.names[proxy.cid] = name
                log.info("peer admitted: signed with trusted key %r", name)

    def _ask(self, proxy: Any) -> tuple[str, dict[str, Any] | str]:
        import flwr.common as common

        nonce = secrets.token_hex(32)
        timeout = CHALLENGE_TIMEOUT_S if self.timeout_s is None else min(CHALLENGE_TIMEOUT_S, self.timeout_s)
        try:
            res = proxy.get_properties(common.GetPropertiesIns({CHALLENGE: nonce, PEER: proxy.cid}), timeout=timeout, group_id=None)
        except Exception as exc:  # timed out or disconnected: Flower closes that connection
            return nonce, f"it did not answer the admission challenge ({type(exc).__name__})"
        if res.status.code != common.Code.OK:
            return nonce, "it did not sign the admission challenge (the site has no federated.site_key)"
        return nonce, dict(res.properties or {})


def disconnect_all(client_manager: Any) -> None:
    """Tell every connected peer to disconnect for good (what Flower does after the last round), so no site waits forever."""
    import flwr.common as common

    proxies = list(client_manager.all().values())
    if not proxies:
        return

    def bye(proxy: Any) -> None:
        try:
            proxy.reconnect(common.ReconnectIns(seconds=None), timeout=5.0, group_id=None)
        except Exception:  # already gone
            pass

    with ThreadPoolExecutor(max_workers=min(16, len(proxies))) as pool:
        list(pool.map(bye, proxies))


class AdmittedClients:
    """A read-only view of Flower's ``ClientManager`` holding only the admitted peers: what a round samples from."""

    def __init__(self, manager: Any, admission: Admission, seed: int = 0) -> None:
        self.manager, self.admission = manager, admission
        self.rng = np.random.default_rng(seed)  # which admitted peers a round samples: seeded, like every draw in insitu

    def all(self) -> dict[str, Any]:
        return self.admission.admitted(self.manager)

    def num_available(self) -> int:
        return len(self.all())

    def wait_for(self, num_clients: int, timeout: float = 0) -> bool:
        return self.num_available() >= num_clients  # admission already waited; never block here

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Any = None) -> list[Any]:
        available = [p for p in self.all().values() if criterion is None or criterion.select(p)]
        if num_clients > len(available) or (min_num_clients or 0) > len(available):
            return []
        return [available[i] for i in self.rng.choice(len(available), size=num_clients, replace=False)]

    def register(self, client: Any) -> bool:
        raise RuntimeError("the admitted view is read-only; peers register with Flower's ClientManager")

    def unregister(self, client: Any) -> None:
        raise RuntimeError("the admitted view is read-only; peers register with Flower's ClientManager")


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
    """A Flower NumPyClient that runs ``inner``, answers the server's admission challenge and signs every fit reply with ``key``."""
    from flwr.client import NumPyClient

    class SignedSite(NumPyClient):
        def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
            return answer_challenge(key, config)

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return inner.get_parameters(config)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            arrays, items, metrics = inner.fit(parameters, config)
            arrays = [np.asarray(a) for a in arrays]
            metrics = dict(metrics)
            metrics.update(sign_reply(key, str(config.get(NONCE, "")), int(config.get("round", 0)), arrays, int(items), metrics))
            return arrays, items, metrics

    return SignedSite()


def authenticated_strategy(
    inner: Any, state: FederationState, trusted: dict[str, tuple[str, Ed25519PublicKey]], min_sites: int = 1, timeout_s: float | None = None
) -> Any:
    """A Flower strategy around ``inner`` that admits only peers proving a trusted key, and drops every reply not signed by one.

    ``configure_fit``/``configure_evaluate`` first run :meth:`Admission.admit` (challenge new peers,
    wait up to ``timeout_s`` for ``min_sites`` admitted ones) and hand ``inner`` a view of the
    client manager holding only the admitted peers, so ``inner`` never addresses another. Peers
    refused at admission are added to each round's record (``rounds.csv``/``rounds.json``) as
    ``refused-N``; replies dropped for their signature as ``unauthenticated-N``."""
    import flwr.common as common
    from flwr.server.strategy import Strategy

    class AuthenticatedStrategy(Strategy):
        def __init__(self) -> None:
            super().__init__()
            self.nonces: dict[int, str] = {}
            self.admission = Admission(trusted, min_sites, timeout_s)
            self.refusals: dict[int, dict[str, str]] = {}

        def initialize_parameters(self, client_manager: Any) -> Any:
            return inner.initialize_parameters(client_manager)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            admitted = self.admission.admit(client_manager)  # before any parameters leave the server
            self.refusals[server_round] = self.admission.refusals(client_manager)
            nonce = self.nonces[server_round] = secrets.token_hex(32)
            pairs = inner.configure_fit(server_round, parameters, admitted)
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
            refused = self.refusals.pop(server_round, {})
            if state.rounds and state.rounds[-1].round == server_round:
                state.rounds[-1].dropped.update({**refused, **dropped})
            return parameters, {**metrics, "unauthenticated": len(dropped), "refused": len(refused)}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            return inner.configure_evaluate(server_round, parameters, self.admission.admitted_view(client_manager))  # admitted peers only

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
            return inner.aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round: int, parameters: Any) -> tuple[float, dict[str, Any]] | None:
            return inner.evaluate(server_round, parameters)

    return AuthenticatedStrategy()


__all__ = [
    "Admission",
    "FederationError",
    "answer_challenge",
    "authenticated_strategy",
    "check_role",
    "is_loopback",
    "load_site_key",
    "load_site_keys",
    "root_certificate",
    "server_certificates",
    "sign_reply",
    "signed_site",
    "verify_challenge",
    "verify_reply",
]
