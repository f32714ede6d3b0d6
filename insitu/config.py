"""The typed config schema (one place), YAML loading, dotted overrides, validation.

A config is data: it is validated once, here, and the resolved result is written next to every
run and into every adapter package. Relative paths are resolved against the current directory.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from insitu.errors import ConfigError
from insitu.privacy import redact_config
from insitu.raw_config import config_overrides, upgrade_config
from insitu.registry import (
    ADAPTERS,
    CLASSIFICATION_HEADS,
    DOMAINS,
    OBJECTIVES,
    SEGMENTATION_HEADS,
    Needs,
    Registry,
    closest_field,
    config_error,
    join_and,
    option_bound_problems,
    unknown_name_message,
)
from insitu.registry import validate_options as validate_options  # re-exported: the CLI checks a lone section with it
from insitu.weights import PACKAGED, shipped_card

MAX_STEPS = 10**8  # a step count past this is a typo (1e30), not a plan
MAX_ACCUMULATE = 4096


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where the data lives and how a domain reads it."""

    domain: str = "images"
    root: Path
    options: dict[str, Any] = Field(default_factory=dict)
    image_size: int = Field(64, gt=0)
    max_items: int | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)


class BackboneConfig(Strict):
    """A frozen ViT: a timm name, optional local weights, channels and size."""

    name: str = "vit_tiny_patch16_224"
    weights: str | None = None
    pretrained: bool = False
    in_chans: int = Field(3, gt=0)
    img_size: int = Field(64, gt=0)
    patch_size: int | None = Field(None, gt=0)
    init_seed: int = 0
    channel_init: Literal["mean", "repeat", "rgb_map", "rgb_nearest"] = "mean"
    bands: list[str] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ComponentConfig(Strict):
    """Every component section's one shape: a registered ``name`` and its ``options``, checked by that component's
    typed ``Options`` (insitu.registry) when the config is validated, and stored completed with its defaults."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class AdapterConfig(ComponentConfig):
    """The adapters: ``bottleneck``, ``sequential`` or ``lora`` (insitu.adapters); ``options.blocks`` says which blocks."""

    name: str = "bottleneck"


class ObjectiveConfig(ComponentConfig):
    """The SSL objective (insitu.objectives); a wrapping objective checks ``options.base_options`` by its ``options.base``."""

    name: str = "dino"


class HeadConfig(ComponentConfig):
    """A downstream head of the task (insitu.heads): ``linear``/``mlp`` (classification), ``linear``/``fpn``/``upernet``
    (segmentation). The blocks a segmentation head reads are ``downstream.layers``, not a head option."""

    name: str = "linear"


class TrainConfig(Strict):
    """Optimisation: steps, batch, lr, EMA, checkpoints, non-finite policy; levers ``compile`` (the objective's forward
    through torch.compile) and ``fused_optimizer`` (fused AdamW), measured by benchmarks/bench_train.py --levers."""

    max_steps: int = Field(100, gt=0, le=MAX_STEPS, strict=True)
    batch_size: int = Field(32, gt=0, le=1_000_000, strict=True)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)  # where the cosine after the warm-up ends (the fractal base: 1e-5)
    weight_decay: float = Field(0.04, ge=0)
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS, strict=True)
    # the teacher's base EMA momentum; None derives it from the run length (half-life = ema_half_life * max_steps)
    ema_momentum: float | None = Field(None, ge=0, le=1)
    ema_half_life: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(3.0, gt=0)
    accumulate_grad_batches: int = Field(1, gt=0, le=MAX_ACCUMULATE, strict=True)
    checkpoint_every: int = Field(50, gt=0, le=MAX_STEPS, strict=True)
    log_every: int = Field(5, gt=0, le=MAX_STEPS, strict=True)
    nonfinite: Literal["stop", "skip"] = "stop"
    # with nonfinite: skip, the run fails once more than this share of its batches (at least 10 counted) were skipped
    max_skipped_fraction: float = Field(0.1, ge=0, le=1)
    full_finetune: bool = False  # train every backbone weight too (a baseline; the teacher gets an EMA backbone copy)
    # K > 0: cache the frozen prefix's output for K pre-drawn views per image and view position (short runs on small
    # data; needs adapters after block 0 and an objective that does not change pixels in a step; insitu.pipelines.view_cache)
    cached_views: int = Field(0, ge=0, le=64, strict=True)
    compile: Literal["none", "default", "max-autotune"] = "none"
    fused_optimizer: bool = False

    @field_validator("max_steps", "batch_size", "warmup_steps", "accumulate_grad_batches", "checkpoint_every", "log_every", mode="before")
    @classmethod
    def _whole_number(cls, value: Any, info: Any) -> Any:
        """Counts are whole numbers in range: ``true``, ``2.5`` and ``1e30`` are refused with the limit."""
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        limit = next((m.le for m in cls.model_fields[info.field_name].metadata if hasattr(m, "le")), None)
        raise ValueError(f"must be a whole number{f' <= {limit:,}' if limit else ''}, not {type(value).__name__} {value!r}")


class HealthConfig(Strict):
    """Label-free training health (``health/...`` metrics) and the collapse guard.

    The guard acts when, for ``window`` optimizer steps (at most a third of the run), the teacher's
    entropy stays above ``max_entropy_ratio`` × ln K (uniform targets), its batch-marginal entropy
    below ``min_marginal_entropy_ratio`` × ln K (one-prototype collapse), the centred RankMe of the
    monitor's fixed set of ``rank_items`` items below ``min_rank_fraction`` of its start
    (dimensional collapse), or the objective's ``embedding_spread`` below ``min_spread_fraction`` of
    its start (head/projector collapse): ``warn`` logs a warning and puts it in the report, ``stop``
    also ends the run, ``off`` only records metrics (docs/objectives.md, "Training health").
    """

    enabled: bool = True
    batch_size: int = Field(32, gt=1)
    rank_items: int = Field(256, gt=1)
    guard: Literal["warn", "stop", "off"] = "warn"
    max_entropy_ratio: float = Field(0.95, gt=0, le=1)
    min_marginal_entropy_ratio: float = Field(0.1, ge=0, le=1)
    min_rank_fraction: float = Field(0.5, ge=0, le=1)
    min_spread_fraction: float = Field(0.5, ge=0, le=1)
    window: int = Field(50, gt=0)


class TrainerConfig(Strict):
    """Passed through to `lightning.Trainer` (DDP/FSDP, devices, precision come from Lightning)."""

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, gt=0)
    precision: str = "auto"

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        """What Lightning accepts: a count (-1: all), ``auto``, or device indices like ``0,1``."""
        if isinstance(value, bool):
            raise ValueError("must be a device count, -1 (all), 'auto' or indices like '0,1', not true/false")
        if isinstance(value, int):
            if value == 0 or value < -1:
                raise ValueError("must be a device count >= 1, or -1 for all devices")
            return value
        text = value.strip()
        if text in ("auto", "-1") or re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text):
            return text
        raise ValueError("must be a device count (2), -1 or 'auto' (all devices), or device indices ('0,1')")


class DenseProbeConfig(Strict):
    """A linear 1×1 head on frozen patch tokens, scored by mIoU and foreground Dice.

    ``data`` yields items with masks: ``images`` with ``options.masks`` (a mask folder mirroring
    the image folder, e.g. BUSI), or ``video`` with Kvasir-style ``images/`` + ``masks/``. Without
    ``test`` it is evaluated on the same repeated group folds as the classification probes.
    """

    data: DataConfig
    test: DataConfig | None = None
    num_classes: int = Field(2, ge=2)
    steps: int = Field(2000, gt=0)  # the cap; the head stops earlier once its loss plateaus (insitu.pipelines.probe_dense)
    tolerance: float = Field(1e-3, ge=0)  # relative change of the window-mean loss that counts as a plateau; 0: run exactly `steps`
    window: int = Field(25, gt=0)
    class_weight: Literal["sqrt", "balanced", "none"] = "sqrt"  # per-class loss weights: 1/sqrt(frequency), inverse frequency, none
    lr: float = Field(0.05, gt=0)
    ignore_index: int = 255


class ProbeConfig(Strict):
    """Frozen-feature evaluation: linear probe and kNN (and an optional dense probe), repeated.

    Without ``test``, the labelled set is cut into ``folds`` stratified, group-disjoint folds,
    ``repeats`` times (seeds ``seed``, ``seed``+1, ...); with ``test``, the fixed split is scored
    ``repeats`` times (only the label subsets change), unless ``pool_test`` folds train ∪ test. Each ``label_fractions`` entry below 1 trains
    on that stratified share of the training labels (at least one per class), the same items for
    every model. adapted − frozen gets a paired percentile bootstrap CI with ``bootstrap`` resamples.
    ``knn_features``: kNN on features standardised by each evaluation's training items, or raw.
    ``label_free_baseline``: add "frozen + PCA whitening" (no labels, no training) as a reference.
    ``primary``: the pre-registered endpoint ``<probe>@<labels>[:<metric>]`` that alone decides the
    verdict (None: linear at the largest label fraction); every other row is Holm-adjusted.
    ``transductive``: the probe may test on images pretraining saw (copied to every result row).
    """

    train: DataConfig | None = None
    test: DataConfig | None = None
    test_fraction: float = Field(0.3, gt=0, lt=1)
    knn_k: int = Field(20, gt=0)
    features: Literal["cls", "mean", "cls+mean"] = "cls+mean"
    batch_size: int = Field(64, gt=0)
    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    label_fractions: list[float] = Field(default_factory=lambda: [1.0, 0.1, 0.01])
    bootstrap: int = Field(2000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    pool_test: bool = False
    group_near_duplicates: bool = False
    shortcut_check: bool = True  # trivial statistics (size, aspect, intensity) on the same folds; a row when above chance
    dense: DenseProbeConfig | None = None
    knn_features: Literal["standardised", "raw"] = "standardised"
    label_free_baseline: Literal["whitened", "none"] = "whitened"
    primary: str | None = None
    transductive: bool = False
    split_seed: int = Field(0, ge=0)  # seeds the inductive hold-out (the same for every training seed; insitu.pipelines.holdout)

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError("label fractions must be in (0, 1], e.g. [1.0, 0.1, 0.01]")
        return sorted(set(value), reverse=True)

    @model_validator(mode="after")
    def _primary_known(self) -> ProbeConfig:
        self.primary_endpoint()  # raises ValueError naming probe.primary
        return self

    def primary_endpoint(self) -> tuple[str, float, str]:
        """(probe, label share, metric) of ``primary``: ``<probe>@<labels>[:<metric>]``; None: linear at the largest share."""
        if self.primary is None:
            return "linear", max(self.label_fractions), "accuracy"
        fix = "write probe.primary as <probe>@<labels>[:<metric>], e.g. linear@1.0, knn@0.1 or dense@1.0:mIoU"
        probe, _, rest = self.primary.partition("@")
        labels, _, metric = rest.partition(":")
        metrics = {"linear": ("accuracy",), "knn": ("accuracy",), "dense": ("mIoU", "dice")}
        if probe not in metrics:
            raise ValueError(f"probe.primary {self.primary!r}: the probe must be linear, knn or dense; {fix}")
        try:
            share = float(labels)
        except ValueError:
            raise ValueError(f"probe.primary {self.primary!r}: {labels!r} is not a label share; {fix}") from None
        allowed = [1.0] if probe == "dense" else self.label_fractions
        if share not in allowed:
            raise ValueError(f"probe.primary {self.primary!r}: labels must be one of {allowed} (probe.label_fractions; dense: 1.0); {fix}")
        metric = metric or metrics[probe][0]
        if metric not in metrics[probe]:
            raise ValueError(f"probe.primary {self.primary!r}: the {probe} probe reports {', '.join(metrics[probe])}, not {metric!r}; {fix}")
        if probe == "dense" and self.dense is None:
            raise ValueError(f"probe.primary {self.primary!r} needs probe.dense (the dense probe's data); set it or pick linear/knn")
        return probe, share, metric

    def primary_name(self) -> str:
        """The resolved primary endpoint as written in probe.json: ``<probe>@<labels>:<metric>``."""
        probe, share, metric = self.primary_endpoint()
        return f"{probe}@{share}:{metric}"


class DownstreamConfig(Strict):
    """A downstream task on backbone features (never the SSL projection head): head, mode, training.

    ``task``: ``classification``, ``multilabel`` or ``segmentation``. ``head``: ``{name, options}``, ``linear``/``mlp``
    (classification), ``linear``/``fpn``/``upernet`` (segmentation). ``mode``: ``head`` trains the
    head only (backbone and adapters frozen), ``adapters`` trains adapters and head (fresh
    zero-initialised adapters from the ``adapter`` section when no package is given). The labelled
    data comes from ``probe.train``/``probe.test`` (or a group split of ``data``); ``val_fraction``
    of the training groups validate every ``val_every`` steps (the best weights on them are kept; ``early_stopping``:
    stop after that many validations without a gain). ``augment``: an albumentations preset (insitu.pipelines.downstream_aug).
    """

    task: Literal["classification", "multilabel", "segmentation"] = "classification"
    head: HeadConfig = Field(default_factory=HeadConfig)
    mode: Literal["head", "adapters"] = "head"
    steps: int = Field(200, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, gt=0)
    layers: int = Field(4, gt=0)
    num_classes: int | None = Field(None, gt=0)
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    ignore_index: int = 255
    seeds: list[int] = Field(default_factory=lambda: [0])
    shots: list[int] = Field(default_factory=lambda: [1, 5, 10])
    augment: str = "none"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_every: int = Field(50, gt=0)
    early_stopping: int | None = Field(None, gt=0)
    checkpoint_every: int | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)


HEAD_INPUTS = {"levels": "downstream.layers"}  # head Options fields the run sets (from the key named), never written in head.options


class TrustConfig(Strict):
    """Which adapter packages a run accepts (insitu.sharing.signing; docs/sharing.md).

    ``keys``: a folder of trusted public keys (``*.pub``); every package must then carry a valid
    signature by one of them (unsigned ones are refused). ``require_signature``: says so explicitly.
    """

    keys: Path | None = None
    require_signature: bool = False

    @model_validator(mode="after")
    def _keys_needed(self) -> TrustConfig:
        if self.require_signature and self.keys is None:
            raise ValueError("require_signature needs keys: a folder of trusted public keys (*.pub)")
        return self


# ---- federation addresses: pure rules shared by the config check and insitu.federated.security


def address_host(address: str) -> str:
    """The host part of ``host:port`` (``[v6]:port`` too)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """True when ``address`` names this machine only (127.0.0.0/8, ::1, localhost): nothing else can reach it."""
    host = address_host(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or 0.0.0.0 / [::] (every interface)


def insecure_message(address: str) -> str:
    return (
        f"federated.address {address} is not a loopback address, so the federation must be authenticated: set federated.tls "
        "(ca_cert; the server also server_cert and server_key), federated.site_keys on the server and federated.site_key at "
        f"each site (how to make them: docs/federated.md, 'Security: TLS and site keys'), or federated.insecure: true for a lab test on a network you trust."
    )



class FederatedTLS(Strict):
    """PEM files for the federation's TLS channel (insitu.federated.security; docs/federated.md, "Security: TLS and site keys").

    ``ca_cert`` signs the server's certificate: a site trusts it, the server sends it along. The
    server also needs ``server_cert`` (its names must include the host the sites connect to) and
    ``server_key``; a site's copy of the config needs only ``ca_cert``.
    """

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> FederatedTLS:
        if (self.server_cert is None) != (self.server_key is None):
            raise ValueError("server_cert and server_key go together: set both on the server, neither at a site")
        return self


class FederatedConfig(Strict):
    """Federated continual pretraining across sites (``insitu federate``; insitu.federated).

    Each round, every site trains the shared adapters and objective heads for ``local_steps`` on
    its own data and sends back only those tensors; the server averages them weighted by each
    site's item count (``fedavg``; a claim is clipped to ``max_site_items`` and no site's weight
    exceeds ``max_site_share``, or ``1 / sites`` when that is larger; ``weighting: equal`` ignores
    the counts), or sites add FedProx's proximal term ``proximal_mu / 2 *
    ||w - w_global||^2`` to their loss (``fedprox``, for sites whose data differ), or the server
    uses one of Flower's robust rules (``trimmed_mean``, ``median``, ``krum``); ``max_update_norm``
    clips each reply's distance to the global state first (unset: with 3 or more replies, to
    ``update_norm_factor`` × the round's median update norm). Flower's telemetry is off unless
    ``telemetry: true``. The run's lr,
    warm-up and EMA schedules span ``rounds * local_steps`` steps (``train.max_steps`` is ignored).
    ``sites`` lists each site's data for ``insitu federate simulate``; a real site uses the
    top-level ``data`` of its own copy of the config, and the server never reads data.
    """

    rounds: int = Field(5, gt=0, le=100_000, strict=True)
    local_steps: int = Field(10, gt=0, le=MAX_STEPS, strict=True)
    aggregation: Literal["fedavg", "fedprox", "trimmed_mean", "median", "krum"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0)
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # trimmed_mean: the share cut from each end, per coordinate
    krum_malicious: int = Field(1, ge=0, strict=True)  # krum: the malicious sites it must tolerate (needs 2f + 3 sites)
    krum_keep: int = Field(0, ge=0, strict=True)  # krum: 0 picks one reply; m > 0 averages the m best (Multi-Krum)
    max_update_norm: float | None = Field(None, gt=0)  # clip each reply's L2 distance to the global state (None: off)
    # without max_update_norm, with 3+ replies: clip each to this x the round's median update norm (None: off)
    update_norm_factor: float | None = Field(3.0, gt=1)
    # a site's item count is an unverifiable claim: it is clipped, and no site outweighs the others past a share
    weighting: Literal["items", "equal"] = "items"
    max_site_items: int = Field(1_000_000, gt=0, strict=True)  # a larger claim counts as this many items
    max_site_share: float = Field(0.5, gt=0, le=1)  # the largest weight one site can have (or 1 / sites when larger)
    min_sites: int = Field(1, gt=0, strict=True)  # a round waits for this many sites and fails below it
    address: str = "127.0.0.1:8080"  # the server's host:port (server listens on it, sites connect to it)
    round_timeout_s: float | None = Field(600.0, gt=0)  # a site slower than this is dropped from the round (null: wait forever)
    telemetry: bool = Field(False, strict=True)  # true: let Flower (and Ray) send their usage statistics
    site_threads: int = Field(1, gt=0, le=256, strict=True)  # torch threads per simulated site
    sites: list[DataConfig] = Field(default_factory=list)
    # who may take part (insitu.federated.security): required off loopback for `federate server`/`site` unless insecure
    tls: FederatedTLS | None = None  # the gRPC channel's certificates
    site_key: Path | None = None  # a site's Ed25519 private key (`insitu adapter keygen`): it signs every reply
    site_keys: Path | None = None  # the server's folder of trusted site public keys (<site>.pub): other replies are dropped
    insecure: bool = Field(False, strict=True)  # true: allow no TLS and unsigned sites off loopback (a lab test only)

    @model_validator(mode="after")
    def _authenticated_off_loopback(self) -> FederatedConfig:
        if self.tls is None and not self.insecure and not is_loopback(self.address):
            raise ValueError(insecure_message(self.address))
        return self

    @model_validator(mode="after")
    def _prox(self) -> FederatedConfig:
        if self.aggregation == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("aggregation fedprox needs proximal_mu > 0 (0.001-0.1 is the usual range)")
        return self

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps


class RunConfig(Strict):
    """A whole run: data, backbone, adapters, objective, training, probe."""

    name: str = "run"
    seed: int = 0
    out_dir: Path = Path("insitu-runs")
    data: DataConfig
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    downstream: DownstreamConfig | None = None
    federated: FederatedConfig | None = None
    trust: TrustConfig = Field(default_factory=TrustConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or value in (".", "..") or Path(value).name != value or "\\" in value:
            raise ValueError("must be a plain folder name (no '/', '\\' or '..'): the run folder is out_dir/name")
        return value

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.name


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None, check_paths: bool = True) -> RunConfig:
    """Load a YAML file (or a dict), apply `key.sub=value` overrides, validate everything once."""
    where = str(source) if not isinstance(source, dict) else "<dict>"
    raw = read_yaml(Path(source)) if not isinstance(source, dict) else copy.deepcopy(source)  # overrides leave the caller's dict as it was
    return validate_config(config_overrides(raw, overrides or []), where, check_paths=check_paths)


def validate_config(raw: dict[str, Any], where: str = "<dict>", check_paths: bool = True) -> RunConfig:
    """``raw`` (old flat component shapes upgraded first) validated once: schema, each component's options, declared needs, paths."""
    raw = upgrade_config(raw)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, where, lambda loc: closest_field(RunConfig, loc)) from None  # options: `component_options`
    _validate_component_options(cfg, where)
    check_needs(cfg, where)
    if check_paths:
        _check_paths(cfg, where)
    return cfg


