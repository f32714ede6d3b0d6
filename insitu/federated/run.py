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
from insitu.federated.flower import FederationState, RoundRecord, initial_state, make_client, make_strategy, require_flower, simulate
from insitu.federated.site import SiteTrainer, set_arrays
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
        state, module = initial_state(cfg)
        start_server(
            server_address=fed.address,
            config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.round_timeout_s),
            strategy=make_strategy(cfg, state),
        )
        return write_outputs(cfg, state, module, mode="server")
    finally:
        folder.record()
        folder.unlock()


def run_site(cfg: RunConfig) -> int:
    """``insitu federate site``: train this site's data in every round the server runs; returns the item count."""
    require_flower()
    from flwr.client import start_client

    trainer = SiteTrainer(cfg)
    log.info("site ready: %d items (%d quarantined); connecting to %s", trainer.items, trainer.quarantined, cfg.federated.address)
    start_client(server_address=cfg.federated.address, client=make_client(trainer).to_client(), insecure=True)
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
    stored = cfg.model_dump(mode="json", exclude={"data": True, "federated": {"sites"}, "probe": True})
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
