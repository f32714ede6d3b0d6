"""Pretrain a small ViT from scratch on generated fractal images: an ordinary run config.

A base run is a `RunConfig` with ``data.domain: fractals`` (insitu.domains.fractals: a seeded stream,
no files), ``train.full_finetune: true`` (every weight trains) and one of two objectives: ``mip``,
the multi-instance prediction of Anderson & Farrell (insitu.objectives.mip: a fixed bank of IFS
systems are the classes, the ViT predicts which are present), or ``dino`` (insitu.objectives.dino:
self-distillation with multi-crop and an EMA teacher, the same DINO loss as adapter pretraining).
This makes insitu's embedded base: a backbone with real (if generic) features that ships inside the
package, so the demo, the tests and air-gapped users start from something better than random
weights. The output, in the claimed run folder, is a safetensors file of the exported ViT (the
student for mip, the EMA teacher for dino; fp16) plus a card recording the architecture, steps,
images seen, command, seed, wall time and device, both written atomically, every
``train.checkpoint_every`` steps and at the end.
"""

from __future__ import annotations

import copy
import importlib.metadata
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightly.models.utils import update_momentum
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from insitu.backbones import ViTBackbone, create_backbone
from insitu.config import RunConfig, load_config, objective_needs
from insitu.domains import create_domain
from insitu.domains.fractals import NUM_TEXTURES, FractalStream
from insitu.engine import NonFinitePolicy, Optimisation, Task, base_ema_momentum, make_trainer
from insitu.errors import ConfigError
from insitu.io import atomic_path, claim_folder, write_json
from insitu.objectives import create_objective
from insitu.objectives.augment import worker_seed
from insitu.objectives.mip import MIPObjective
from insitu.objectives.views import MultiCrop
from insitu.weights import PACKAGED, shipped_card

FRACTAL_MEAN, FRACTAL_STD = [0.40, 0.40, 0.40], [0.25, 0.25, 0.25]
BASE_OBJECTIVES = ("mip", "dino")

_MEAN, _STD = torch.tensor(FRACTAL_MEAN).view(3, 1, 1), torch.tensor(FRACTAL_STD).view(3, 1, 1)


def _normalise(img: torch.Tensor) -> torch.Tensor:
    return (img - _MEAN) / _STD


def is_base_run(cfg: RunConfig) -> bool:
    """A run that pretrains a base on generated fractals (``data.domain: fractals``), not adapters on data."""
    return cfg.data.domain == "fractals"


def check_base_config(cfg: RunConfig, where: str = "<config>") -> None:
    """What a base run needs beyond `insitu.config`'s checks; one `ConfigError` lists every miss."""
    problems = []
    if cfg.data.domain != "fractals":
        problems.append(f"  'data.domain': base pretraining streams generated fractals; set data.domain: fractals (got {cfg.data.domain})")
    if cfg.objective.name not in BASE_OBJECTIVES:
        problems.append(f"  'objective.name': a base is pretrained with {' or '.join(BASE_OBJECTIVES)} (got {cfg.objective.name})")
    if not cfg.train.full_finetune:
        problems.append("  'train.full_finetune': a base trains every weight from its start; set train.full_finetune: true")
    if cfg.data.image_size != cfg.backbone.img_size:
        problems.append(
            f"  'data.image_size': the fractals are generated at the backbone's size; set it to backbone.img_size "
            f"{cfg.backbone.img_size} (got {cfg.data.image_size})"
        )
    if cfg.backbone.in_chans != 3:
        problems.append(f"  'backbone.in_chans': the fractals are RGB; set backbone.in_chans: 3 (got {cfg.backbone.in_chans})")
    if cfg.train.cached_views:
        problems.append("  'train.cached_views': a base trains every block, so nothing can be cached; set train.cached_views: 0")
    if problems:
        raise ConfigError("\n".join([f"Invalid base-pretrain config {where}:", *problems]))


def load_base_config(path: Path, overrides: list[str]) -> RunConfig:
    """A base run's config: `insitu.config.load_config` and `check_base_config`."""
    cfg = load_config(path, overrides)
    check_base_config(cfg, str(path))
    return cfg


class _Images(IterableDataset):
    """The fractal stream as training batches: ``{image, systems[, hues, texture]}`` (mip) or ``{views}`` (dino).

    With views, each DataLoader worker restarts the crop's generator from its own seed."""

    def __init__(self, stream: FractalStream, crop: MultiCrop | None = None) -> None:
        super().__init__()
        self.stream, self.crop = stream, crop

    def __iter__(self):  # noqa: ANN204
        if self.crop is None:
            for img, systems, *extra in self.stream:
                yield {"image": _normalise(img), "systems": systems, **dict(zip(("hues", "texture"), extra, strict=False))}
            return
        if get_worker_info() is not None:  # in the main process the crop keeps its run-seeded generator
            self.crop.reseed(worker_seed())
        for img in self.stream:
            yield {"views": self.crop(_normalise(img))}


