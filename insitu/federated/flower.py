"""insitu's federation on Flower: one strategy for the server, one client for each site.

The same two objects run a local simulation (Flower's simulation engine, one virtual site per
data section, ``insitu federate simulate``) and a real deployment over the network (``insitu
federate server`` on one machine, ``insitu federate site`` at each site; Flower's gRPC transport).

What crosses the network, each round and each way: the shared tensors (student adapters and the
objective's trainable heads, float32, in a fixed order) and a few scalars (round, step offset,
proximal weight, the base fingerprint; back: item count, last loss, fingerprint). Never an image,
a manifest, an item id or a path. The server checks every reply (:mod:`insitu.federated.aggregate`)
and drops a site from the round, logging only the server's label for it and the reason, when it
failed or disconnected, declined, used another base, or sent wrong shapes or non-finite values.
A site checks what the server asks in turn (:func:`check_request`): its own ``local_steps``, a
bounded proximal weight, and a global state of the right shapes with finite, bounded values.

Every import of Flower here follows :func:`require_flower`, which switches Flower's telemetry
off (:mod:`insitu.federated.telemetry`) unless ``federated.telemetry: true``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from insitu.config import RunConfig
from insitu.federated.aggregate import SiteUpdate, WeightPolicy, aggregate, check_tensors, site_text, update_norm
from insitu.federated.site import SiteTrainer, federated_config, get_arrays, shared_names
from insitu.federated.telemetry import import_flower, set_telemetry
from insitu.pipelines.pretrain import PretrainModule

log = logging.getLogger("insitu")
logging.getLogger("flwr").propagate = False  # Flower prints its own log lines; do not repeat them through insitu's handler

FINGERPRINT, ITEMS, LOSS, REFUSED = "fingerprint", "items", "loss", "refused"
MAX_PROXIMAL_MU = 1.0  # a site refuses a larger proximal weight than this (or than its own config's, when larger)
MESSAGE_MARGIN, MESSAGE_OVERHEAD = 2, 1 << 20  # gRPC limit: the shared tensors' bytes x 2 + 1 MiB (headers, scalars)


@dataclass
class RoundRecord:
    """What the server saw in one round (no site names, paths or item ids: sites are its own labels)."""

    round: int
    accepted: list[str]
    dropped: dict[str, str]
    items: int
    mean_loss: float | None
    bytes_per_site: int  # the shared tensors one site sends (and receives) per round
    wall_s: float
    clipped: dict[str, str] = field(default_factory=dict)  # sites whose item count, weight share or update norm was capped
    update_norms: dict[str, float] = field(default_factory=dict)  # each accepted reply's L2 distance to the global state


@dataclass
class FederationState:
    """The server's view of the federation: the global tensors and the round records."""

    names: list[str]
    arrays: list[np.ndarray]
    fingerprint: str
    full_model_bytes: int  # what sending base + adapters + heads would cost, for comparison
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(a.shape) for a in self.arrays]

    @property
    def shared_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    def summary(self) -> dict[str, Any]:
        return {"rounds": [asdict(r) for r in self.rounds], "shared_bytes": self.shared_bytes, "full_model_bytes": self.full_model_bytes}


def initial_state(cfg: RunConfig) -> tuple[FederationState, PretrainModule]:
    """The global starting point, built on the server from the config alone (seeded adapters and heads)."""
    torch.manual_seed(cfg.seed)
    module = PretrainModule(federated_config(cfg))
    names = shared_names(module)
    full = sum(v.numel() * 4 for k, v in module.state_dict().items() if k.startswith(("backbone.", "student.")) or k in names)
    return FederationState(names, get_arrays(module, names), module.fingerprint, int(full)), module


def message_limit(arrays: list[np.ndarray]) -> int:
    """The gRPC message limit for a federation sharing ``arrays``: their bytes x 2 + 1 MiB (Flower's default is 2 GiB).

    One message carries the shared tensors once (numpy headers and a few scalars besides), so a
    larger message is refused by gRPC before it is loaded."""
    return int(MESSAGE_MARGIN * sum(a.nbytes for a in arrays) + MESSAGE_OVERHEAD)