def dump_config(cfg: RunConfig, path: Path, redact: bool = False) -> None:
    """Write the resolved config as YAML (it can be fed back to `load_config`); with ``redact``, every local path
    is ``<local path>`` (`insitu.privacy.redact_config`: a private run's folder) and it cannot be fed back."""
    data = cfg.model_dump(mode="json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(redact_config(data) if redact else data, sort_keys=False))


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass an existing YAML file with -c.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections (data:, backbone:, ...).")
    return data


def _validate_component_options(cfg: RunConfig, where: str) -> None:
    sections: list[tuple[str, DataConfig]] = [("data", cfg.data)]
    sections += [(f"probe.{k}", d) for k, d in (("train", cfg.probe.train), ("test", cfg.probe.test)) if d]
    if cfg.probe.dense is not None:
        sections += [(f"probe.dense.{k}", d) for k, d in (("data", cfg.probe.dense.data), ("test", cfg.probe.dense.test)) if d]
    sections += [(f"federated.sites[{i}]", d) for i, d in enumerate(cfg.federated.sites if cfg.federated else [])]
    for prefix, data in sections:
        data.options = component_options(DOMAINS, data.domain, data.options, f"{prefix}.options", where, f"{prefix}.domain")
    cfg.adapter.options = component_options(ADAPTERS, cfg.adapter.name, cfg.adapter.options, "adapter.options", where, skip=("kind",))
    cfg.objective.options = _objective_options(cfg.objective.name, cfg.objective.options, "objective.options", where)
    if cfg.downstream is not None:
        head, registry = cfg.downstream.head, SEGMENTATION_HEADS if cfg.downstream.task == "segmentation" else CLASSIFICATION_HEADS
        head.options = component_options(registry, head.name, head.options, "downstream.head.options", where, skip=tuple(HEAD_INPUTS))


def component_options(
    registry: Registry[Any], name: str, options: dict[str, Any], prefix: str, where: str, name_key: str = "", skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``options`` of component ``name`` checked by its typed ``Options`` and returned completed with defaults.

    An unknown name, or a key the component does not take, is a `ConfigError` naming the component and the key with the
    closest key it does take (or the components that take it). ``skip``: fields of the ``Options`` that are not written
    in a config (an adapter's ``kind`` is the section's ``name``; a head's ``levels`` is ``downstream.layers``).
    """
    name_key = name_key or prefix.removesuffix(".options") + ".name"
    if name not in registry:
        raise ConfigError(f"Invalid config {where}: '{name_key}': " + unknown_name_message(registry.kind, name, registry.names()))
    model, component = registry.options(name), f"{registry.kind} {name!r}"
    takes = [k for k in model.model_fields if k not in skip]
    for key in skip:
        if key in options:
            set_by = HEAD_INPUTS.get(key, name_key)
            raise ConfigError(f"Invalid config {where}: '{prefix}.{key}': {component} has it from {set_by}; set {set_by} instead.")
    try:
        result = model.model_validate(options)
    except ValidationError as exc:

        def hint(loc: tuple[Any, ...]) -> str:
            owners = [n for n in registry.names() if n != name and len(loc) == 1 and str(loc[0]) in registry.options(n).model_fields]
            near = f": an option of {registry.kind} {join_and(owners)}, not of {name!r}" if owners else ""
            return (near or closest_field(model, loc, prefix)) + f" ({component} takes {', '.join(takes) or 'no options'})"

        raise config_error(exc, where, hint, prefix) from None
    problems = option_bound_problems(result, prefix)
    if problems:
        raise ConfigError("\n".join([f"Invalid config {where}: {component}:", *problems]))
    return result.model_dump(mode="json", exclude=set(skip))


MAX_WRAPPED = 4  # sigreg over self_distill over glare is three; deeper is a loop (a YAML alias), not a recipe


def _objective_options(name: str, options: dict[str, Any], prefix: str, where: str, depth: int = 0) -> dict[str, Any]:
    """An objective's options validated by its ``Options``, and a wrapped objective's (``base``, ``base_options``) by the base's."""
    model = OBJECTIVES.options(name)
    out = component_options(OBJECTIVES, name, options, prefix, where)
    if "base" in model.model_fields and "base_options" in model.model_fields:
        if depth >= MAX_WRAPPED:
            raise ConfigError(f"Invalid config {where}: '{prefix}.base' wraps objectives more than {MAX_WRAPPED} deep; unwrap them.")
        if out["base"] not in OBJECTIVES:
            raise ConfigError(f"Invalid config {where}: '{prefix}.base': " + unknown_name_message("objective", out["base"], OBJECTIVES.names()))
        _objective_options(out["base"], out["base_options"], f"{prefix}.base_options", where, depth + 1)  # checked, kept as written
    return out


def objective_needs(cfg: RunConfig) -> Needs:
    """What the configured objective declares it needs (insitu.registry.Needs), its options already validated."""
    cls = OBJECTIVES.get(cfg.objective.name)
    return cls.needs(cls.Options.model_validate(cfg.objective.options))


def check_needs(cfg: RunConfig, where: str = "<dict>") -> None:
    """Each component's declared needs against the rest of the config, before anything loads; one `ConfigError` lists every miss."""
    needs, name = objective_needs(cfg), cfg.objective.name
    problems = []
    datasets = [("data", cfg.data)] + [(f"federated.sites[{i}]", d) for i, d in enumerate(cfg.federated.sites if cfg.federated else [])]
    for key, data in datasets:
        items, frames = DOMAINS.get(data.domain).yields(DOMAINS.options(data.domain).model_validate(data.options))
        if needs.items == "pairs" and items != "pairs":
            problems.append(f"  '{key}.domain': objective '{name}' trains on image-text pairs; set {key}.domain: pairs (got {data.domain})")
        elif needs.items == "clips" and items != "clips":
            problems.append(
                f"  '{key}.options.mode': objective '{name}' trains on T×C×H×W clips; set {key}.domain: video with "
                f"{key}.options.mode: clips (got domain {data.domain})"
            )
        elif needs.items == "clips" and frames < needs.frames:
            problems.append(
                f"  '{key}.options.clip_frames': objective '{name}' needs windows of at least {needs.frames} frames "
                f"(objective.options.views.frames and speeds); raise {key}.options.clip_frames to {needs.frames} (got {frames})"
            )
        elif needs.items == "fractals" and items != "fractals":
            problems.append(f"  '{key}.domain': objective '{name}' learns the labels of generated fractals; set {key}.domain: fractals (got {data.domain})")
        elif needs.items != "clips" and items == "clips":
            problems.append(f"  '{key}.options.mode': objective '{name}' trains on single images; set {key}.options.mode: frames (got clips)")
    if cfg.train.cached_views:
        problems += _cache_problems(cfg, needs)
    if problems:
        raise ConfigError("\n".join([f"Invalid config {where}: what the components need is missing:", *problems]))


def _cache_problems(cfg: RunConfig, needs: Needs) -> list[str]:
    """``train.cached_views`` needs an objective whose steps only pass views on, and a frozen prefix (adapters after block 0)."""
    k, problems = cfg.train.cached_views, []
    if not needs.cacheable_views:
        problems.append(
            f"  'train.cached_views': objective '{cfg.objective.name}' changes pixels inside a training step (or wraps another "
            f"objective), so its views cannot be cached; set train.cached_views=0 or use simclr or dino (got {k})"
        )
    if cfg.train.full_finetune:
        problems.append("  'train.cached_views': needs a frozen prefix, and train.full_finetune trains every block; set one of them off")
    views = cfg.objective.options.get("views")
    if isinstance(views, dict) and views.get("device"):
        problems.append(
            "  'train.cached_views': objective.options.views.device: true builds views on the training device, not in the loader "
            "that the cache reads; set one of them off"
        )
    blocks, depth = cfg.adapter.options.get("blocks", "all"), cfg.backbone.kwargs.get("depth")
    if cfg.backbone.weights is not None:  # weights bring their own architecture (an insitu base ignores kwargs.depth)
        depth = None
    first = 0 if blocks == "all" else min(b % depth if isinstance(depth, int) else b for b in blocks) if isinstance(blocks, list) else None
    if first is None and isinstance(depth, int) and isinstance(blocks, int):
        first = depth - blocks
    if first == 0:  # unknown depth (a timm name without kwargs.depth): checked again when the backbone is built
        problems.append(
            f"  'adapter.options.blocks': train.cached_views needs adapters that start after block 0 (a frozen first block), e.g. "
            f"adapter.options.blocks: 2 for the last two (got {blocks!r})"
        )
    return problems


def _check_paths(cfg: RunConfig, where: str) -> None:
    checks: list[tuple[str, Path | None]] = [("data.root", cfg.data.root), ("trust.keys", cfg.trust.keys)]
    checks += [(f"federated.sites[{i}].root", s.root) for i, s in enumerate(cfg.federated.sites if cfg.federated else [])]
    checks += [("probe.train.root", cfg.probe.train.root if cfg.probe.train else None)]
    checks += [("probe.test.root", cfg.probe.test.root if cfg.probe.test else None)]
    if cfg.probe.dense is not None:
        checks += [("probe.dense.data.root", cfg.probe.dense.data.root)]
        checks += [("probe.dense.test.root", cfg.probe.dense.test.root if cfg.probe.dense.test else None)]
    tower = objective_needs(cfg).text_tower
    if tower and tower.startswith((".", "/", "~")):  # a folder, not an installed encoder's name or a cached hub id
        checks.append(("objective.options.text_encoder", Path(tower).expanduser()))
    if cfg.backbone.weights and cfg.backbone.weights.startswith(PACKAGED):
        shipped_card(cfg.backbone.weights.removeprefix(PACKAGED))  # raises ConfigError naming what exists
    elif cfg.backbone.weights:
        checks.append(("backbone.weights", Path(cfg.backbone.weights)))
    for key, path in checks:
        if path is not None and not Path(path).exists():
            raise ConfigError(
                f"Config {where}: '{key}' points at {path}, which does not exist "
                f"(relative paths are resolved from {Path.cwd()}). Fix the path or run from the right folder."
            )
