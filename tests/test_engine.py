"""The training engine (insitu.engine): schedules against hand values, the weight-decay split, the precision
rule, the non-finite policy, and that every Lightning trainer is built there."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from insitu.config import Strict, TrainerConfig
from insitu.engine import NonFinitePolicy, Optimisation, Task, ema_momentum, make_trainer, resolve_precision, warmup_cosine
from insitu.errors import NonFiniteLossError

PACKAGE = Path(__file__).resolve().parents[1] / "insitu"


class _Section(Strict):
    lr: float = 0.1


class _Tiny(Task):
    """A linear layer, a norm and a frozen layer: which parameters decay is visible by name."""

    def configure_models(self) -> None:
        self.linear = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)


def _tiny(**kw: object) -> _Tiny:
    return _Tiny(Optimisation(lr=0.1, total_steps=12, warmup_steps=4, weight_decay=0.05, **kw), {"section": _Section()})


def test_lr_schedule_warms_up_then_follows_a_cosine():
    # warm-up: (s + 1) / 4 for s < 4; then 0.5 (1 + cos(pi t)), t = (s - 4) / 8; flat at 0 after step 12
    hand = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 6: 0.5 * (1 + math.cos(math.pi / 4)), 8: 0.5, 12: 0.0, 30: 0.0}
    for step, value in hand.items():
        assert warmup_cosine(step, 4, 12) == pytest.approx(value, abs=1e-12), step
    assert warmup_cosine(6, 4, 12) == pytest.approx(0.8535533905932737)
    # with a floor: the cosine ends at min_lr / lr instead of 0
    assert warmup_cosine(8, 4, 12, lr=1e-3, min_lr=1e-5) == pytest.approx(0.505)
    assert warmup_cosine(12, 4, 12, lr=1e-3, min_lr=1e-5) == pytest.approx(0.01)
    assert warmup_cosine(0, 0, 10) == 1.0 and warmup_cosine(5, 0, 10) == pytest.approx(0.5)  # no warm-up


def test_task_optimizer_follows_the_schedule_from_its_step_offset():
    task = _tiny()
    task.start_segment(6)  # a later segment (federated round) continues the schedule
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * warmup_cosine(s, 4, 12) for s in (6, 7, 8)])
    assert lrs[2] == pytest.approx(0.05)


def test_ema_schedule_hand_values():
    assert ema_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert ema_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert ema_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.99) == pytest.approx(1.0) and ema_momentum(300, 100, 0.99) == pytest.approx(1.0)
    task = _tiny(ema_base=0.9)
    task.start_segment(6)
    assert task.ema_momentum() == pytest.approx(ema_momentum(6, 12, 0.9))
    with pytest.raises(RuntimeError, match="no EMA teacher"):
        _tiny().ema_momentum()


def test_weight_decay_split_no_decay_on_biases_and_norms():
    task = _tiny()
    names = {id(p): n for n, p in task.named_parameters()}
    decay, no_decay = task.parameter_groups()
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [names[id(p)] for p in decay["params"]] == ["linear.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["linear.bias", "norm.bias", "norm.weight"]
    # the downstream optimiser decays every trainable parameter (biases too); frozen ones never reach it
    (everything,) = _tiny(decay_all=True).parameter_groups()
    assert len(everything["params"]) == 4 and everything["weight_decay"] == 0.05


def test_hyperparameters_are_the_typed_sections_as_plain_values():
    assert dict(_tiny().hparams) == {"section": {"lr": 0.1}}


def test_non_finite_policy_raises_the_typed_error_or_skips():
    task = _tiny()
    with pytest.raises(NonFiniteLossError, match=r"at step 0; batch items: \[a, b\].*train.nonfinite=skip"):
        task.non_finite(torch.tensor(float("nan")), ["a", "b"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf\) at step 0\. Lower lr\.$"):
        _Tiny(Optimisation(0.1, 10), {}, NonFinitePolicy("stop", lr_key="lr", skip_key=None)).non_finite(torch.tensor(float("inf")))
    skipping = _Tiny(Optimisation(0.1, 10), {}, NonFinitePolicy("skip", max_skipped_fraction=0.2))
    skipping.seen_batches = 10
    assert skipping.non_finite(torch.tensor(float("nan")), ["a"]) is None and skipping.skipped_batches == 1
    skipping.non_finite(torch.tensor(float("nan")), ["a"])
    with pytest.raises(NonFiniteLossError, match="3 of 10 batches"):  # 3 > 0.2 * 10
        skipping.non_finite(torch.tensor(float("nan")), ["a"], ["a"])


def test_precision_rule(monkeypatch):
    assert resolve_precision(TrainerConfig(accelerator="cpu")) == "32-true"
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="bf16-mixed")) == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision(TrainerConfig()) == "bf16-mixed"  # auto on a GPU machine
    assert resolve_precision(TrainerConfig(accelerator="cpu")) == "32-true"  # a GPU the run does not use


def test_make_trainer_on_cpu():
    trainer = make_trainer(TrainerConfig(accelerator="cpu", devices=2, strategy="ddp"), max_steps=3, single_device=True, logger=False)
    assert trainer.max_steps == 3 and trainer.precision == "32-true" and trainer.num_devices == 1
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    assert make_trainer(TrainerConfig(accelerator="cpu", precision="bf16-mixed"), max_steps=1, logger=False).precision == "bf16-mixed"


def test_lightning_trainers_are_built_only_in_the_engine():
    pattern = re.compile(r"(?<![\w.])(?:L|lightning|pl|lightning\.pytorch)\.Trainer\(|(?<![\w.])Trainer\(")
    found = [
        f"{p.relative_to(PACKAGE.parent)}:{n}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found and all(f.startswith("insitu/engine/") for f in found), found
