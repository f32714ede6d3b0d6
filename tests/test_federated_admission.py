"""Admission: a peer without a trusted site key is never sent the global tensors (insitu.federated.security.Admission).

The unit tests drive the authenticated strategy with stand-in peers (Flower's ``ClientProxy``
interface: ``cid``, ``get_properties``, ``reconnect``); the slow test runs a real server with TLS
and site keys over gRPC on loopback, two keyed sites, and two peers that record every message the
server sends them: one without a key and one with a key the server does not trust.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from insitu.config import load_config
from insitu.federated import security
from tests.conftest import tiny_config, write_shapes
from tests.test_federated_tls import tls_federation


class Peer:
    """A stand-in for Flower's ClientProxy: answers the admission challenge as a site with ``key`` would (None: no key)."""

    def __init__(self, cid: str, key: object | None = None, silent: bool = False, forge: str | None = None) -> None:
        self.cid, self.key, self.silent, self.forge = cid, key, silent, forge
        self.asked: list[dict] = []
        self.reconnected = False

    def get_properties(self, ins: object, timeout: float | None, group_id: int | None) -> object:
        import flwr.common as common

        self.asked.append(dict(ins.config))
        if self.silent:
            raise TimeoutError("no answer")
        if self.key is None:  # a Flower client that does not implement get_properties
            return common.GetPropertiesRes(common.Status(common.Code.GET_PROPERTIES_NOT_IMPLEMENTED, ""), {})
        config = dict(ins.config)
        if self.forge:  # a signature made for another connection
            config[security.PEER] = self.forge
        return common.GetPropertiesRes(common.Status(common.Code.OK, ""), security.answer_challenge(self.key, config))

    def reconnect(self, ins: object, timeout: float | None, group_id: int | None) -> object:
        self.reconnected = True
        return None


class Manager:
    """Flower's ClientManager as the strategy uses it (all, wait_for; sample only through the admitted view)."""

    def __init__(self, peers: list[Peer]) -> None:
        self.clients = {p.cid: p for p in peers}

    def all(self) -> dict[str, Peer]:
        return self.clients

    def num_available(self) -> int:
        return len(self.clients)

    def wait_for(self, num_clients: int, timeout: float = 0) -> bool:
        time.sleep(min(timeout, 0.05))
        return len(self.clients) >= num_clients

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: object = None) -> list[Peer]:
        raise AssertionError("the strategy sampled Flower's whole client manager, not the admitted view")


def _keys(tmp_path: Path) -> tuple[dict, dict]:
    from insitu.sharing.signing import generate_keypair, load_private_key

    keys = {}
    for folder, name in [("trusted", "hospital-a"), ("trusted", "hospital-b"), ("other", "intruder")]:
        generate_keypair(tmp_path / folder, name)
        keys[name] = load_private_key(tmp_path / folder / f"{name}.key")
        (tmp_path / folder / f"{name}.key").unlink()  # the server's folder holds public keys only
    fed = SimpleNamespace(site_keys=tmp_path / "trusted")
    return keys, security.load_site_keys(fed)


def test_a_challenge_signature_binds_nonce_peer_and_key(tmp_path: Path) -> None:
    keys, trusted = _keys(tmp_path)
    nonce = "ab" * 32
    answer = security.answer_challenge(keys["hospital-a"], {security.CHALLENGE: nonce, security.PEER: "p1"})
    assert security.verify_challenge(trusted, nonce, "p1", answer) == ("hospital-a", "")
    assert "does not match" in security.verify_challenge(trusted, "cd" * 32, "p1", answer)[1]  # replayed for another challenge
    assert "does not match" in security.verify_challenge(trusted, nonce, "p2", answer)[1]  # relayed to another connection
    intruder = security.answer_challenge(keys["intruder"], {security.CHALLENGE: nonce, security.PEER: "p1"})
    assert "not in federated.site_keys" in security.verify_challenge(trusted, nonce, "p1", intruder)[1]
    assert "did not sign" in security.verify_challenge(trusted, nonce, "p1", {})[1]
    # a site signs nothing but a well-formed challenge (a hostile server cannot use it to sign other bytes)
    assert security.answer_challenge(keys["hospital-a"], {security.CHALLENGE: "short", security.PEER: "p1"}) == {}
    assert security.answer_challenge(keys["hospital-a"], {"anything": "else"}) == {}


