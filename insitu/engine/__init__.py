"""The one training engine: every Lightning run in insitu is a `Task` fitted by a trainer from `make_trainer`.

`Task` (``task.py``) holds what every training task shares: one AdamW with the weight-decay split, one
warm-up + cosine learning-rate schedule, one EMA momentum schedule, one non-finite-loss policy and the
hyperparameters of the typed config sections it uses. `make_trainer` (``trainer.py``) builds every
``lightning.Trainer`` with one precision rule and atomic checkpoints. The tasks are `PretrainTask`
(insitu.pipelines.pretrain), `DownstreamTask` (insitu.pipelines.downstream), `SiteTask`
(insitu.federated.site) and the fractal base's tasks (insitu.pipelines.base_pretrain).
"""

from insitu.engine.schedules import base_ema_momentum, ema_momentum, warmup_cosine
from insitu.engine.task import NonFinitePolicy, Optimisation, Task
from insitu.engine.trainer import AtomicCheckpointIO, make_trainer, resolve_precision

__all__ = [
    "AtomicCheckpointIO",
    "NonFinitePolicy",
    "Optimisation",
    "Task",
    "base_ema_momentum",
    "ema_momentum",
    "make_trainer",
    "resolve_precision",
    "warmup_cosine",
]