def require_flower(telemetry: bool | None = None) -> Any:
    """``flwr.common``, imported with Flower's telemetry off (on only with ``telemetry=True``; None keeps the last choice)."""
    if telemetry is not None:
        set_telemetry(telemetry)
    try:
        import_flower("flwr")
    except ImportError:
        from insitu.errors import ConfigError

        raise ConfigError("federated training needs Flower: pip install 'insitu[federated]' (flwr with its simulation engine).") from None
    return import_flower("flwr.common")


def weight_policy(fed: Any) -> WeightPolicy:
    """The server's aggregation policy from the ``federated`` config section."""
    rule = fed.aggregation if fed.aggregation in ("trimmed_mean", "median", "krum") else "mean"
    return WeightPolicy(
        weighting=fed.weighting,
        max_items=fed.max_site_items,
        max_share=fed.max_site_share,
        rule=rule,
        max_update_norm=fed.max_update_norm,
        update_norm_factor=fed.update_norm_factor,
        trim_fraction=fed.trim_fraction,
        krum_malicious=fed.krum_malicious,
        krum_keep=fed.krum_keep,
    )


def make_strategy(cfg: RunConfig, state: FederationState, expected_sites: int = 0) -> Any:
    """A Flower strategy that sends the global tensors to every site and averages the checked replies.

    ``expected_sites`` (a simulation knows how many it launched): every round waits until that many
    have registered, so an early round never runs on whichever sites happened to start first."""
    common = require_flower(cfg.federated.telemetry)  # first: Flower's telemetry is switched before it is imported
    from flwr.server.strategy import Strategy

    fed = cfg.federated

    class InsituStrategy(Strategy):
        def __init__(self) -> None:
            super().__init__()
            self._started = 0.0

        def initialize_parameters(self, client_manager: Any) -> Any:
            return common.ndarrays_to_parameters(state.arrays)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            self._started = time.perf_counter()
            need = max(fed.min_sites, expected_sites)
            wanted = max(need, client_manager.num_available())
            clients = client_manager.sample(num_clients=wanted, min_num_clients=need)
            config = {
                "round": server_round,
                "step_offset": (server_round - 1) * fed.local_steps,
                "local_steps": fed.local_steps,
                "proximal_mu": fed.proximal_mu if fed.aggregation == "fedprox" else 0.0,
                FINGERPRINT: state.fingerprint,
            }
            return [(c, common.FitIns(parameters, dict(config))) for c in clients]

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
            policy = weight_policy(fed)
            record = aggregate_round(state, server_round, [res for _, res in results], failures, self._started, policy)
            return common.ndarrays_to_parameters(state.arrays), {"sites": len(record.accepted), "dropped": len(record.dropped)}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
            return []  # sites evaluate with `insitu probe`/`evaluate` on the final package, on their own labels

        def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> tuple[float, dict[str, Any]] | None:
            return None

    return InsituStrategy()


def aggregate_round(
    state: FederationState, server_round: int, replies: list[Any], failures: list[Any], started: float, policy: WeightPolicy | None = None
) -> RoundRecord:
    """Check and average one round's replies into ``state`` (unchanged when none passes); record and log the round.

    A reply whose bytes do not decode is dropped like any other bad reply: the server never dies of one site."""
    policy = policy or WeightPolicy()
    updates, undecodable = [], {}
    for i, res in enumerate(replies):
        try:
            updates.append(_update(i, res))
        except Exception as exc:  # hostile or corrupt bytes: Flower would not catch this in aggregate_fit
            undecodable[f"site-{i + 1}"] = f"its reply did not decode ({type(exc).__name__})"
    new, accepted, dropped, clipped = aggregate(updates, state.shapes, state.fingerprint, policy, reference=state.arrays)
    norms = {u.site: round(update_norm(u, state.arrays), 6) for u in accepted}
    dropped.update(undecodable)
    for site, note in clipped.items():
        log.warning("round %d: site %s: %s", server_round, site, note)
    for j, failure in enumerate(failures):  # the exception text may name a site's files: keep only its type
        kind = type(failure[1] if isinstance(failure, tuple) else failure).__name__
        dropped[f"failed-{j + 1}"] = f"the site failed, timed out or disconnected ({kind})"
    dropped = {site: site_text(reason, 400) for site, reason in dropped.items()}  # reasons quote a site's text: bound them again
    for site, reason in dropped.items():
        log.warning("round %d: site %s dropped: %s", server_round, site, reason)
    if new is not None:
        state.arrays = new
    else:
        log.warning("round %d: no site update passed the checks; the global state is unchanged", server_round)
    losses = [u.loss for u in accepted if u.loss is not None]
    record = RoundRecord(
        server_round,
        [u.site for u in accepted],
        dropped,
        sum(min(u.items, policy.max_items) for u in accepted),  # items as counted, after the clip
        float(np.mean(losses)) if losses else None,
        state.shared_bytes,
        round(time.perf_counter() - started, 3),
        clipped,
        norms,
    )
    state.rounds.append(record)
    log.info(
        "round %d: %d sites averaged (%d items), %d dropped, %.1f s", server_round, len(accepted), record.items, len(dropped), record.wall_s
    )
    return record


