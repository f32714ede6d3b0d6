"""Training health while a run runs: a Lightning callback that logs ``health/...`` and guards collapse.

At every log step the monitor logs, under ``health/``:

- the objective's teacher health (``teacher_entropy``, ``teacher_entropy_ratio``,
  ``student_teacher_kl``), which the objective returns from its forward pass;
- ``rankme``, ``alignment`` and ``uniformity`` of the student's CLS features on a **fixed** batch
  (the first two views of the first training batch, kept by the monitor), so changes are the
  model's, not the batch's;
- ``grad_norm/<block>`` (before clipping) and ``update_norm/<block>`` (the optimizer step's change)
  of each adapted block's parameters.

The collapse guard (`CollapseGuard`) watches the entropy ratio at every step and the effective rank
at log steps; ``health.guard`` says whether it warns, stops the run, or stays silent.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from insitu.config import HealthConfig
from insitu.objectives.health import alignment, rankme, uniformity

log = logging.getLogger("insitu")

ENTROPY_CAUSES = (
    "the teacher's targets are nearly uniform, so the student gets no signal. Likely causes: the heads "
    "see unnormalised, nearly collinear backbone features (objective.options.head_input_norm: running), "
    "a high or warming-up teacher temperature (objective.options.teacher_temp: 0.04, "
    "warmup_teacher_temp_steps: 0), a teacher that barely moves in a short run (leave train.ema_momentum "
    "unset so it follows train.max_steps, or lower train.ema_half_life). Also try "
    "objective.options.centering: sinkhorn or koleo_weight: 0.1."
)
RANK_CAUSES = (
    "the features are collapsing onto fewer directions. Likely causes: a learning rate too high "
    "(train.lr), a teacher that follows the student too closely (raise train.ema_momentum or "
    "train.ema_half_life), too little target spread (objective.options.centering: sinkhorn). Also try "
    "objective.options.koleo_weight: 0.1."
)


class CollapseGuard:
    """Two collapse signs, each with the step it started; a sign that lasts ``window`` steps is reported once."""

    def __init__(self, max_entropy_ratio: float = 0.95, min_rank_fraction: float = 0.5, window: int = 50) -> None:
        self.max_entropy_ratio, self.min_rank_fraction, self.window = max_entropy_ratio, min_rank_fraction, window
        self.rank0: float | None = None
        self.since: dict[str, int | None] = {"entropy": None, "rank": None}
        self.alerts: list[str] = []
        self.fired: set[str] = set()

    def observe(self, step: int, entropy_ratio: float | None = None, rank: float | None = None) -> list[str]:
        """Feed one step's measurements (None: not measured now); returns the alerts raised by this step."""
        if rank is not None and self.rank0 is None:
            self.rank0 = rank
        signs = {
            "entropy": None if entropy_ratio is None else entropy_ratio > self.max_entropy_ratio,
            "rank": None if rank is None or not self.rank0 else rank < self.min_rank_fraction * self.rank0,
        }
        new = []
        for name, bad in signs.items():
            if bad is None:  # not measured at this step: the streak goes on
                continue
            if not bad:
                self.since[name] = None
                continue
            start = self.since[name] = step if self.since[name] is None else self.since[name]
            if step - start >= self.window and name not in self.fired:
                self.fired.add(name)
                new.append(self.message(name, step - start, entropy_ratio, rank))
        self.alerts += new
        return new

    def message(self, name: str, steps: int, entropy_ratio: float | None, rank: float | None) -> str:
        if name == "entropy":
            return (
                f"collapse guard: the teacher entropy has stayed above {self.max_entropy_ratio:.2f} x ln K for {steps} "
                f"steps (now {entropy_ratio:.3f} x ln K): {ENTROPY_CAUSES}"
            )
        return (
            f"collapse guard: the effective rank (RankMe) of the monitor's fixed batch has stayed below "
            f"{self.min_rank_fraction:.2f} of its start ({self.rank0:.1f}) for {steps} steps (now {rank:.1f}): {RANK_CAUSES}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rank0": self.rank0, "since": dict(self.since), "alerts": list(self.alerts), "fired": sorted(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank0, self.since, self.alerts = state["rank0"], dict(state["since"]), list(state["alerts"])
        self.fired = set(state["fired"])


def block_parameters(adapters: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable adapter parameters grouped by ViT block (the first integer in a parameter's name)."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in adapters.named_parameters():
        if p.requires_grad:
            index = next((part for part in name.split(".") if part.isdigit()), None)
            groups.setdefault(f"block{index}" if index is not None else "other", []).append(p)
    return groups


def group_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of a list of tensors taken together (0 for none)."""
    return float(torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))) if tensors else 0.0


def fixed_views(batch: dict[str, Any], n: int) -> list[torch.Tensor] | None:
    """The first two image views (B×C×H×W; a clip B×T×C×H×W gives its first frame; cached views are B×N×D
    prefix tokens) of a batch, cut to n items and kept on the CPU; None if unusable."""
    views = [v[:, 0] if v.ndim == 5 else v for v in (batch.get("views") or [])[:2] if torch.is_tensor(v) and v.ndim in (3, 4, 5)]
    if not views or views[0].shape[0] < 2:
        return None
    return [v[:n].detach().cpu().clone() for v in views]


@torch.no_grad()
def feature_health(model: nn.Module, views: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    """RankMe and uniformity of the CLS features of the first view; alignment between the first two."""
    cls = [model.forward_tokens(v.to(device))[0].float() for v in views]
    out = {"health/rankme": float(rankme(cls[0])), "health/uniformity": float(uniformity(cls[0]))}
    if len(cls) > 1 and cls[1].shape == cls[0].shape:
        out["health/alignment"] = float(alignment(cls[0], cls[1]))
    return out


def is_log_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes the loggers after this step (the same test it uses itself)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None:
        return bool(connector.should_update_logs)
    return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0


class HealthMonitor(L.Callback):
    """Logs ``health/...`` at every log step, keeps their history for the summary, runs the guard."""

    def __init__(self, cfg: HealthConfig, max_steps: int) -> None:
        self.cfg = cfg
        self.guard = CollapseGuard(cfg.max_entropy_ratio, cfg.min_rank_fraction, min(cfg.window, max(1, max_steps // 3)))
        self.fixed: list[torch.Tensor] | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.ratio_range: tuple[float, float] | None = None
        self.stopped = False
        self._grad: dict[str, float] = {}
        self._before: dict[str, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.fixed is None and isinstance(batch, dict):
            self.fixed = fixed_views(batch, self.cfg.batch_size)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not is_log_step(trainer) or not hasattr(pl_module, "student"):
            return
        groups = block_parameters(pl_module.student)
        if not any(p.grad is not None for ps in groups.values() for p in ps):  # a skipped batch: nothing to measure
            return
        self._grad = {k: group_norm([p.grad for p in ps if p.grad is not None]) for k, ps in groups.items()}
        self._before = {k: [p.detach().clone() for p in ps] for k, ps in groups.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is None:  # a skipped batch
            return
        step = trainer.global_step
        values = {k: float(v) for k, v in getattr(pl_module, "last_health", {}).items()}
        ratio = values.get("health/teacher_entropy_ratio")
        if ratio is not None:
            lo, hi = self.ratio_range or (ratio, ratio)
            self.ratio_range = (min(lo, ratio), max(hi, ratio))
        rank = None
        if is_log_step(trainer):
            own = self._step_metrics(pl_module)
            for name, value in own.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
            for name, value in {**values, **own}.items():
                self.history.setdefault(name, []).append((step, value))
            rank = own.get("health/rankme")
        self._act(trainer, self.guard.observe(step, ratio, rank))

    def _step_metrics(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Feature health on the fixed batch, gradient and update norms per adapted block."""
        out: dict[str, float] = {}
        if self.fixed is not None and hasattr(pl_module, "student_model"):
            out.update(feature_health(pl_module.student_model(), self.fixed, pl_module.device))
        out.update({f"health/grad_norm/{k}": v for k, v in self._grad.items()})
        if self._before and hasattr(pl_module, "student"):
            after = block_parameters(pl_module.student)
            for k, before in self._before.items():
                out[f"health/update_norm/{k}"] = group_norm([a - b for a, b in zip(after[k], before, strict=True)])
        self._grad, self._before = {}, {}
        return out

    def _act(self, trainer: L.Trainer, alerts: list[str]) -> None:
        if self.cfg.guard == "off":
            return
        for message in alerts:
            log.warning(message + " (health.guard=%s)", self.cfg.guard)
            if self.cfg.guard == "stop":
                log.error("stopping the run at step %d: the collapse guard fired (health.guard=stop)", trainer.global_step)
                trainer.should_stop = True
                self.stopped = True

    def summary(self) -> dict[str, Any]:
        """First and last value of each health metric (min/max too for the entropy ratio), the guard's alerts."""
        out: dict[str, Any] = {k.removeprefix("health/"): {"first": h[0][1], "last": h[-1][1]} for k, h in sorted(self.history.items())}
        if self.ratio_range is not None:
            entry = out.setdefault("teacher_entropy_ratio", {})
            entry["min"], entry["max"] = self.ratio_range
        out["guard"] = self.cfg.guard
        out["alerts"] = list(self.guard.alerts) if self.cfg.guard != "off" else []
        out["stopped_by_guard"] = self.stopped
        return out

    def state_dict(self) -> dict[str, Any]:
        history = {k: [list(p) for p in h] for k, h in self.history.items()}
        return {"history": history, "ratio_range": list(self.ratio_range or []), "guard": self.guard.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [(int(s), float(v)) for s, v in h] for k, h in state_dict["history"].items()}
        self.ratio_range = tuple(state_dict["ratio_range"]) or None
        self.guard.load_state_dict(state_dict["guard"])
