"""``insitu federate``: run a federation and write what the server may keep.

The server's run folder (``out_dir/name``) gets the global adapter package after the last round
(``adapter/``, no normaliser: each site fits its own), ``rounds.csv`` / ``rounds.json`` (sites
averaged and dropped with the reason, items, mean loss, bytes per site, wall time per round) and
``summary.json``. Nothing a site holds (paths, item ids, names) is written: the stored config has
``data`` and ``federated.sites`` removed and every remaining path redacted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.adapters.package import save_package
from insitu.config import RunConfig
from insitu.errors import ConfigError
from insitu.federated import security
from insitu.federated.flower import (
    FederationState,
    RoundRecord,
    initial_state,
    make_client,
    make_strategy,
    message_limit,
    require_flower,
    simulate,
)
from insitu.federated.site import SiteTrainer, get_arrays, set_arrays
from insitu.io import atomic_write_text, claim_folder, csv_text, write_json
from insitu.pipelines.preprocess import backbone_preprocessing
from insitu.pipelines.pretrain import PretrainModule

log = logging.getLogger("insitu")


@dataclass
class FederationResult:
    run_dir: Path
    adapter_dir: Path
    state: FederationState
    summary: dict[str, Any]


def load_federation_config(path: Path, overrides: list[str], role: str) -> RunConfig:
    """A run config with a ``federated`` section. The server reads no data, so its copy may omit ``data``."""
    from insitu.config import read_yaml, validate_config
    from insitu.raw_config import config_overrides

    raw = config_overrides(read_yaml(Path(path)), overrides)
    sites = (raw.get("federated") or {}).get("sites") or []
    if "data" not in raw and role != "site":
        raw["data"] = sites[0] if sites else {"root": "."}
    cfg = validate_config(raw, str(path), check_paths=role != "server")
    if cfg.federated is None:
        raise ConfigError(f"{path} has no federated section; add one (rounds, local_steps, ...; see docs/federated.md).")
    return cfg


def run_simulation(cfg: RunConfig, sites: int | None = None, overwrite: bool = False) -> FederationResult:
    """``insitu federate simulate``: all sites on this machine, on Flower's simulation engine."""
    folder = claim_folder(cfg.run_dir, "federate", overwrite, lock=True)
    try:
        state, module = initial_state(cfg)
        simulate(cfg, state, sites)
        return write_outputs(cfg, state, module, mode="simulation")
    finally:
        folder.record()
        folder.unlock()


def run_server(cfg: RunConfig, overwrite: bool = False) -> FederationResult:
    """``insitu federate server``: listen on ``federated.address`` and run the rounds (Flower gRPC)."""
    require_flower()
    from flwr.server import ServerConfig, start_server

    folder = claim_folder(cfg.run_dir, "federate", overwrite, lock=True)
    try:
        fed = cfg.federated
        security.check_role(fed, "server")
        certificates, trusted = security.server_certificates(fed), security.load_site_keys(fed)  # refused here, before any round
        state, module = initial_state(cfg)
        strategy = make_strategy(cfg, state)
        start_server(
            server_address=fed.address,
            config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.round_timeout_s),
            # with trusted keys, only peers that prove one are ever sent the global tensors (security.Admission)
            strategy=strategy if trusted is None else security.authenticated_strategy(strategy, state, trusted, fed.min_sites, fed.round_timeout_s),
            certificates=certificates,
            grpc_max_message_length=message_limit(state.arrays),  # the real payload, not Flower's 2 GiB
        )
        return write_outputs(cfg, state, module, mode="server")
    finally:
        folder.record()
        folder.unlock()


def run_site(cfg: RunConfig) -> int:
    """``insitu federate site``: train this site's data in every round the server runs; returns the item count."""
    require_flower()
    from flwr.client import start_client

    fed = cfg.federated
    security.check_role(fed, "site")
    root, key = security.root_certificate(fed), security.load_site_key(fed)  # refused here, before the data are read
    trainer = SiteTrainer(cfg)
    client = make_client(trainer) if key is None else security.signed_site(make_client(trainer), key)
    log.info("site ready: %d items (%d quarantined); connecting to %s", trainer.items, trainer.quarantined, fed.address)
    log.info("channel: %s; replies %s", "TLS" if root else "plaintext", "signed" if key else "unsigned")
    try:
        start_client(
            server_address=fed.address,
            client=client.to_client(),
            root_certificates=root,
            insecure=root is None,
            grpc_max_message_length=message_limit(get_arrays(trainer.module, trainer.names)),
        )
    except Exception as exc:  # grpc.RpcError; a failed TLS handshake is a config fault, said plainly instead of a traceback
        details = str(getattr(exc, "details", lambda: "")() or "").lower()
        if root is None or not ("handshake" in details or "certificate" in details):
            raise
        raise ConfigError(
            f"the TLS handshake with the federation server at {fed.address} failed: federated.tls.ca_cert must be the CA that "
            "signed the server's certificate, and that certificate must name the host in federated.address "
            f"(see {security.DOCS})."
        ) from None
    return trainer.items


def write_outputs(cfg: RunConfig, state: FederationState, module: PretrainModule, mode: str) -> FederationResult:
    """The global package (``module`` with the final tensors loaded), the round records and the summary."""
    run_dir = cfg.run_dir
    set_arrays(module, state.names, state.arrays)
    fed = cfg.federated
    summary = {
        "mode": mode,
        "rounds": len(state.rounds),
        "local_steps": fed.local_steps,
        "aggregation": fed.aggregation,
        "proximal_mu": fed.proximal_mu,
        "steps_per_site": len(state.rounds) * fed.local_steps,
        "items_last_round": state.rounds[-1].items if state.rounds else 0,
        "shared_bytes_per_site_per_round": state.shared_bytes,
        "full_model_bytes": state.full_model_bytes,
        "wall_s_per_round": [r.wall_s for r in state.rounds],
        "seed": cfg.seed,
    }
    stored = cfg.model_dump(mode="json", exclude={"data": True, "federated": {"sites", "tls", "site_key", "site_keys"}, "probe": True})
    adapter_dir = save_package(
        run_dir / "adapter",
        module.backbone,
        module.student,
        head_state=module.objective.head_state(),
        # the contract without a normaliser: each site fitted its own, so users fit one on their data (the preprocess rule)
        input_info=backbone_preprocessing(cfg.backbone, cfg.data.image_size).input_section(),
        normalizer=None,
        objective={"name": cfg.objective.name, "options": cfg.objective.options},
        training={"federated": summary, "steps": summary["steps_per_site"], "seed": cfg.seed},
        config=stored,
    )
    write_json(run_dir / "rounds.json", state.summary())
    atomic_write_text(run_dir / "rounds.csv", _rounds_csv(state))
    write_json(run_dir / "summary.json", summary)
    return FederationResult(run_dir, adapter_dir, state, summary)


def _rounds_csv(state: FederationState) -> str:
    header = ["round", "sites_averaged", "sites_dropped", "drop_reasons", "weight_clips", "items", "mean_loss", "bytes_per_site", "wall_s"]
    return csv_text(header, [_round_row(r) for r in state.rounds])


def _round_row(r: RoundRecord) -> list[Any]:
    reasons = "; ".join(f"{k}: {v}" for k, v in r.dropped.items())
    clips = "; ".join(f"{k}: {v}" for k, v in r.clipped.items())
    return [r.round, len(r.accepted), len(r.dropped), reasons, clips, r.items, r.mean_loss, r.bytes_per_site, r.wall_s]


__all__ = ["FederationResult", "run_server", "run_simulation", "run_site", "write_outputs"]
