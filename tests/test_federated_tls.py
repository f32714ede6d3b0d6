"""Federation security: TLS required off loopback, site replies signed by trusted Ed25519 keys, a real gRPC run with TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from insitu.config import load_config
from insitu.errors import ConfigError
from insitu.federated import security
from tests.conftest import tiny_config, write_shapes

ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]


def _pem_pair(folder: Path, name: str, ca: tuple | None = None) -> tuple[Path, Path, tuple]:
    """A throwaway EC key and certificate: a self-signed CA when ``ca`` is None, else a server cert for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_cert, issuer_key = ca if ca else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path, (cert, key)


def tls_federation(tmp_path: Path, data: Path) -> tuple[int, Path]:
    """A loopback federation over TLS with site keys, for the real-gRPC tests: a CA and server certificate
    under ``certs/``, keys for site-a and site-b under ``keys/`` (both trusted in ``trusted/``), and
    ``server.yaml`` / ``site.yaml`` (2 rounds of 1 step, ``min_sites`` 2) in ``tmp_path``. Returns the
    free port and the CA certificate."""
    import socket

    import yaml

    from insitu.sharing.signing import generate_keypair

    certs = tmp_path / "certs"
    ca_cert, _, ca = _pem_pair(certs, "ca")
    server_cert, server_key, _ = _pem_pair(certs, "server", ca)
    (tmp_path / "trusted").mkdir()
    for name in ("site-a", "site-b"):
        generate_keypair(tmp_path / "keys", name)
        (tmp_path / "trusted" / f"{name}.pub").write_bytes((tmp_path / "keys" / f"{name}.pub").read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = tiny_config(data, tmp_path / "runs", objective={"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    fed = {"rounds": 2, "local_steps": 1, "min_sites": 2, "address": f"127.0.0.1:{port}"}
    server = {k: v for k, v in raw.items() if k != "data"}
    server["federated"] = {
        **fed,
        "tls": {"ca_cert": str(ca_cert), "server_cert": str(server_cert), "server_key": str(server_key)},
        "site_keys": str(tmp_path / "trusted"),
    }
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(server))
    raw["federated"] = {**fed, "tls": {"ca_cert": str(ca_cert)}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    return port, ca_cert


def _fed(**kw: object) -> SimpleNamespace:
    base = {"address": "127.0.0.1:8080", "tls": None, "site_key": None, "site_keys": None, "insecure": False}
    return SimpleNamespace(**{**base, **kw})


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:8080", True), ("localhost:9", True), ("[::1]:8080", True), ("0.0.0.0:8080", False), ("[::]:8080", False), ("10.1.2.3:1", False)],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert security.is_loopback(address) is loopback
    assert security.is_loopback("hospital.example.org:8080") is False


def test_config_refuses_a_network_address_without_tls(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, tmp_path / "runs")
    raw["federated"] = {"address": "0.0.0.0:8080"}
    with pytest.raises(ConfigError) as err:
        load_config(raw, check_paths=False)
    assert "federated.tls" in str(err.value) and "federated.insecure: true" in str(err.value) and "Security: TLS and site keys" in str(err.value)
    assert load_config(raw, ["federated.insecure=true"], check_paths=False).federated.insecure is True
    assert load_config(raw, ["federated.address=127.0.0.1:8080"], check_paths=False).federated.tls is None
    raw["federated"]["tls"] = {"ca_cert": "ca.pem"}
    assert load_config(raw, check_paths=False).federated.tls.ca_cert == Path("ca.pem")  # a site's copy: the CA alone
    raw["federated"]["tls"] = {"ca_cert": "ca.pem", "server_cert": "server.pem"}
    with pytest.raises(ConfigError, match="server_cert and server_key go together"):
        load_config(raw, check_paths=False)


def test_server_and_site_refuse_to_start_unauthenticated_off_loopback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tls_site = SimpleNamespace(ca_cert=tmp_path / "ca.pem", server_cert=None, server_key=None)
    with pytest.raises(ConfigError, match=r"federated.tls.server_cert and federated.tls.server_key, federated.site_keys"):
        security.check_role(_fed(address="0.0.0.0:8080", tls=tls_site), "server")
    with pytest.raises(ConfigError, match=r"needs federated.site_key\."):
        security.check_role(_fed(address="10.0.0.5:8080", tls=tls_site), "site")
    security.check_role(_fed(address="10.0.0.5:8080", tls=tls_site, site_key=tmp_path / "k"), "site")  # complete: no error
    with caplog.at_level(logging.WARNING, logger="insitu"):
        security.check_role(_fed(), "server")  # loopback: allowed, with a warning
        security.check_role(_fed(address="0.0.0.0:1", insecure=True), "site")
    assert "runs on loopback" in caplog.text and "federated.insecure is true" in caplog.text
    with pytest.raises(ConfigError, match="does not exist"):
        security.root_certificate(_fed(tls=tls_site))
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        security.root_certificate(_fed(tls=tls_site))


# ---- site keys --------------------------------------------------------------------------------


def _keys(tmp_path: Path) -> tuple[object, object, dict]:
    from insitu.sharing.signing import generate_keypair, load_private_key

    generate_keypair(tmp_path / "trusted", "hospital-a")
    generate_keypair(tmp_path / "other", "intruder")
    good, bad = load_private_key(tmp_path / "trusted" / "hospital-a.key"), load_private_key(tmp_path / "other" / "intruder.key")
    (tmp_path / "trusted" / "hospital-a.key").unlink()  # the server's folder holds public keys only
    return good, bad, security.load_site_keys(_fed(site_keys=tmp_path / "trusted"))


def test_a_reply_signature_binds_round_nonce_tensors_items_and_metrics(tmp_path: Path) -> None:
    good, bad, trusted = _keys(tmp_path)
    metrics = {"fingerprint": "f" * 64, "loss": 0.5}
    signed = {**metrics, **security.sign_reply(good, "n1", 3, ARRAYS, 12, metrics)}
    assert security.verify_reply(trusted, "n1", 3, ARRAYS, 12, signed) == ("hospital-a", "")
    changed = [ARRAYS[0] + 1, ARRAYS[1]]
    for args, words in [
        (("n2", 3, ARRAYS, 12, signed), "does not match"),  # replayed under another round's nonce
        (("n1", 4, ARRAYS, 12, signed), "does not match"),  # another round
        (("n1", 3, changed, 12, signed), "does not match"),  # altered tensors
        (("n1", 3, ARRAYS, 10**15, signed), "does not match"),  # altered item claim
        (("n1", 3, ARRAYS, 12, {**signed, "loss": 0.1}), "does not match"),  # altered metric
        (("n1", 3, ARRAYS, 12, metrics), "not signed"),
        (("n1", 3, ARRAYS, 12, {**metrics, **security.sign_reply(bad, "n1", 3, ARRAYS, 12, metrics)}), "not in federated.site_keys"),
        (("n1", 3, ARRAYS, 12, {**signed, security.SIGNATURE: "!!"}), "does not match"),
    ]:
        name, reason = security.verify_reply(trusted, *args)
        assert name is None and words in reason


def test_the_server_drops_unsigned_unknown_and_duplicate_replies_and_records_them(tmp_path: Path) -> None:
    """The authenticated strategy around the real one: only the trusted signer's reply is averaged; the round records the rest."""
    import flwr.common as common

    from insitu.federated.flower import initial_state, make_strategy

    good, bad, trusted = _keys(tmp_path)
    root = write_shapes(tmp_path / "site", n_per_class=2)
    raw = tiny_config(root, tmp_path / "runs", objective={"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    raw["federated"] = {"rounds": 1, "local_steps": 1}
    cfg = load_config(raw)
    state, _ = initial_state(cfg)
    strategy = security.authenticated_strategy(make_strategy(cfg, state), state, trusted)
    def answer(ins: object, timeout: float | None, group_id: int | None) -> object:  # the admission challenge, as the trusted site
        return common.GetPropertiesRes(common.Status(common.Code.OK, ""), security.answer_challenge(good, ins.config))

    proxy = SimpleNamespace(cid="x", get_properties=answer)
    manager = SimpleNamespace(all=lambda: {"x": proxy}, wait_for=lambda num_clients, timeout: True)
    [(_, ins)] = strategy.configure_fit(1, common.ndarrays_to_parameters(state.arrays), manager)
    nonce = ins.config[security.NONCE]
    assert len(nonce) == 64 and ins.config["round"] == 1

    moved = [a + 0.01 for a in state.arrays]

    def reply(key: object | None, arrays: list[np.ndarray]) -> object:
        metrics = {"fingerprint": state.fingerprint, "loss": 1.0}
        if key is not None:
            metrics.update(security.sign_reply(key, nonce, 1, arrays, 5, metrics))
        return common.FitRes(common.Status(common.Code.OK, ""), common.ndarrays_to_parameters(arrays), 5, metrics)

    evil = [a + 100.0 for a in state.arrays]
    results = [(proxy, reply(good, moved)), (proxy, reply(None, evil)), (proxy, reply(bad, evil)), (proxy, reply(good, evil))]
    _, metrics = strategy.aggregate_fit(1, results, [])
    record = state.rounds[-1]
    assert record.accepted == ["site-1"] and metrics["unauthenticated"] == 3
    reasons = sorted(record.dropped.values())
    assert any("not signed" in r for r in reasons) and any("not in federated.site_keys" in r for r in reasons)
    assert any("second reply signed by key 'hospital-a'" in r for r in reasons)
    for got, want in zip(state.arrays, moved, strict=True):  # the global state is the trusted site's, none of the attacker's
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ---- a real federation over gRPC with TLS -----------------------------------------------------


@pytest.mark.slow
def test_tls_federation_over_grpc_admits_only_credentialed_sites(tmp_path: Path) -> None:
    """Server with TLS and site keys; two signed sites; one with the CA but no key (dropped each round); one with the wrong CA (never joins)."""
    import socket
    import subprocess
    import sys
    import time


    wrong_ca, _, _ = _pem_pair(tmp_path / "elsewhere", "ca")
    roots = [write_shapes(tmp_path / f"patient_DOE_{i}_site", n_per_class=3, seed=i) for i in range(3)]
    port, _ = tls_federation(tmp_path, roots[0])  # the keyless site never counts towards min_sites
    cmd = [sys.executable, "-m", "insitu", "--quiet", "federate"]
    names = ["server", "site-a", "site-b", "no-key", "wrong-ca"]
    logs = {n: tmp_path / f"{n}.log" for n in names}

    def start(name: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([*cmd, *args], stdout=logs[name].open("w"), stderr=subprocess.STDOUT, text=True)

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in logs.values() if p.exists())

    def site(name: str, root: Path, *sets: str) -> subprocess.Popen:
        return start(name, ["site", "-c", str(tmp_path / "site.yaml"), "--set", f"data.root={root}", *[x for s in sets for x in ("--set", s)]])

    procs = {"server": start("server", ["server", "-c", str(tmp_path / "server.yaml")])}
    try:
        for _ in range(160):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert procs["server"].poll() is None, tails()
            time.sleep(0.5)
        procs["no-key"] = site("no-key", roots[2])  # first, so that it has connected before the round it is refused in
        procs["wrong-ca"] = site("wrong-ca", roots[2], f"federated.tls.ca_cert={wrong_ca}", f"federated.site_key={tmp_path / 'keys' / 'site-a.key'}")
        procs["site-a"] = site("site-a", roots[0], f"federated.site_key={tmp_path / 'keys' / 'site-a.key'}")
        procs["site-b"] = site("site-b", roots[1], f"federated.site_key={tmp_path / 'keys' / 'site-b.key'}")
        deadline = time.monotonic() + 240
        codes = {n: procs[n].wait(timeout=max(1.0, deadline - time.monotonic())) for n in ("server", "site-a", "site-b", "no-key")}
        wrong_ca_code = procs["wrong-ca"].poll()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert codes == {"server": 0, "site-a": 0, "site-b": 0, "no-key": 0}, tails()
    assert wrong_ca_code == 2 and "TLS handshake with the federation server" in logs["wrong-ca"].read_text(), tails()
    rounds = json.loads((tmp_path / "runs" / "tiny" / "rounds.json").read_text())["rounds"]
    assert len(rounds) == 2, tails()
    for r in rounds:  # the two signed sites are averaged; the keyless one is refused before any round; the wrong-CA one never joined
        assert len(r["accepted"]) == 2 and r["items"] == 24, (r, tails())
        assert set(r["dropped"]) <= {"refused-1"} and "did not sign the admission challenge" in r["dropped"].get("refused-1", "did not sign the admission challenge"), r
    assert "refused-1" in rounds[-1]["dropped"], rounds
    assert "SSL is enabled" in logs["server"].read_text(), tails()
    stored = (tmp_path / "runs" / "tiny" / "adapter" / "insitu.json").read_text()
    assert str(tmp_path / "certs") not in stored and "trusted" not in stored and "patient_DOE" not in stored
