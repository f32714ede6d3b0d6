"""The learning-rate and EMA-momentum schedules every task uses, as plain functions of the step."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, lr: float = 1.0, min_lr: float = 0.0) -> float:
    """The factor on the base ``lr`` at ``step``: linear warm-up, then a cosine down to ``min_lr`` at ``total_steps``.

    Warm-up step ``s`` (``s < warmup_steps``) gives ``(s + 1) / warmup_steps``; afterwards the factor
    falls from 1 along half a cosine and stays at ``min_lr / lr`` from ``total_steps`` on. With
    ``min_lr = 0`` (the default) ``lr`` does not enter and the factor is the plain cosine.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * t))
    if min_lr == 0.0:
        return cosine
    return (min_lr + (lr - min_lr) * cosine) / lr


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """The teacher's EMA momentum at ``step``: a cosine from ``base`` to 1 over the run (as in DINO/BYOL)."""
    t = min(1.0, step / max(1, total_steps))
    return 1 - (1 - base) * (math.cos(math.pi * t) + 1) / 2


def base_ema_momentum(max_steps: int, half_life: float = 0.1, low: float = 0.9, high: float = 0.996) -> float:
    """The momentum whose teacher half-life is ``half_life * max_steps`` steps, clipped to [low, high].

    A teacher at momentum m keeps half of a step's state for ln 0.5 / ln m steps. A fixed 0.996
    (DINO's, made for 10^5-step runs) leaves a 150-step teacher about 3/4 at its initial state;
    tying the half-life to the run length lets the teacher follow the student in any run length
    (300 steps: 0.977, 1,000: 0.993, >= 1,733: 0.996).
    """
    m = 0.5 ** (1.0 / max(1e-9, half_life * max_steps))
    return min(high, max(low, m))