class BaseTask(Task):
    """A ViT trained from scratch (every parameter) by a base objective; the EMA teacher too when it has one."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg  # before Task.__init__, which calls configure_models
        t = cfg.train
        ema = None
        if objective_needs(cfg).teacher:
            ema = t.ema_momentum if t.ema_momentum is not None else base_ema_momentum(t.max_steps, t.ema_half_life)
        super().__init__(
            Optimisation(t.lr, t.max_steps, t.warmup_steps, t.min_lr, t.weight_decay, fused=t.fused_optimizer, ema_base=ema),
            {"data": cfg.data, "backbone": cfg.backbone, "objective": cfg.objective, "train": t},
            NonFinitePolicy("stop", lr_key="train.lr", skip_key=None),
        )

    def configure_models(self) -> None:
        cfg = self.cfg
        self.student = create_backbone(cfg.backbone).set_trainable(True)
        self.teacher = copy.deepcopy(self.student).set_trainable(False) if self.optimisation.ema_base is not None else None
        self.objective = create_objective(
            cfg.objective.name, self.student.embed_dim, self.student.patch_size, cfg.data.image_size, cfg.objective.options, cfg.train.max_steps
        )

    @property
    def exported(self) -> ViTBackbone:
        """The ViT that ships: the EMA teacher when the objective trains one, else the student."""
        return self.teacher if self.teacher is not None else self.student

    def training_text(self) -> str:
        if isinstance(self.objective, MIPObjective):
            return self.objective.describe(self.cfg.backbone.weights)
        start = f"continued from {self.cfg.backbone.weights}" if self.cfg.backbone.weights else "from scratch"
        return f"DINO self-distillation {start} (all parameters), teacher weights exported"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.objective.step = self.global_step
        out = self.objective(batch, self.student, self.teacher)
        loss = out["loss"]
        if not torch.isfinite(loss):
            self.non_finite(loss)  # raises NonFiniteLossError (base pretraining always stops)
        bs = (batch["image"] if "image" in batch else batch["views"][0]).shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in out.items():
            if name != "loss":
                self.log(name if name.startswith("health/") else f"train/{name}", value, batch_size=bs)
        return loss

    def update_teachers(self, momentum: float) -> None:
        if self.teacher is not None:
            update_momentum(self.student, self.teacher, momentum)
        self.objective.update_teacher(momentum)


class _PeriodicExport(L.Callback):
    """Export the base every ``train.checkpoint_every`` steps, so a stopped run still leaves a usable base."""

    def __init__(self, cfg: RunConfig, start: float) -> None:
        self.cfg, self.start = cfg, start

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step, t = trainer.global_step, self.cfg.train
        if step % t.checkpoint_every == 0 and step < t.max_steps:
            export_base(module, self.cfg, time.perf_counter() - self.start, trainer)


def base_pretrain(cfg: RunConfig, quiet: bool = False, overwrite: bool = False) -> Path:
    """Train the base and write ``<run_dir>/<name>.safetensors`` (fp16) + ``<name>.json`` card; returns the weights.

    The run folder is claimed first (:func:`insitu.io.claim_folder`): insitu writes only into a folder
    it created and replaces an earlier result only with ``overwrite``."""
    check_base_config(cfg)
    folder = claim_folder(cfg.run_dir, "base pretrain", overwrite, lock=True)
    try:
        return _run(cfg, quiet)
    finally:
        folder.record()
        folder.unlock()


def _run(cfg: RunConfig, quiet: bool) -> Path:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = BaseTask(cfg)
    domain, size, t = create_domain(cfg.data.domain, cfg.data.options), cfg.data.image_size, cfg.train
    offset = next_stream_offset(init_streams(cfg.backbone.weights), cfg.seed)
    if isinstance(module.objective, MIPObjective):
        bank = module.objective.system_bank(cfg.seed)
        data = _Images(domain.stream(size, cfg.seed, bank=bank, hue_bins=module.objective.opts.hue_bins, offset=offset))
    else:
        data = _Images(domain.stream(size, cfg.seed, offset=offset), module.objective.view_transform())
    loader = DataLoader(data, batch_size=t.batch_size, num_workers=cfg.data.num_workers)
    start = time.perf_counter()
    trainer = make_trainer(
        cfg.trainer,
        [_PeriodicExport(cfg, start)],
        max_steps=t.max_steps,
        quiet=quiet,
        single_device=True,
        logger=L.pytorch.loggers.CSVLogger(cfg.run_dir, name="logs", version=""),
        enable_checkpointing=False,
        gradient_clip_val=t.grad_clip,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=min(t.log_every, max(1, t.max_steps // 10)),
    )
    trainer.fit(module, loader)
    return export_base(module, cfg, time.perf_counter() - start, trainer)


def export_base(module: BaseTask, cfg: RunConfig, wall: float, trainer: L.Trainer) -> Path:
    """The exported ViT (fp16 safetensors) and its card, both written atomically into the run folder."""
    run_dir, t = cfg.run_dir, cfg.train
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.exported.timm_state_dict().items()}
    weights = run_dir / f"{cfg.name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    device = (
        torch.cuda.get_device_name()
        if next(module.parameters()).is_cuda
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    hue_bins = cfg.objective.options.get("hue_bins", 0)
    chain = init_streams(cfg.backbone.weights)
    streams = [*chain, {"seed": cfg.seed, "offset": next_stream_offset(chain, cfg.seed), "images": trainer.global_step * t.batch_size}]
    card = {
        "name": cfg.name,
        "architecture": cfg.backbone.model_dump(mode="json", exclude={"weights", "pretrained"}),
        "training": module.training_text(),
        "data": "procedurally generated IFS fractal images (insitu.domains.fractals), no stored data"
        + (f"; instances coloured by {hue_bins} hue classes on {NUM_TEXTURES} background texture classes" if hue_bins else ""),
        "init": cfg.backbone.weights,
        "steps": trainer.global_step,
        "batch_size": t.batch_size,
        "images_seen": trainer.global_step * t.batch_size,
        "images_seen_total": trainer.global_step * t.batch_size + _init_images(cfg.backbone.weights),
        "distinct_images_seen_total": distinct_images(streams),
        "streams": streams,
        "views": cfg.objective.options.get("views"),
        "normalizer": {"mean": FRACTAL_MEAN, "std": FRACTAL_STD},
        "seed": cfg.seed,
        "wall_s": round(wall, 1),
        "device": device,
        "dtype": "float16",
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "final_set_acc": _metric(trainer, "train/set_acc"),
        "final_texture_acc": _metric(trainer, "train/texture_acc"),
        "final_layout_mse": _metric(trainer, "train/layout_mse"),
        "command": " ".join(shlex.quote(a) for a in ["insitu", *sys.argv[1:]]),
        "config": cfg.model_dump(mode="json"),
        "insitu_version": importlib.metadata.version("insitu"),  # the installed distribution's version, = insitu.__version__
    }
    write_json(run_dir / f"{cfg.name}.json", card)
    return weights


def _metric(trainer: L.Trainer, name: str) -> float | None:
    return float(trainer.callback_metrics[name]) if name in trainer.callback_metrics else None


def init_streams(weights: str | None) -> list[dict[str, int]]:
    """The generated streams an embedded base's chain was trained on: ``{seed, offset, images}`` per run.

    Cards written before streams were recorded say only their seed and images seen; those runs all
    drew offset 0 (a continued run replayed its init's first images), and the chain is rebuilt
    from their ``init`` fields. Random init or a weights file: an empty chain.
    """
    if not (weights and weights.startswith(PACKAGED)):
        return []
    card = shipped_card(weights[len(PACKAGED) :])
    if "streams" in card:
        return [{k: int(v) for k, v in s.items()} for s in card["streams"]]
    return [*init_streams(card.get("init")), {"seed": int(card["seed"]), "offset": 0, "images": int(card["images_seen"])}]


def next_stream_offset(chain: list[dict[str, int]], seed: int) -> int:
    """A stream offset no earlier run of the chain with the same seed used (0 when none did)."""
    used = [s["offset"] for s in chain if s["seed"] == seed]
    return max(used) + 1 if used else 0


def distinct_images(streams: list[dict[str, int]]) -> int:
    """Distinct generated images a chain saw: runs on the same stream replay it from its start, so
    each ``(seed, offset)`` stream counts once, with the most images any run drew from it."""
    most: dict[tuple[int, int], int] = {}
    for s in streams:
        key = (s["seed"], s["offset"])
        most[key] = max(most.get(key, 0), s["images"])
    return sum(most.values())


def _init_images(weights: str | None) -> int:
    """Images an embedded base the run started from had already seen (0 for random init or a file)."""
    if weights and weights.startswith(PACKAGED):
        card = shipped_card(weights[len(PACKAGED) :])
        return int(card.get("images_seen_total", card.get("images_seen", 0)))
    return 0
