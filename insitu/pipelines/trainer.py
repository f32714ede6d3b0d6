"""The Lightning trainer of a pretraining run and what surrounds it: metrics kept across a resume, and
the device and loss a finished run reports (the trainer itself comes from `insitu.engine.make_trainer`)."""

from __future__ import annotations

import csv
import platform
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from insitu.config import RunConfig
from insitu.engine import make_trainer
from insitu.io import write_csv
from insitu.pipelines.health import HealthMonitor

PRIOR_METRICS = "metrics.before-resume.csv"


class StopOnSignal(Callback):
    """SIGTERM (a scheduler's time limit) or SIGINT (Ctrl+C) during ``fit``: finish the current batch, then stop.

    `installed` puts insitu's handler in place around ``trainer.fit``; it only records the signal. Lightning's own
    SIGTERM handling (its signal connector, which also does SLURM's auto-requeue) stays: when ``fit`` starts it
    chains the handler found here after its own, sets ``trainer.received_sigterm`` and ends the loop at the next
    batch end with `SIGTERMException` (a ``SystemExit`` that would exit 0), which `installed` absorbs. SIGINT is
    insitu's alone (a raw ``KeyboardInterrupt`` could land mid-step): ``trainer.should_stop`` at the next batch end.
    A second SIGINT interrupts at once. The caller saves a checkpoint and raises `insitu.errors.RunInterrupted`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None

    def _record(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._record)
        try:
            yield self
        except SIGTERMException:
            self.signum = self.signum or signal.SIGTERM
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.signum is not None:
            trainer.should_stop = True


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def set_aside_metrics(logs: Path, resume_step: int) -> tuple[list[dict[str, str]], int]:
    """Keep the metrics of the earlier segments before Lightning's CSV logger starts a new file.

    Rows logged after the checkpoint (steps the resumed run repeats) are dropped; a segment that
    was itself killed before merging is folded in too. The rows are also kept on disk until the
    merge, so a kill during the resumed run loses nothing.
    """
    rows = read_metrics(logs / PRIOR_METRICS) + read_metrics(logs / "metrics.csv")
    rows = [r for r in rows if _step(r) < resume_step]
    _write_metrics(logs / PRIOR_METRICS, rows)
    (logs / "metrics.csv").unlink(missing_ok=True)
    return rows, resume_step


def merge_metrics(logs: Path, prior: list[dict[str, str]], resume_step: int) -> None:
    """``metrics.csv`` = earlier segments (steps before the resume) + the resumed segment."""
    rows = prior + [r for r in read_metrics(logs / "metrics.csv") if _step(r) >= resume_step]
    _write_metrics(logs / "metrics.csv", rows)
    (logs / PRIOR_METRICS).unlink(missing_ok=True)


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or -1))
    except ValueError:
        return -1


def _write_metrics(path: Path, rows: list[dict[str, str]]) -> None:
    write_csv(path, sorted({k for r in rows for k in r}), rows)


def build_trainer(cfg: RunConfig, ckpt_dir: Path, quiet: bool) -> L.Trainer:
    """The pretraining run's trainer (`insitu.engine.make_trainer`): checkpoints, health monitor, CSV and TensorBoard logs."""
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step}",
            every_n_train_steps=cfg.train.checkpoint_every,
            save_last=True,
            save_top_k=1,
            auto_insert_metric_name=False,
        ),
        StopOnSignal(),
    ]
    if cfg.health.enabled:
        callbacks.append(HealthMonitor(cfg.health, cfg.train.max_steps))
    return make_trainer(
        cfg.trainer,
        callbacks,
        max_steps=cfg.train.max_steps,
        quiet=quiet,
        logger=[
            CSVLogger(cfg.run_dir, name="logs", version=""),
            TensorBoardLogger(cfg.run_dir, name="tensorboard", version=""),
        ],
        gradient_clip_val=cfg.train.grad_clip,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        log_every_n_steps=min(cfg.train.log_every, max(1, cfg.train.max_steps // 10)),  # short runs still log a curve
        default_root_dir=cfg.run_dir,
    )


def final_loss(trainer: L.Trainer) -> float | None:
    value = trainer.callback_metrics.get("train/loss")
    return float(value) if value is not None else None


def device_name(trainer: L.Trainer) -> str:
    if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
        return torch.cuda.get_device_name(trainer.strategy.root_device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
