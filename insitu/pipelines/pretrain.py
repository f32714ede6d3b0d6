"""Continual self-supervised pretraining of adapters on a frozen ViT, on Lightning.

`PretrainTask`, a `Task` of the engine (insitu.engine: optimizer, schedules, EMA, non-finite policy),
holds the frozen backbone (shared by student and teacher), the student's trainable adapters, the
teacher's EMA adapters and the objective (with its heads). Only adapter and head parameters reach
the optimizer. Checkpoints leave out the frozen backbone and are
written atomically; a non-finite loss stops the run naming the step and items, or skips the
batch when ``train.nonfinite: skip``.
"""

from __future__ import annotations

import copy
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from safetensors.torch import save_file

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.adapters.package import save_package
from insitu.backbones import create_backbone
from insitu.checkpoints import check_checkpoint
from insitu.config import RunConfig, dump_config
from insitu.engine import NonFinitePolicy, Optimisation, Task, base_ema_momentum, resolve_precision
from insitu.errors import ConfigError, RunInterrupted
from insitu.io import OutputExistsError, OwnedFolder, claim_folder, is_secondary_rank, read_owner, write_json
from insitu.objectives import create_objective
from insitu.objectives.views import MultiCrop
from insitu.pipelines.data import PretrainDataModule, SampleDataset, ScannedData
from insitu.pipelines.health import HealthMonitor
from insitu.pipelines.holdout import pretraining_items
from insitu.pipelines.preprocess import Preprocessing, resolve_preprocessing
from insitu.pipelines.trainer import StopOnSignal, build_trainer, device_name, final_loss, merge_metrics, set_aside_metrics
from insitu.pipelines.view_cache import build_view_cache, check_cacheable
from insitu.privacy import private_run
from insitu.sharing.signing import run_trust, trust_of

log = logging.getLogger("insitu")


class PretrainTask(Task):
    """Student adapters + EMA teacher adapters on one frozen backbone, trained by an objective."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg  # before Task.__init__, which calls configure_models (as TorchGeo's trainers set their options)
        t = cfg.train
        m0 = t.ema_momentum if t.ema_momentum is not None else base_ema_momentum(t.max_steps, t.ema_half_life)
        super().__init__(
            Optimisation(t.lr, t.max_steps, t.warmup_steps, t.min_lr, t.weight_decay, fused=t.fused_optimizer, ema_base=m0),
            {"backbone": cfg.backbone, "adapter": cfg.adapter, "objective": cfg.objective, "train": t},
            NonFinitePolicy(t.nonfinite, t.max_skipped_fraction),
        )
        self.last_health: dict[str, torch.Tensor] = {}
        self.wall_offset = 0.0  # wall seconds of earlier segments of a resumed run
        self._fit_start = time.perf_counter()

    def configure_models(self) -> None:
        cfg = self.cfg
        self.backbone = create_backbone(cfg.backbone)
        self.student = create_adapters(self.backbone, cfg.adapter)
        self.teacher = copy.deepcopy(self.student)
        deactivate_requires_grad(self.teacher)
        with run_trust(trust_of(cfg)):  # an objective that loads a package (self_distill) does so under the run's trust policy
            self.objective = create_objective(
                cfg.objective.name,
                self.backbone.embed_dim,
                self.backbone.patch_size,
                cfg.data.image_size,
                cfg.objective.options,
                cfg.train.max_steps,
            )
        # train.compile: the objective's forward (views -> loss, student and teacher passes) through torch.compile;
        # the module and its state_dict stay as they are (checkpoints and packages are unchanged)
        compile_mode = cfg.train.compile
        self.objective_fn = self.objective if compile_mode == "none" else torch.compile(self.objective, mode=compile_mode)
        self.fingerprint = self.backbone.fingerprint
        self.teacher_backbone = self._full_finetune_setup() if cfg.train.full_finetune else None

    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()

    def _full_finetune_setup(self) -> torch.nn.Module:
        """Baseline mode: every backbone weight trains; the teacher gets its own EMA backbone copy."""
        teacher_backbone = copy.deepcopy(self.backbone)
        deactivate_requires_grad(teacher_backbone)
        self.backbone.set_trainable(True)
        return teacher_backbone

    def student_model(self) -> AdaptedBackbone:
        return AdaptedBackbone(self.backbone, self.student)

    def teacher_model(self) -> AdaptedBackbone:
        return AdaptedBackbone(self.teacher_backbone or self.backbone, self.teacher)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = super().trainable_parameters()
        frozen = {id(p) for p in self.teacher.parameters()}
        frozen |= {id(p) for p in (self.teacher_backbone or self.backbone).parameters()}
        assert not any(id(p) in frozen for p in params), "a frozen parameter requires grad"
        return params

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch["item_id"]:
            return None
        self.seen_batches += 1
        self.objective.step = self.global_step + self.step_offset
        # objectives may update buffers in forward (DINO's centre); undo that on a bad batch
        buffers = {k: v.clone() for k, v in self.objective.named_buffers()}
        out = self.objective_fn(batch, self.student_model(), self.teacher_model())
        loss = out["loss"]
        if not torch.isfinite(loss):
            self.objective.load_state_dict(buffers, strict=False)
            bad = [i for n, i in enumerate(batch["item_id"]) if any(not torch.isfinite(v[n]).all() for v in batch.get("views", []))]
            return self.non_finite(loss, batch["item_id"], bad)
        bs = len(batch["item_id"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in out.items():
            if name != "loss":
                self.log(name if name.startswith("health/") else f"train/{name}", value, batch_size=bs)
        # the objective's teacher health, for the health monitor's guard (insitu.pipelines.health)
        self.last_health = {k: v.detach() for k, v in out.items() if k.startswith("health/")}
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        extra = self.penalty(bs)
        return loss if extra is None else loss + extra

    def update_teachers(self, momentum: float) -> None:
        update_momentum(self.student, self.teacher, momentum)
        if self.teacher_backbone is not None:
            update_momentum(self.backbone, self.teacher_backbone, momentum)
        self.objective.update_teacher(momentum)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen backbone is rebuilt from the config; keep checkpoints adapter-sized
        if self.teacher_backbone is None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint["insitu_fingerprint"] = self.fingerprint
        checkpoint["insitu_wall_s"] = self.wall_offset + time.perf_counter() - self._fit_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("insitu_fingerprint") != self.fingerprint:
            raise ConfigError("the checkpoint was made with a different backbone (fingerprint differs); cannot resume.")
        self.wall_offset = float(checkpoint.get("insitu_wall_s", 0.0))
        own = {k: v for k, v in self.state_dict().items() if k.startswith("backbone.") and k not in checkpoint["state_dict"]}
        checkpoint["state_dict"].update(own)


PretrainModule = PretrainTask  # the name federated, benchmarks and tests import


@dataclass
class PretrainResult:
    """What a finished pretraining run produced."""

    run_dir: Path
    adapter_dir: Path | None
    steps: int
    final_loss: float | None
    wall_s: float
    items: int
    quarantined: int
    trainable_params: int
    summary: dict[str, Any] = field(default_factory=dict)


def pretrain(
    cfg: RunConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False, folder: OwnedFolder | None = None
) -> PretrainResult:
    """Run continual pretraining as configured; returns paths and a summary.

    The run folder is claimed first (:func:`insitu.io.claim_folder`): a folder insitu did not
    create is never written into, earlier results are replaced only with ``overwrite`` (and then
    only what insitu wrote), and the folder is locked for the run. ``folder`` passes a folder the
    caller has already claimed (the quickstart).
    """
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    primary = not is_secondary_rank()
    if resume and not last.exists():
        raise ConfigError(f"--resume: no checkpoint at {last}. Run without --resume to start.")
    claimed_here = primary and folder is None
    if claimed_here:
        folder = _claim_run_folder(run_dir, resume, overwrite)
    try:
        return _run(cfg, resume, quiet, folder)
    finally:
        if folder is not None:
            folder.record()
        if claimed_here:
            folder.unlock()


def _claim_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> OwnedFolder:
    if resume:  # continuing a run removes nothing; runs from before ownership records are accepted
        record = read_owner(run_dir)
        folder = OwnedFolder(run_dir, "pretrain", record["entries"] if record else ())
        folder.lock()
        return folder
    try:
        return claim_folder(run_dir, "pretrain", overwrite, flag="--overwrite (or --resume to continue)", lock=True)
    except OutputExistsError as exc:
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            raise OutputExistsError(
                f"{run_dir} already holds checkpoints. Pass --resume to continue, --overwrite to start again, or pick another name (--set name=...). ({exc})"
            ) from exc
        raise


def _run(cfg: RunConfig, resume: bool, quiet: bool, folder: OwnedFolder | None) -> PretrainResult:
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    # a tampered or foreign checkpoint is a typed error naming it, before Lightning reads it
    resume_step = check_checkpoint(last)["global_step"] if resume else None
    if folder is not None:
        dump_config(cfg, run_dir / "config.yaml", redact=private_run(cfg.model_dump(mode="json")))  # resume reads -c, not this
    prior_metrics = set_aside_metrics(run_dir / "logs", resume_step) if resume_step is not None and folder else None

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = ScannedData.scan(cfg.data)
    if folder is not None:
        data.manifest.write(run_dir / "manifest")
    items = pretraining_items(cfg, data)  # the probe's test items stay out unless probe.transductive (holdout.py)
    prep = resolve_preprocessing(None, data, items, cfg.data.image_size, cfg.backbone)  # normaliser fitted on the items
    module = PretrainModule(cfg)
    recipe, device_views = module.objective.view_transform(), None
    if isinstance(recipe, MultiCrop) and recipe.opts.device:
        if cfg.train.cached_views:
            raise ConfigError("views.device: true and train.cached_views build views in two different places; set one of them off.")
        device_views, recipe = recipe, None
    dm = _data_module(cfg, module, prep.dataset(data, items, recipe))
    dm.device_views, dm.view_seed = device_views, cfg.seed
    trainer = build_trainer(cfg, ckpt_dir, quiet)
    stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
    start = time.perf_counter()
    with stop.installed():  # SIGTERM / SIGINT: the step in flight finishes, then the run stops (below)
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    wall = module.wall_offset + time.perf_counter() - start  # resumed runs count their earlier segments too
    if prior_metrics is not None and trainer.is_global_zero:
        merge_metrics(run_dir / "logs", *prior_metrics)
    interrupted = stop.signum is not None and trainer.global_step < cfg.train.max_steps
    if interrupted or trainer.global_step >= cfg.train.max_steps or not last.exists():
        trainer.save_checkpoint(last)
    if interrupted:
        name = signal.Signals(stop.signum).name
        raise RunInterrupted(
            f"{name} stopped the run at step {trainer.global_step} of {cfg.train.max_steps}; checkpoint saved to {last}",
            stop.signum,
            trainer.global_step,
            str(last),
        )
    summary = _summary(cfg, module, trainer, wall, len(items), len(data.manifest.quarantine))
    adapter_dir = _save_outputs(cfg, module, prep, summary) if trainer.is_global_zero else None
    return PretrainResult(
        run_dir,
        adapter_dir,
        trainer.global_step,
        summary["final_loss"],
        wall,
        len(items),
        len(data.manifest.quarantine),
        summary["trainable_params"],
        summary,
    )


def _data_module(cfg: RunConfig, module: PretrainModule, dataset: SampleDataset) -> PretrainDataModule:
    workers = cfg.data.num_workers
    if cfg.train.cached_views:  # the frozen prefix runs once per cached view, not once per step
        first = module.student.first_block
        check_cacheable(module.objective, module.backbone, first, cfg.train.full_finetune)
        dataset, workers = build_view_cache(dataset, module.backbone, first, cfg.train.cached_views), 0
    return PretrainDataModule(dataset, cfg.train.batch_size, workers)


def _summary(cfg: RunConfig, module: PretrainModule, trainer: L.Trainer, wall: float, items: int, quarantined: int) -> dict[str, Any]:
    """summary.json: what ran, on what, how long, and the run's health summary."""
    summary = {
        "steps": trainer.global_step,
        "final_loss": final_loss(trainer),
        "wall_s": round(wall, 2),
        "items": items,
        "quarantined": quarantined,
        "skipped_batches": module.skipped_batches,
        "trainable_params": sum(p.numel() for p in module.trainable_parameters()),
        "frozen_params": sum(p.numel() for p in module.backbone.parameters()),
        "device": device_name(trainer),
        "precision": resolve_precision(cfg.trainer),
        "seed": cfg.seed,
    }
    monitor = next((c for c in trainer.callbacks if isinstance(c, HealthMonitor)), None)
    if monitor is not None:
        summary["health"] = monitor.summary()
    return summary


def _save_outputs(cfg: RunConfig, module: PretrainModule, prep: Preprocessing, summary: dict[str, Any]) -> Path:
    """The adapter package, summary.json and (full fine-tuning only) the backbone; returns the package folder."""
    run_dir = cfg.run_dir
    adapter_dir = save_package(
        run_dir / "adapter",
        module.backbone,
        module.student,
        head_state=module.objective.head_state(),
        input_info=prep.input_section(cfg.data.domain),  # the preprocessing contract, read back by package_preprocessing
        normalizer=prep.normalizer.to_dict(),
        objective={"name": cfg.objective.name, "options": cfg.objective.options},
        training=summary,
        config=cfg.model_dump(mode="json"),
        # the EMA teacher's adapters (often the better encoder), for objectives that train one; not with full
        # fine-tuning, whose teacher also has its own backbone
        teacher=module.teacher if module.objective.needs_teacher and module.teacher_backbone is None else None,
    )
    write_json(run_dir / "summary.json", summary)
    if module.teacher_backbone is not None:  # full fine-tuning: the adapters alone do not carry the result
        save_file({k: v.contiguous() for k, v in module.backbone.timm_state_dict().items()}, str(run_dir / "backbone.safetensors"))
    return adapter_dir
