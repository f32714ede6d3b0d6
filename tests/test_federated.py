"""Federated continual pretraining: aggregation arithmetic, drop rules, site rounds, a Flower simulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from insitu.config import load_config
from insitu.federated.aggregate import SiteUpdate, WeightPolicy, aggregate, check_update, site_weights, weighted_average
from tests.conftest import tiny_config, write_shapes

FP = "a" * 64
SHAPES = [(2, 3), (4,)]


def _update(site: str, value: float, items: int, **kw: object) -> SiteUpdate:
    arrays = [np.full(s, value, dtype=np.float32) for s in SHAPES]
    return SiteUpdate(site=site, arrays=arrays, items=items, fingerprint=kw.pop("fingerprint", FP), **kw)  # type: ignore[arg-type]


def test_weighted_average_matches_hand_computation() -> None:
    a = SiteUpdate("s1", [np.array([[1.0, 2.0]], np.float32), np.array([0.0], np.float32)], items=10, fingerprint=FP)
    b = SiteUpdate("s2", [np.array([[3.0, -2.0]], np.float32), np.array([4.0], np.float32)], items=30, fingerprint=FP)
    out = weighted_average([a, b])
    # (10 * 1 + 30 * 3) / 40 = 2.5; (10 * 2 + 30 * -2) / 40 = -1; (0 + 30 * 4) / 40 = 3
    np.testing.assert_allclose(out[0], [[2.5, -1.0]])
    np.testing.assert_allclose(out[1], [3.0])
    assert all(o.dtype == np.float32 for o in out)


@pytest.mark.parametrize(
    ("update", "words"),
    [
        (_update("x", float("nan"), 5), "NaN or Inf"),
        (_update("x", float("inf"), 5), "NaN or Inf"),
        (_update("x", 1.0, 5, fingerprint="b" * 64), "another base"),
        (_update("x", 1.0, 0), "claims 0"),
        (_update("x", 1.0, 5, refused="its base differs"), "declined"),
        (SiteUpdate("x", [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)], 5, FP), "wrong shape"),
        (SiteUpdate("x", [np.zeros((2, 3), np.float32)], 5, FP), "sent 1 tensors"),
        (SiteUpdate("x", [np.zeros((2, 3), np.int64), np.zeros(4, np.int64)], 5, FP), "non-floating"),
        (_update("x", 1e30, 5), "above 1e+06"),  # finite but huge: could never be packaged
        (SiteUpdate("x", [np.full((2, 3), 1e300), np.zeros(4)], 5, FP), "NaN or Inf as float32"),  # float64 that overflows float32
    ],
)
def test_bad_updates_are_dropped_with_a_reason(update: SiteUpdate, words: str) -> None:
    reason = check_update(update, SHAPES, FP)
    assert reason is not None and words in reason
    avg, accepted, dropped, clipped = aggregate([_update("good1", 1.0, 10), update, _update("good2", 4.0, 30)], SHAPES, FP)
    assert [u.site for u in accepted] == ["good1", "good2"] and set(dropped) == {"x"}
    # two sites: neither may hold more than half the weight, so 30 vs 10 items is capped to equal weights
    np.testing.assert_allclose(avg[1], np.full(4, (1.0 + 4.0) / 2))
    assert set(clipped) == {"good2"} and "capped at 0.500" in clipped["good2"]


def test_all_dropped_gives_no_average() -> None:
    avg, accepted, dropped, _ = aggregate([_update("x", float("nan"), 3)], SHAPES, FP)
    assert avg is None and not accepted and "x" in dropped


def test_a_huge_item_claim_cannot_replace_the_global_model() -> None:
    """The audit's critical finding: one reply claiming 10^15 items made the average exactly the attacker's tensors."""
    honest = [_update(f"h{i}", 1.0, 100) for i in range(3)]
    attacker = _update("evil", 1000.0, 10**15)
    avg, accepted, dropped, clipped = aggregate([*honest, attacker], SHAPES, FP)
    assert len(accepted) == 4 and not dropped
    # the claim is clipped to max_site_items, then the share to 0.5: the average is half honest, half attacker
    np.testing.assert_allclose(avg[0], np.full(SHAPES[0], 0.5 * 1.0 + 0.5 * 1000.0))
    assert "claimed 1000000000000000 items" in clipped["evil"] and "capped at 0.500" in clipped["evil"]
    # with a tighter share (e.g. many sites), the attacker's say shrinks accordingly
    weights, _ = site_weights([*honest, attacker], WeightPolicy(max_share=0.25))
    np.testing.assert_allclose(weights, [0.25, 0.25, 0.25, 0.25])
    # equal weighting ignores every claim
    weights, notes = site_weights([*honest, attacker], WeightPolicy(weighting="equal"))
    np.testing.assert_allclose(weights, [0.25] * 4)
    assert not notes


def test_site_weights_water_fill_the_capped_share() -> None:
    sites = [_update("a", 0.0, 800), _update("b", 0.0, 150), _update("c", 0.0, 50)]
    weights, notes = site_weights(sites, WeightPolicy(max_share=0.5))
    # a is capped at 0.5; b and c share the other 0.5 in proportion 150:50
    np.testing.assert_allclose(weights, [0.5, 0.375, 0.125])
    assert set(notes) == {"a"} and "item share 0.800" in notes["a"]
    # below every cap the weights are plain FedAvg, with nothing noted
    weights, notes = site_weights(sites, WeightPolicy(max_share=0.9))
    np.testing.assert_allclose(weights, [0.8, 0.15, 0.05])
    assert not notes
    # one site alone always has weight 1
    np.testing.assert_allclose(site_weights(sites[:1], WeightPolicy(max_share=0.2))[0], [1.0])


def _fed_config(tmp_path: Path, roots: list[Path], **federated: object) -> object:
    raw = tiny_config(roots[0], tmp_path / "runs", objective={"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    raw["federated"] = {"rounds": 2, "local_steps": 2, "sites": [{"root": str(r), "image_size": 32} for r in roots], **federated}
    return load_config(raw)


def _sites(tmp_path: Path, n: int) -> list[Path]:
    # folder names that would identify a patient if they leaked
    return [write_shapes(tmp_path / f"patient_DOE_{i}_site", n_per_class=3, seed=i) for i in range(n)]


def test_site_round_trains_only_shared_tensors_and_fedprox_pulls_towards_global(tmp_path: Path) -> None:
    from insitu.federated.flower import initial_state, make_client
    from insitu.federated.site import SiteTrainer

    cfg = _fed_config(tmp_path, _sites(tmp_path, 1))
    state, _ = initial_state(cfg)
    assert state.names and all(n.startswith(("student.", "objective.")) for n in state.names)
    assert state.full_model_bytes > 5 * state.shared_bytes

    def moved(mu: float) -> float:
        trainer = SiteTrainer(cfg.model_copy(update={"data": cfg.federated.sites[0]}))
        assert trainer.names == state.names
        assert not any(k.startswith("backbone.") or k in state.names for k in trainer.local_state())
        arrays, loss = trainer.train_round([a.copy() for a in state.arrays], step_offset=0, steps=3, proximal_mu=mu)
        assert loss is not None and np.isfinite(loss)
        return float(sum(np.sum((a - g) ** 2) for a, g in zip(arrays, state.arrays, strict=True)))

    free, held = moved(0.0), moved(1e4)
    assert free > 0 and held < 0.5 * free  # the proximal term keeps the site near the global state

    # a client refuses to train for a server on another base, and replies with tensors and two scalars only
    trainer = SiteTrainer(cfg.model_copy(update={"data": cfg.federated.sites[0]}))
    client = make_client(trainer)
    config = {"round": 1, "step_offset": 0, "local_steps": cfg.federated.local_steps, "proximal_mu": 0.0, "fingerprint": "f" * 64}
    arrays, items, metrics = client.fit(state.arrays, config)
    assert items == 0 and "refused" in metrics
    arrays, items, metrics = client.fit(state.arrays, {**config, "fingerprint": state.fingerprint})
    assert items == trainer.items == 12 and set(metrics) <= {"fingerprint", "loss"}
    assert [a.shape for a in arrays] == state.shapes


def test_strategy_drops_bad_sites_and_the_round_completes(tmp_path: Path) -> None:
    import flwr.common as common

    from insitu.federated.flower import initial_state, make_strategy

    cfg = _fed_config(tmp_path, _sites(tmp_path, 1))
    state, _ = initial_state(cfg)
    strategy = make_strategy(cfg, state)

    def res(arrays: list[np.ndarray], items: int, fingerprint: str) -> object:
        status = common.Status(code=common.Code.OK, message="")
        return common.FitRes(status, common.ndarrays_to_parameters(arrays), items, {"fingerprint": fingerprint, "loss": 1.0})

    good = [a + 1.0 for a in state.arrays]
    nan = [a.copy() for a in state.arrays]
    nan[0][...] = np.nan
    wrong = [np.zeros((3, 3), np.float32)] + state.arrays[1:]
    results = [(None, res(good, 8, state.fingerprint)), (None, res(nan, 8, state.fingerprint)), (None, res(wrong, 8, state.fingerprint))]
    results.append((None, res(good, 8, "0" * 64)))
    garbage = res(good, 8, state.fingerprint)
    garbage.parameters = common.Parameters(tensors=[b"\x93NUMPY not an array"], tensor_type="numpy.ndarray")
    results.append((None, garbage))  # bytes that do not decode: dropped, the server goes on
    params, _ = strategy.aggregate_fit(1, results, [RuntimeError("/data/patient_DOE/secret.dcm unreadable")])
    record = state.rounds[-1]
    assert record.accepted == ["site-1"] and len(record.dropped) == 5
    reasons = " ".join(record.dropped.values())
    assert "NaN" in reasons and "wrong shape" in reasons and "another base" in reasons and "RuntimeError" in reasons
    assert "did not decode" in reasons
    assert "patient_DOE" not in json.dumps(state.summary())
    np.testing.assert_allclose(common.parameters_to_ndarrays(params)[0], good[0])


def test_a_simulated_round_waits_for_every_launched_site(tmp_path: Path) -> None:
    from insitu.federated.flower import initial_state, make_strategy

    cfg = _fed_config(tmp_path, _sites(tmp_path, 1))
    state, _ = initial_state(cfg)

    class OneSiteSoFar:  # a client manager on which only the first of three sites has registered yet
        def num_available(self) -> int:
            return 1

        def sample(self, num_clients: int, min_num_clients: int) -> list[str]:
            asked.append((num_clients, min_num_clients))
            return ["site"] * num_clients

    asked: list[tuple[int, int]] = []
    assert len(make_strategy(cfg, state, expected_sites=3).configure_fit(1, None, OneSiteSoFar())) == 3
    make_strategy(cfg, state).configure_fit(1, None, OneSiteSoFar())  # a server: whoever is there, at least min_sites
    assert asked == [(3, 3), (max(1, cfg.federated.min_sites), cfg.federated.min_sites)]


@pytest.mark.slow
def test_three_site_simulation_on_flower(tmp_path: Path) -> None:
    """`insitu federate simulate`, 3 sites, one of which fails every round: the rounds complete without it."""
    import yaml

    from insitu.adapters.package import load_package
    from insitu.cli import main
    from insitu.federated.flower import initial_state

    roots = _sites(tmp_path, 2)
    empty = tmp_path / "patient_DOE_9_site"  # a site whose data folder has no images: it fails each round
    empty.mkdir()
    cfg = _fed_config(tmp_path, [*roots, empty])
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["--quiet", "federate", "simulate", "-c", str(tmp_path / "fed.yaml"), "--sites", "3"]) == 0
    run_dir = cfg.run_dir
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert len(rounds) == 2 and all(len(r["accepted"]) == 2 and len(r["dropped"]) == 1 for r in rounds)
    assert all(r["items"] == 24 for r in rounds) and all("failed" in next(iter(r["dropped"].values())) for r in rounds)
    # the package loads and differs from the initial state; the server's files name no site, path or item
    pkg = load_package(run_dir / "adapter")
    init, _ = initial_state(cfg)
    assert pkg.meta.base.fingerprint == init.fingerprint and pkg.meta.normalizer is None
    state = pkg.adapter_state()
    assert any(
        not np.allclose(state[n.removeprefix("student.")].numpy(), a)
        for n, a in zip(init.names, init.arrays, strict=True)
        if n.startswith("student.")
    )
    written = " ".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".csv", ".md"))
    ids = [p.stem for r in roots for p in r.rglob("*.png")]
    assert "patient_DOE" not in written and str(tmp_path) not in written
    assert not any(i in written for i in ids)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["shared_bytes_per_site_per_round"] < summary["full_model_bytes"]
    # a second run into the same folder is refused (nothing is overwritten without --overwrite)
    assert main(["--quiet", "federate", "simulate", "-c", str(tmp_path / "fed.yaml")]) == 2


@pytest.mark.slow
def test_server_and_two_sites_over_grpc(tmp_path: Path) -> None:
    """A real deployment on localhost: `insitu federate server` and two `insitu federate site` processes."""
    import socket
    import subprocess
    import sys
    import time

    import yaml

    roots = _sites(tmp_path, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = tiny_config(roots[0], tmp_path / "runs", objective={"name": "simclr", "options": {"out_dim": 32, "hidden_dim": 32}})
    raw["federated"] = {"rounds": 2, "local_steps": 1, "min_sites": 2, "address": f"127.0.0.1:{port}"}
    server_cfg = {k: v for k, v in raw.items() if k != "data"}  # the server's copy holds no data section
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(server_cfg))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "insitu", "--quiet", "federate"]
    logs = [tmp_path / f"{name}.log" for name in ("server", "site1", "site2")]

    def start(args: list[str], log: Path) -> subprocess.Popen:  # output to files: a full pipe can never block a process
        return subprocess.Popen([*cmd, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)

    def tails() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())

    procs = [start(["server", "-c", str(tmp_path / "server.yaml")], logs[0])]
    try:
        for _ in range(160):  # sites join once the server listens (80 s at most)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert procs[0].poll() is None, tails()
            time.sleep(0.5)
        procs += [
            start(["site", "-c", str(tmp_path / "site.yaml"), "--set", f"data.root={r}"], log)
            for r, log in zip(roots, logs[1:], strict=True)
        ]
        deadline = time.monotonic() + 200  # one budget for all three, below pytest's own limit (pyproject)
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0], tails()
    out = logs[0].read_text()
    rounds = json.loads((tmp_path / "runs" / "tiny" / "rounds.json").read_text())["rounds"]
    assert len(rounds) == 2 and all(len(r["accepted"]) == 2 and r["items"] == 24 for r in rounds)
    assert "patient_DOE" not in out and "patient_DOE" not in (tmp_path / "runs" / "tiny" / "adapter" / "insitu.json").read_text()


def test_simulated_site_is_built_once_per_worker_and_keeps_its_teacher_in_the_context(tmp_path: Path) -> None:
    """The factory Flower pickles to its workers carries only the plan: a site is built once and reused each round."""
    from types import SimpleNamespace

    import cloudpickle
    import torch
    from flwr.app import RecordDict

    from insitu.federated import flower
    from insitu.federated.flower import SiteFactory, _context_store, initial_state, site_configs

    cfg = _fed_config(tmp_path, _sites(tmp_path, 2))
    factory = SiteFactory(site_configs(cfg, None), threads=torch.get_num_threads())
    context = SimpleNamespace(node_config={"partition-id": 1}, state=RecordDict())
    flower._SITES.clear()
    first = cloudpickle.loads(cloudpickle.dumps(factory))(context)
    site = flower._SITES[1]
    assert site.items == 12 and set(flower._SITES) == {1}
    state, _ = initial_state(cfg)
    config = {"round": 1, "step_offset": 0, "local_steps": cfg.federated.local_steps, "proximal_mu": 0.0, "fingerprint": state.fingerprint}
    first.numpy_client.fit(state.arrays, config)
    teacher = {k: v.clone() for k, v in site.local_state().items()}
    assert "insitu.local" in context.state  # the teacher went into the site's Flower context
    cloudpickle.loads(cloudpickle.dumps(factory))(context)  # the next round, a fresh copy of the factory
    assert flower._SITES[1] is site  # not rebuilt
    restored = _context_store(context)
    assert set(restored) == set(teacher) and all(torch.equal(restored[k], teacher[k]) for k in teacher)
    flower._SITES.clear()
