"""`make_trainer`: the one place a ``lightning.Trainer`` is built, with one precision rule and atomic checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from insitu.config import TrainerConfig
from insitu.errors import NonFiniteLossError
from insitu.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, fsync, then rename; never write a checkpoint with NaN/Inf."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        bad = [
            k
            for k, v in checkpoint.get("state_dict", {}).items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise NonFiniteLossError(f"refusing to write checkpoint {path}: non-finite tensors {bad[:5]}")
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    """``precision: auto`` is bf16 mixed precision on a GPU and full fp32 elsewhere; any other value is kept."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    gpu = torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def make_trainer(
    trainer_cfg: TrainerConfig,
    callbacks: Sequence[Callback] = (),
    *,
    max_steps: int,
    quiet: bool = True,
    single_device: bool = False,
    **options: Any,
) -> L.Trainer:
    """A Lightning trainer for ``max_steps`` optimizer steps on the run's ``trainer`` section.

    ``single_device`` runs on one device of the configured accelerator whatever the section says
    (a federated site's local rounds, the fractal base). ``options`` are the run's own trainer
    arguments (loggers, gradient clipping, validation cadence). Every trainer writes checkpoints
    atomically (`AtomicCheckpointIO`), shows no model summary, skips the sanity validation and,
    unless ``quiet``, shows a progress bar.
    """
    hardware: dict[str, Any] = {
        "accelerator": trainer_cfg.accelerator,
        "devices": trainer_cfg.devices,
        "strategy": trainer_cfg.strategy,
        "num_nodes": trainer_cfg.num_nodes,
    }
    if single_device:
        hardware.update(devices=1, strategy="auto", num_nodes=1)
    bar = [] if quiet else [RichProgressBar(leave=False)]
    return L.Trainer(
        max_steps=max_steps,
        **hardware,
        precision=resolve_precision(trainer_cfg),
        callbacks=[*callbacks, *bar],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=not quiet,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )
