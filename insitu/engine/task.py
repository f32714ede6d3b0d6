"""`Task`: the base of every insitu training task, in the style of TorchGeo's trainers.

A subclass stores its typed config, calls ``super().__init__`` with the optimisation settings and
the config sections it uses (saved as hyperparameters in every checkpoint), and builds its modules
in `configure_models`. The base owns what every task shares: one AdamW with the weight-decay split,
one warm-up + cosine schedule, one EMA momentum schedule for tasks with a teacher, and one
non-finite-loss policy raising `NonFiniteLossError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from pydantic import BaseModel

from insitu.engine.schedules import ema_momentum, warmup_cosine
from insitu.errors import NonFiniteLossError

log = logging.getLogger("insitu")


@dataclass(frozen=True)
class Optimisation:
    """What a task's optimizer and schedules need, read from its typed config.

    ``decay_all``: biases and norm weights decay too (the downstream optimiser; everywhere else
    parameters with fewer than 2 dimensions get no weight decay). ``ema_base``: the teacher's EMA
    momentum at step 0 (None: the task has no EMA teacher).
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    decay_all: bool = False
    fused: bool = False
    ema_base: float | None = None


@dataclass(frozen=True)
class NonFinitePolicy:
    """``stop``: a non-finite loss ends the run; ``skip``: the batch is skipped, until more than
    ``max_skipped_fraction`` of the batches (at least 10 counted) were. The keys are the config keys
    the error message names (``skip_key`` None: the config offers no skipping)."""

    mode: Literal["stop", "skip"] = "stop"
    max_skipped_fraction: float = 0.1
    lr_key: str = "train.lr"
    skip_key: str | None = "train.nonfinite"


class Task(L.LightningModule):
    """A LightningModule trained by the engine: AdamW + warm-up/cosine, EMA teacher schedule, non-finite policy."""

    def __init__(
        self, optimisation: Optimisation, sections: Mapping[str, BaseModel], nonfinite: NonFinitePolicy = NonFinitePolicy()
    ) -> None:
        super().__init__()
        self.optimisation, self.nonfinite = optimisation, nonfinite
        # plain values only, so checkpoints stay loadable with weights_only=True; set directly rather than by
        # save_hyperparameters, which walks the callers' frames, and not sent to the loggers (hparams_initial stays empty)
        self.hparams.update({name: section.model_dump(mode="json") for name, section in sections.items()})
        self.step_offset = 0  # steps taken before this fit (federated rounds): the schedules run on the total
        self.skipped_batches = 0
        self.seen_batches = 0
        self._last_ema_step = -1
        self.configure_models()

    def configure_models(self) -> None:
        """Build the task's modules from its config (named as TorchGeo's: Lightning's own ``configure_model``
        hook runs again at every fit)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only (no decay on biases and norms), unless ``decay_all``."""
        o, params = self.optimisation, self.trainable_parameters()
        if o.decay_all:
            return [{"params": params, "weight_decay": o.weight_decay}]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optimisation
        opt = torch.optim.AdamW(self.parameter_groups(), lr=o.lr, fused=True if o.fused else None)
        offset = self.step_offset

        def schedule(step: int) -> float:
            return warmup_cosine(step + offset, o.warmup_steps, o.total_steps, o.lr, o.min_lr)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def start_segment(self, step_offset: int) -> None:
        """Before a further fit of the same task (a federated round): schedules continue from ``step_offset``."""
        self.step_offset = step_offset
        self._last_ema_step = -1

    def ema_momentum(self) -> float:
        base = self.optimisation.ema_base
        if base is None:
            raise RuntimeError(f"{type(self).__name__} has no EMA teacher")
        return ema_momentum(self.global_step + self.step_offset, self.optimisation.total_steps, base)

    def update_teachers(self, momentum: float) -> None:
        """EMA-update the task's teacher modules towards the student (tasks with a teacher override this)."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once after each optimizer step (global_step counts optimizer steps), not after a skipped batch
        if self.optimisation.ema_base is None or self.global_step == self._last_ema_step or outputs is None:
            return
        self._last_ema_step = self.global_step
        self.update_teachers(self.ema_momentum())

    def penalty(self, batch_size: int) -> torch.Tensor | None:
        """A term added to the training loss after it is logged (FedProx's proximal term); None: nothing."""
        return None

    def non_finite(self, loss: torch.Tensor, items: Sequence[str] = (), bad_items: Sequence[str] = ()) -> None:
        """Apply the non-finite policy to a step's loss: raise `NonFiniteLossError`, or count and skip the batch.

        ``items``: the batch's item ids; ``bad_items``: those whose inputs are themselves non-finite.
        """
        p = self.nonfinite
        msg = f"non-finite loss ({loss.item()}) at step {self.global_step}"
        if items:
            what = "items with non-finite pixels" if bad_items else "batch items"
            msg += f"; {what}: [{', '.join(list(bad_items or items)[:16])}]"
        if p.mode == "stop":
            check = "Check those items (NaN pixels, extreme intensities) or lower" if items else "Lower"
            skip = f"; set {p.skip_key}=skip to skip such batches." if p.skip_key else "."
            raise NonFiniteLossError(f"{msg}. {check} {p.lr_key}{skip}")
        self.skipped_batches += 1
        if self.skipped_batches > p.max_skipped_fraction * max(self.seen_batches, 10):
            raise NonFiniteLossError(
                f"{msg}. {self.skipped_batches} of {self.seen_batches} batches had a non-finite loss, more than "
                f"train.max_skipped_fraction={p.max_skipped_fraction} allows: the run is diverging or the data "
                f"is broken, so nothing is packaged. Check those items or lower {p.lr_key}."
            )
        log.warning("%s: batch skipped (%s=skip)", msg, p.skip_key)
        return None