def _update(index: int, res: Any) -> SiteUpdate:
    common = require_flower()
    metrics = res.metrics or {}
    loss = metrics.get(LOSS)
    return SiteUpdate(
        site=f"site-{index + 1}",
        arrays=common.parameters_to_ndarrays(res.parameters),
        items=int(res.num_examples),
        fingerprint=site_text(metrics.get(FINGERPRINT, ""), 128),
        loss=float(loss) if isinstance(loss, int | float) and np.isfinite(loss) else None,
        refused=(site_text(metrics[REFUSED]) or "no reason given") if REFUSED in metrics else None,
    )


def check_request(trainer: SiteTrainer, parameters: list[np.ndarray], config: dict[str, Any]) -> str | None:
    """Why this site declines what the server asks, or None: a site is bound by its own config, not by the server.

    The server must ask for exactly the site's own ``federated.local_steps`` (the configs disagree
    otherwise, and a hostile server could ask for 10^9), a step offset within the site's schedule,
    a finite proximal weight in ``[0, max(MAX_PROXIMAL_MU, the site's own)]``, and send a global
    state the site could hold: its shapes, finite float32 values no larger than 1e6."""
    fed = trainer.cfg.federated
    if config.get(FINGERPRINT) != trainer.fingerprint:
        return "its base differs from the server's"
    steps, offset, mu = config.get("local_steps"), config.get("step_offset"), config.get("proximal_mu", 0.0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps != fed.local_steps:
        return f"the server asked for {site_text(steps, 40)} local steps; this site's federated.local_steps is {fed.local_steps}"
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= fed.total_steps - fed.local_steps:
        return f"the server's step offset {site_text(offset, 40)} is outside this site's schedule (0 to {fed.total_steps - fed.local_steps})"
    bound = max(MAX_PROXIMAL_MU, fed.proximal_mu)
    if not isinstance(mu, int | float) or isinstance(mu, bool) or not math.isfinite(mu) or not 0 <= mu <= bound:
        return f"the server's proximal_mu {site_text(mu, 40)} is not a number in [0, {bound:g}]"
    shapes = [tuple(v.shape) for v in (trainer.module.state_dict()[k] for k in trainer.names)]
    reason = check_tensors(parameters, shapes)
    return f"the server's global state: {reason}" if reason else None


def make_client(trainer: SiteTrainer, store: dict[str, torch.Tensor] | None = None) -> Any:
    """A Flower client for one site: checks what the server asks (`check_request`), trains one round locally, replies with tensors only.

    ``store`` keeps the site's teacher between rounds when Flower rebuilds the client each round.
    """
    require_flower()
    from flwr.client import NumPyClient

    class InsituSite(NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return get_arrays(trainer.module, trainer.names)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            reason = check_request(trainer, parameters, config)
            if reason is not None:
                log.error("declining the server's round, not training: %s", reason)
                return [], 0, {FINGERPRINT: trainer.fingerprint, REFUSED: reason}
            if store:
                trainer.load_local_state(store)
            steps = trainer.cfg.federated.local_steps  # the site's own, which the server's request equals
            arrays, loss = trainer.train_round(parameters, int(config["step_offset"]), steps, float(config.get("proximal_mu", 0.0)))
            if store is not None:
                store.clear()
                store.update(trainer.local_state())
            metrics: dict[str, Any] = {FINGERPRINT: trainer.fingerprint}
            if loss is not None:
                metrics[LOSS] = loss
            return arrays, trainer.items, metrics

    return InsituSite()


# ---- simulation -------------------------------------------------------------------------------

_SITES: dict[int, SiteTrainer] = {}  # per worker process: each simulated site's data and module, built once


class SiteFactory:
    """Flower's ``client_fn`` for a simulation: builds a site once per worker process and reuses it.

    A class defined at module level, so that pickling it to a worker carries only the plan: the
    cache ``_SITES`` stays the worker's own module global and survives between rounds (a closure
    would be pickled by value, cache included, and every round would rebuild every site).
    """

    def __init__(self, plan: list[tuple[RunConfig, tuple[int, int] | None]], threads: int) -> None:
        self.plan, self.threads = plan, threads

    def __call__(self, context: Any) -> Any:
        index = int(context.node_config["partition-id"])
        torch.set_num_threads(self.threads)
        if index not in _SITES:
            log.info("simulated site %d: building its data and module in this worker", index + 1)
            _SITES[index] = SiteTrainer(*self.plan[index])
        # Flower may run a site in another worker later; its teacher lives in the site's context between rounds
        return make_client(_SITES[index], _context_store(context)).to_client()


def site_configs(cfg: RunConfig, sites: int | None) -> list[tuple[RunConfig, tuple[int, int] | None]]:
    """One (config, shard) per simulated site: the listed ``federated.sites``, or ``sites`` shards of ``data``."""
    listed = cfg.federated.sites
    if listed:
        if sites is not None and sites != len(listed):
            raise ValueError(f"--sites {sites} but the config lists {len(listed)} sites under federated.sites")
        return [(cfg.model_copy(update={"data": d, "seed": cfg.seed + 1000 * (i + 1)}), None) for i, d in enumerate(listed)]
    n = sites or 2
    return [(cfg.model_copy(update={"seed": cfg.seed + 1000 * (i + 1)}), (i, n)) for i in range(n)]


def simulate(cfg: RunConfig, state: FederationState, sites: int | None = None) -> FederationState:
    """Run the federation from ``state`` on Flower's simulation engine, one virtual site per entry of `site_configs`."""
    require_flower(cfg.federated.telemetry)  # before Ray starts: its workers inherit the telemetry switch
    from flwr.clientapp import ClientApp
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    plan = site_configs(cfg, sites)
    strategy = make_strategy(cfg, state, expected_sites=len(plan))
    fed = cfg.federated
    threads = fed.site_threads

    def server_fn(context: Any) -> Any:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.round_timeout_s))

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # as many workers as the CPUs hold (a site that lands in another worker is rebuilt there, its teacher from the context)
    cpus = max(threads, min(len(plan) * threads, os.cpu_count() or 1))
    init = {"include_dashboard": False, "log_to_driver": False, "num_cpus": cpus}
    backend = {"client_resources": {"num_cpus": threads, "num_gpus": 0.0}, "init_args": init}
    _SITES.clear()  # an in-process worker must not reuse sites of an earlier simulation
    client_app = ClientApp(client_fn=SiteFactory(plan, threads))
    run_simulation(ServerApp(server_fn=server_fn), client_app, num_supernodes=len(plan), backend_config=backend)
    if len(state.rounds) < fed.rounds:
        raise RuntimeError(f"the simulation stopped after {len(state.rounds)} of {fed.rounds} rounds (see the log above)")
    return state


def _context_store(context: Any) -> dict[str, torch.Tensor]:
    """A dict view of the site's persistent Flower context state (its teacher between rounds)."""
    require_flower()
    from flwr.common import ArrayRecord

    class Store(dict):
        def update(self, other: dict[str, torch.Tensor]) -> None:  # type: ignore[override]
            super().update(other)
            context.state["insitu.local"] = ArrayRecord({k: v.contiguous() for k, v in self.items()})

    store = Store()
    if "insitu.local" in context.state:
        dict.update(store, context.state["insitu.local"].to_torch_state_dict())
    return store
