"""Training health while a run runs: a Lightning callback that logs ``health/...`` and guards collapse.

At every log step the monitor logs, under ``health/``:

- the objective's own health (``teacher_entropy``, ``teacher_entropy_ratio``,
  ``teacher_marginal_entropy_ratio``, ``student_teacher_kl``, ``embedding_spread``, ...), which the
  objective returns from its forward pass;
- ``rankme``: RankMe of the student's **centred** CLS features on a **fixed set** of up to
  ``health.rank_items`` (256) items, the first view of the first training batches, collected once
  (``rank_items`` counts the items in it; until it is complete the set is still growing);
- ``alignment`` and ``uniformity`` of the student's CLS features on a **fixed** batch (the first two
  views of the first training batch, up to ``health.batch_size`` items), so changes are the model's,
  not the batch's;
- ``grad_norm/<block>`` (before clipping) and ``update_norm/<block>`` (the optimizer step's change)
  of each adapted block's parameters.

The collapse guard (`CollapseGuard`) watches four signs, one per collapse: uniform targets (entropy
ratio), one-prototype collapse (marginal entropy ratio), dimensional collapse (centred RankMe of the
complete fixed set against its first value) and head/projector collapse (the objective's
``embedding_spread`` against its first value); ``health.guard`` says whether it warns, stops the
run, or stays silent.
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
MARGINAL_CAUSES = (
    "every image gets the same few prototypes (one-prototype collapse): the targets are sharp but "
    "carry no information about the image. Likely causes: too little centring (lower "
    "objective.options.center_momentum, or objective.options.centering: sinkhorn), a teacher "
    "temperature too low for the batch (raise objective.options.teacher_temp), a learning rate too "
    "high (train.lr). Also check that train.batch_size is not tiny: the marginal is over one batch."
)
SPREAD_CAUSES = (
    "the objective's own embeddings (its projector or head outputs) are collapsing onto one point "
    "while the backbone may still look healthy. Likely causes: a learning rate too high for the "
    "heads (train.lr), a target the head can meet with a constant (for graph matching: an identity "
    "target, see objective.options), no spread term (objective.options.koleo_weight: 0.1 where the "
    "objective has it)."
)
RANK_CAUSES = (
    "the features are collapsing onto fewer directions. Likely causes: a learning rate too high "
    "(train.lr), a teacher that follows the student too closely (raise train.ema_momentum or "
    "train.ema_half_life), too little target spread (objective.options.centering: sinkhorn). Also try "
    "objective.options.koleo_weight: 0.1."
)


SIGNS = ("entropy", "marginal", "rank", "spread")


class CollapseGuard:
    """Four collapse signs, each with the step it started; a sign that lasts ``window`` steps is reported once.

    - ``entropy``: teacher entropy ratio above ``max_entropy_ratio`` (uniform targets);
    - ``marginal``: entropy ratio of the batch-mean target below ``min_marginal_entropy_ratio``
      (every image on the same prototypes);
    - ``rank``: RankMe below ``min_rank_fraction`` of the first RankMe fed (feed it only on a fixed set);
    - ``spread``: the objective's ``embedding_spread`` below ``min_spread_fraction`` of the first value fed.
    """

    def __init__(
        self,
        max_entropy_ratio: float = 0.95,
        min_rank_fraction: float = 0.5,
        window: int = 50,
        min_marginal_entropy_ratio: float = 0.1,
        min_spread_fraction: float = 0.5,
    ) -> None:
        self.max_entropy_ratio, self.min_rank_fraction, self.window = max_entropy_ratio, min_rank_fraction, window
        self.min_marginal_entropy_ratio, self.min_spread_fraction = min_marginal_entropy_ratio, min_spread_fraction
        self.rank0: float | None = None
        self.spread0: float | None = None
        self.since: dict[str, int | None] = dict.fromkeys(SIGNS)
        self.alerts: list[str] = []
        self.fired: set[str] = set()

    def observe(
        self,
        step: int,
        entropy_ratio: float | None = None,
        rank: float | None = None,
        marginal_ratio: float | None = None,
        spread: float | None = None,
    ) -> list[str]:
        """Feed one step's measurements (None: not measured now); returns the alerts raised by this step."""
        if rank is not None and self.rank0 is None:
            self.rank0 = rank
        if spread is not None and self.spread0 is None:
            self.spread0 = spread
        now = {"entropy": entropy_ratio, "marginal": marginal_ratio, "rank": rank, "spread": spread}
        signs = {
            "entropy": None if entropy_ratio is None else entropy_ratio > self.max_entropy_ratio,
            "marginal": None if marginal_ratio is None else marginal_ratio < self.min_marginal_entropy_ratio,
            "rank": None if rank is None or not self.rank0 else rank < self.min_rank_fraction * self.rank0,
            "spread": None if spread is None or not self.spread0 else spread < self.min_spread_fraction * self.spread0,
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
                new.append(self.message(name, step - start, now[name]))
        self.alerts += new
        return new

    def message(self, name: str, steps: int, value: float) -> str:
        if name == "entropy":
            return (
                f"collapse guard: the teacher entropy has stayed above {self.max_entropy_ratio:.2f} x ln K for {steps} "
                f"steps (now {value:.3f} x ln K): {ENTROPY_CAUSES}"
            )
        if name == "marginal":
            return (
                f"collapse guard: the entropy of the batch-mean teacher target has stayed below "
                f"{self.min_marginal_entropy_ratio:.2f} x ln K for {steps} steps (now {value:.3f} x ln K): {MARGINAL_CAUSES}"
            )
        if name == "spread":
            return (
                f"collapse guard: the spread of the objective's embeddings (health/embedding_spread) has stayed below "
                f"{self.min_spread_fraction:.2f} of its start ({self.spread0:.4f}) for {steps} steps (now {value:.4f}): {SPREAD_CAUSES}"
            )
        return (
            f"collapse guard: the effective rank (centred RankMe) of the monitor's fixed set has stayed below "
            f"{self.min_rank_fraction:.2f} of its start ({self.rank0:.1f}) for {steps} steps (now {value:.1f}): {RANK_CAUSES}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank0": self.rank0,
            "spread0": self.spread0,
            "since": dict(self.since),
            "alerts": list(self.alerts),
            "fired": sorted(self.fired),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a checkpoint from before the marginal and spread signs had none of their state."""
        self.rank0, self.spread0, self.alerts = state["rank0"], state.get("spread0"), list(state["alerts"])
        self.since = {**dict.fromkeys(SIGNS), **state["since"]}
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


class RankSet:
    """The fixed set RankMe is measured on: the first view of the first training batches, up to ``size``
    distinct items, collected once. It is complete when full or when an epoch has ended (the whole
    dataset is in it); after that nothing changes it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[torch.Tensor] = []
        self.ids: set[str] = set()
        self.complete = False

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.items)

    def add(self, batch: dict[str, Any]) -> None:
        """Add the batch's items not yet in the set (by ``item_id`` where the batch has it), up to ``size``."""
        if self.complete:
            return
        views = fixed_views(batch, self.size - len(self))
        if views is None:
            return
        ids = [str(i) for i in (batch.get("item_id") or [])][: views[0].shape[0]]
        keep = [n for n, i in enumerate(ids) if i not in self.ids] if len(ids) == views[0].shape[0] else list(range(views[0].shape[0]))
        finite = torch.isfinite(views[0].flatten(1)).all(1)
        keep = [n for n in keep if bool(finite[n])]  # an item the run skips for non-finite pixels never enters the set
        self.ids.update(ids[n] for n in keep if n < len(ids))
        if keep:
            self.items.append(views[0][keep])
        self.complete = len(self) >= self.size

    def tensor(self) -> torch.Tensor | None:
        return torch.cat(self.items) if self.items else None


@torch.no_grad()
def cls_features(model: nn.Module, x: torch.Tensor, device: torch.device, chunk: int = 64) -> torch.Tensor:
    """The model's CLS features of x, in chunks (the rank set is larger than a training batch)."""
    return torch.cat([model.forward_tokens(x[i : i + chunk].to(device))[0].float().cpu() for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def feature_health(
    model: nn.Module, views: list[torch.Tensor], device: torch.device, rank_set: torch.Tensor | None = None
) -> dict[str, float]:
    """Uniformity of the CLS features of the first view, alignment between the first two; centred RankMe
    of the CLS features of ``rank_set`` (of the first view when there is no rank set)."""
    cls = [model.forward_tokens(v.to(device))[0].float() for v in views]
    ranked = cls[0] if rank_set is None else cls_features(model, rank_set, device)
    finite = torch.isfinite(ranked).all(1)
    rank = float(rankme(ranked[finite], centre=True)) if int(finite.sum()) > 1 else float("nan")
    out = {"health/rankme": rank, "health/uniformity": float(uniformity(cls[0]))}
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
        window = min(cfg.window, max(1, max_steps // 3))
        self.guard = CollapseGuard(
            cfg.max_entropy_ratio, cfg.min_rank_fraction, window, cfg.min_marginal_entropy_ratio, cfg.min_spread_fraction
        )
        self.fixed: list[torch.Tensor] | None = None
        self.rank_set = RankSet(cfg.rank_items)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.ratio_range: tuple[float, float] | None = None
        self.stopped = False
        self._grad: dict[str, float] = {}
        self._before: dict[str, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            if self.fixed is None:
                self.fixed = fixed_views(batch, self.cfg.batch_size)
            self.rank_set.add(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rank_set.complete = True  # a whole epoch seen: the dataset is smaller than rank_items

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
            complete = self.rank_set.complete  # before measuring: the set may not grow between the two
            own = self._step_metrics(pl_module)
            for name, value in own.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
            for name, value in {**values, **own}.items():
                self.history.setdefault(name, []).append((step, value))
            rank = own.get("health/rankme") if complete else None  # the guard compares complete sets only
        marginal, spread = values.get("health/teacher_marginal_entropy_ratio"), values.get("health/embedding_spread")
        self._act(trainer, self.guard.observe(step, ratio, rank, marginal, spread))

    def _step_metrics(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Feature health on the fixed batch, gradient and update norms per adapted block."""
        out: dict[str, float] = {}
        if self.fixed is not None and hasattr(pl_module, "student_model"):
            out.update(feature_health(pl_module.student_model(), self.fixed, pl_module.device, self.rank_set.tensor()))
            out["health/rank_items"] = float(len(self.rank_set))
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