@pytest.fixture(scope="module")
def strategy_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from insitu.federated.flower import initial_state

    tmp = tmp_path_factory.mktemp("admission")
    root = write_shapes(tmp / "site", n_per_class=2)
    raw = tiny_config(root, tmp / "runs", objective={"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    raw["federated"] = {"rounds": 2, "local_steps": 1, "min_sites": 2}
    cfg = load_config(raw)
    state, _ = initial_state(cfg)
    return cfg, state


def test_only_admitted_peers_get_the_round_and_refusals_are_recorded(tmp_path: Path, strategy_parts: tuple) -> None:
    import flwr.common as common

    from insitu.federated.flower import make_strategy

    cfg, state = strategy_parts
    state.rounds.clear()
    keys, trusted = _keys(tmp_path)
    good_a, good_b = Peer("a", keys["hospital-a"]), Peer("b", keys["hospital-b"])
    refused = [Peer("no-key"), Peer("intruder", keys["intruder"]), Peer("copy-of-a", keys["hospital-a"]), Peer("forged", keys["hospital-b"], forge="b")]
    silent = Peer("silent", silent=True)
    manager = Manager([good_a, *refused, good_b, silent])
    strategy = security.authenticated_strategy(make_strategy(cfg, state), state, trusted, min_sites=2, timeout_s=5)
    pairs = strategy.configure_fit(1, common.ndarrays_to_parameters(state.arrays), manager)
    assert sorted(c.cid for c, _ in pairs) == ["a", "b"]  # the FitIns (with the global tensors) go to the admitted peers alone
    nonces = [p.asked[0][security.CHALLENGE] for p in manager.clients.values()]
    assert len(set(nonces)) == len(nonces) and all(len(n) == 64 for n in nonces)  # a fresh nonce per challenge
    assert strategy.configure_evaluate(1, common.ndarrays_to_parameters(state.arrays), manager) == []

    def reply(key: object, nonce: str) -> object:
        arrays = [a + 0.01 for a in state.arrays]
        metrics = {"fingerprint": state.fingerprint, "loss": 1.0}
        metrics.update(security.sign_reply(key, nonce, 1, arrays, 5, metrics))
        return common.FitRes(common.Status(common.Code.OK, ""), common.ndarrays_to_parameters(arrays), 5, metrics)

    nonce = pairs[0][1].config[security.NONCE]
    _, metrics = strategy.aggregate_fit(1, [(good_a, reply(keys["hospital-a"], nonce)), (good_b, reply(keys["hospital-b"], nonce))], [])
    record = state.rounds[-1]
    assert len(record.accepted) == 2 and metrics["refused"] == 5 and metrics["unauthenticated"] == 0
    reasons = [record.dropped[f"refused-{i}"] for i in range(1, 6)]
    assert sum("did not sign" in r for r in reasons) == 1 and sum("not in federated.site_keys" in r for r in reasons) == 1
    assert sum("second connection signed with key 'hospital-a'" in r for r in reasons) == 1
    assert sum("does not match the challenge" in r for r in reasons) == 1 and sum("did not answer" in r for r in reasons) == 1
    assert not any(name in " ".join(reasons) for name in ("no-key", "copy-of-a", "forged", "silent"))  # only the server's own labels

    # round 2: nobody is asked twice; the refused peers are listed again, the admitted two get the round
    asked = {p.cid: len(p.asked) for p in manager.clients.values()}
    pairs = strategy.configure_fit(2, common.ndarrays_to_parameters(state.arrays), manager)
    assert sorted(c.cid for c, _ in pairs) == ["a", "b"] and asked == {p.cid: len(p.asked) for p in manager.clients.values()}


def test_too_few_admitted_sites_is_a_typed_error_after_the_timeout(tmp_path: Path, strategy_parts: tuple) -> None:
    import flwr.common as common

    from insitu.federated.flower import make_strategy

    cfg, state = strategy_parts
    keys, trusted = _keys(tmp_path)
    peers = [Peer("a", keys["hospital-a"]), Peer("no-key"), Peer("intruder", keys["intruder"])]
    strategy = security.authenticated_strategy(make_strategy(cfg, state), state, trusted, min_sites=2, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(security.FederationError, match=r"only 1 connected site\(s\) proved a key in federated.site_keys.*min_sites is 2"):
        strategy.configure_fit(1, common.ndarrays_to_parameters(state.arrays), Manager(peers))
    assert time.monotonic() - start < 10
    assert all(p.reconnected for p in peers)  # every peer is told to disconnect: no site waits forever


def test_a_site_admitted_later_joins_the_waiting_round(tmp_path: Path, strategy_parts: tuple) -> None:
    import flwr.common as common

    from insitu.federated.flower import make_strategy

    cfg, state = strategy_parts
    keys, trusted = _keys(tmp_path)
    manager = Manager([Peer("a", keys["hospital-a"]), Peer("no-key")])
    late = threading.Timer(0.3, lambda: manager.clients.update(b=Peer("b", keys["hospital-b"])))
    late.start()
    strategy = security.authenticated_strategy(make_strategy(cfg, state), state, trusted, min_sites=2, timeout_s=20)
    pairs = strategy.configure_fit(1, common.ndarrays_to_parameters(state.arrays), manager)
    late.join()
    assert sorted(c.cid for c, _ in pairs) == ["a", "b"]


# ---- a real federation over gRPC with TLS -----------------------------------------------------

SPY = r"""
import json, sys
from pathlib import Path
import numpy as np
from insitu.federated.telemetry import set_telemetry
set_telemetry(False)
from flwr.client import NumPyClient, start_client
from insitu.federated import security

address, ca, record, key = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

def note(kind, parameters=(), config=None):
    with record.open("a") as f:
        f.write(json.dumps({"call": kind, "bytes": int(sum(np.asarray(a).nbytes for a in parameters)), "keys": sorted(config or {})}) + "\n")

class Spy(NumPyClient):
    def get_parameters(self, config):
        note("get_parameters", config=config)
        return []
    def fit(self, parameters, config):
        note("fit", parameters, config)
        return [], 1, {}
    def evaluate(self, parameters, config):
        note("evaluate", parameters, config)
        return 0.0, 1, {}

client = Spy()
if key != "-":
    from insitu.sharing.signing import load_private_key
    client = security.signed_site(client, load_private_key(key))
note("start")
start_client(server_address=address, client=client.to_client(), root_certificates=ca.read_bytes())
note("end")
"""


@pytest.mark.slow
def test_keyless_and_wrong_key_peers_never_receive_parameters_over_grpc(tmp_path: Path) -> None:
    """Real server (TLS, site keys), two keyed sites over gRPC on loopback; a keyless and a wrong-key peer record no fit."""

    from insitu.sharing.signing import generate_keypair

    generate_keypair(tmp_path / "other", "intruder")
    roots = [write_shapes(tmp_path / f"site_{i}", n_per_class=2, seed=i) for i in range(2)]
    port, ca_cert = tls_federation(tmp_path, roots[0])
    address = f"127.0.0.1:{port}"
    (tmp_path / "spy.py").write_text(SPY)
    logs = {n: tmp_path / f"{n}.log" for n in ("server", "site-a", "site-b", "no-key", "wrong-key")}
    records = {n: tmp_path / f"{n}.jsonl" for n in ("no-key", "wrong-key")}

    def start(name: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(args, stdout=logs[name].open("w"), stderr=subprocess.STDOUT, text=True)

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in [*logs.values(), *records.values()] if p.exists())

    cmd = [sys.executable, "-m", "insitu", "--quiet", "federate"]
    procs = {"server": start("server", [*cmd, "server", "-c", str(tmp_path / "server.yaml")])}
    try:
        for _ in range(160):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert procs["server"].poll() is None, tails()
            time.sleep(0.5)
        # the two peers connect first, so that on a server without admission they would be sampled in round 1
        spy = [sys.executable, str(tmp_path / "spy.py"), address, str(ca_cert)]
        procs["no-key"] = start("no-key", [*spy, str(records["no-key"]), "-"])
        procs["wrong-key"] = start("wrong-key", [*spy, str(records["wrong-key"]), str(tmp_path / "other" / "intruder.key")])
        for _ in range(120):
            if all(r.exists() for r in records.values()):
                break
            time.sleep(0.5)
        time.sleep(2.0)  # from "start" to connected
        for name, root in (("site-a", roots[0]), ("site-b", roots[1])):
            key = f"federated.site_key={tmp_path / 'keys' / f'{name}.key'}"
            procs[name] = start(name, [*cmd, "site", "-c", str(tmp_path / "site.yaml"), "--set", f"data.root={root}", "--set", key])
        deadline = time.monotonic() + 240
        codes = {n: procs[n].wait(timeout=max(1.0, deadline - time.monotonic())) for n in procs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, record in records.items():  # each peer connected and was let go at the end, and was never sent a tensor
        calls = [json.loads(line) for line in record.read_text().splitlines()]
        assert [c["call"] for c in calls] == ["start", "end"], (name, calls, tails())
    # (before admission, the two peers counted towards min_sites: the rounds ran on them, and the keyed sites found no server)
    assert codes == dict.fromkeys(procs, 0), tails()
    rounds = json.loads((tmp_path / "runs" / "tiny" / "rounds.json").read_text())["rounds"]
    assert len(rounds) == 2, tails()
    for r in rounds:  # the keyed sites trained and were averaged; the two peers are listed as refused, every round
        assert len(r["accepted"]) == 2 and r["items"] == 16, (r, tails())
        assert sorted(r["dropped"]) == ["refused-1", "refused-2"], (r, tails())
        reasons = " ".join(r["dropped"].values())
        assert "did not sign the admission challenge" in reasons and "key not in federated.site_keys" in reasons, r
    assert str(tmp_path) not in json.dumps(rounds)
    assert np.isfinite([r["mean_loss"] for r in rounds]).all()
