"""One site of a federation: its own data, the pretraining task (`SiteTask`), a few local steps per round.

A round: load the global adapters and objective heads, run ``local_steps`` of the same Lightning
loop ``insitu pretrain`` runs (same objective, views, EMA teacher, gradient clipping), hand back
the trained tensors. What is *shared* is exactly the student adapters and the objective's
trainable heads (:func:`shared_names`); everything else stays at the site: images, manifest,
normaliser, and the teacher. The teacher (EMA adapters, EMA heads, DINO's centre) is the EMA of
this site's student across all rounds, including each global state it received; it never travels.
Optimizer moments restart each round (the usual FedAvg choice); the lr, warm-up and EMA schedules
run on the federation's total step count (``step_offset``, set by `SiteTask.start_round`).
"""

from __future__ import annotations

import hashlib
import logging

import lightning as L
import numpy as np
import torch

from insitu.config import RunConfig
from insitu.domains import ManifestItem
from insitu.engine import make_trainer
from insitu.pipelines.data import PretrainDataModule, SampleDataset, ScannedData, fit_normalizer
from insitu.pipelines.pretrain import PretrainModule, PretrainTask
from insitu.pipelines.view_cache import build_view_cache, check_cacheable

log = logging.getLogger("insitu")


class SiteTask(PretrainTask):
    """`PretrainTask` plus FedProx's proximal term towards the round's global state (the `penalty` hook)."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.proximal_mu = 0.0
        self.global_state: dict[str, torch.Tensor] = {}

    def start_round(self, step_offset: int, global_state: dict[str, torch.Tensor], proximal_mu: float) -> None:
        """Before a round's local steps: schedules continue from ``step_offset``; FedProx pulls towards ``global_state``."""
        self.start_segment(step_offset)
        self.proximal_mu = proximal_mu
        self.global_state = global_state if proximal_mu > 0 else {}

    def penalty(self, batch_size: int) -> torch.Tensor | None:
        """FedProx: ``proximal_mu / 2 * ||w - w_global||^2`` over the shared tensors (None without FedProx)."""
        if self.proximal_mu <= 0 or not self.global_state:
            return None
        params = dict(self.named_parameters())
        prox = sum(((params[k] - g.to(params[k].device)) ** 2).sum() for k, g in self.global_state.items() if k in params)
        self.log("train/proximal", prox.detach(), batch_size=batch_size)
        return 0.5 * self.proximal_mu * prox


def federated_config(cfg: RunConfig) -> RunConfig:
    """The run config a federation trains with: schedules span all rounds' steps."""
    if cfg.federated is None:
        raise ValueError("the config has no federated section")
    train = cfg.train.model_copy(update={"max_steps": cfg.federated.total_steps})
    return cfg.model_copy(update={"train": train})


def shared_names(module: PretrainModule) -> list[str]:
    """The state-dict keys that travel: student adapters and the objective's trainable heads, sorted."""
    trainable = {f"objective.{n}" for n, p in module.objective.named_parameters() if p.requires_grad}
    return sorted(k for k in module.state_dict() if k.startswith("student.") or k in trainable)


def get_arrays(module: PretrainModule, names: list[str]) -> list[np.ndarray]:
    state = module.state_dict()
    return [state[k].detach().cpu().float().numpy().copy() for k in names]


def set_arrays(module: PretrainModule, names: list[str], arrays: list[np.ndarray]) -> None:
    if len(arrays) != len(names):
        raise ValueError(f"received {len(arrays)} tensors, this federation shares {len(names)}")
    state = module.state_dict()
    update = {}
    for name, array in zip(names, arrays, strict=True):
        if tuple(array.shape) != tuple(state[name].shape):
            raise ValueError(f"received tensor {name} with shape {tuple(array.shape)}, expected {tuple(state[name].shape)}")
        update[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    module.load_state_dict(update, strict=False)


def shard_items(items: list[ManifestItem], index: int, count: int) -> list[ManifestItem]:
    """Items whose group (patient, scene, case) hashes to shard ``index`` of ``count``: no group spans two sites."""
    def shard(item: ManifestItem) -> int:
        key = (item.group or item.item_id).encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % count

    return [it for it in items if shard(it) == index]


class SiteTrainer:
    """A site's data and module, kept across rounds; `train_round` is one round of local training."""

    def __init__(self, cfg: RunConfig, shard: tuple[int, int] | None = None) -> None:
        self.cfg = federated_config(cfg)
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)
        data = ScannedData.scan(self.cfg.data)
        items = data.manifest.items if shard is None else shard_items(data.manifest.items, *shard)
        if not items:
            raise ValueError("this site has no usable items (check data.root, or fewer --sites)")
        self.items = len(items)
        self.quarantined = len(data.manifest.quarantine)
        self.module = SiteTask(self.cfg)
        self.names = shared_names(self.module)
        dataset = SampleDataset(data, items, fit_normalizer(data, items), self.module.objective.view_transform(), self.cfg.data.image_size)
        workers = self.cfg.data.num_workers
        if self.cfg.train.cached_views:
            first = self.module.student.first_block
            check_cacheable(self.module.objective, self.module.backbone, first, self.cfg.train.full_finetune)
            dataset, workers = build_view_cache(dataset, self.module.backbone, first, self.cfg.train.cached_views), 0
        self.datamodule = PretrainDataModule(dataset, self.cfg.train.batch_size, workers)

    @property
    def fingerprint(self) -> str:
        return self.module.fingerprint

    def local_state(self) -> dict[str, torch.Tensor]:
        """What stays at the site between rounds: the teacher, EMA heads and buffers (not the frozen base)."""
        shared = set(self.names)
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items() if not k.startswith("backbone.") and k not in shared}

    def load_local_state(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=False)

    def train_round(self, arrays: list[np.ndarray], step_offset: int, steps: int, proximal_mu: float = 0.0) -> tuple[list[np.ndarray], float | None]:
        """Load the global tensors, train ``steps`` local steps, return (the trained tensors, the last loss)."""
        set_arrays(self.module, self.names, arrays)
        # a fresh, reproducible data order each round (the same every round would repeat the same batches)
        # modulo 2**32 (numpy's seed range): a simulated site's seed is seed + 1000 * (its index), so site 5 would overflow
        L.seed_everything((self.cfg.seed * 1_000_003 + step_offset) % 2**32, workers=True, verbose=False)
        global_state = {k: torch.from_numpy(a.copy()) for k, a in zip(self.names, arrays, strict=True)} if proximal_mu > 0 else {}
        self.module.start_round(step_offset, global_state, proximal_mu)
        trainer = make_trainer(
            self.cfg.trainer,
            max_steps=steps,
            single_device=True,
            logger=False,
            enable_checkpointing=False,
            gradient_clip_val=self.cfg.train.grad_clip,
        )
        trainer.fit(self.module, datamodule=self.datamodule)
        loss = trainer.callback_metrics.get("train/loss")
        return get_arrays(self.module, self.names), (float(loss) if loss is not None else None)
