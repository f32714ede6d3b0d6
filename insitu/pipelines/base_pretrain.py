"""Pretrain a small ViT from scratch on generated fractal images.

Two objectives, both full-parameter: ``dino`` (self-distillation with multi-crop and an EMA teacher)
and ``mip``, the multi-instance prediction of Anderson & Farrell ("Improving Fractal
Pre-training"): a fixed bank of IFS systems are the classes, every image holds 1-3 instances drawn
from it, and the ViT predicts which systems are present (multi-label BCE on CLS + mean patch token).
This makes insitu's embedded base: a backbone with real (if generic) features that ships inside
the package, so the demo, the tests and air-gapped users start from something better than random
weights. The output is a safetensors file of the teacher ViT (fp16) plus a card recording the
architecture, steps, images seen, command, seed, wall time and device.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from pydantic import Field
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from insitu.backbones import ViTBackbone, create_backbone
from insitu.config import BackboneConfig, Strict, TrainerConfig
from insitu.domains.fractals import NUM_TEXTURES, FractalStream, SystemBank
from insitu.engine import NonFinitePolicy, Optimisation, Task, make_trainer
from insitu.errors import ConfigError
from insitu.objectives.augment import worker_seed
from insitu.objectives.views import MultiCrop, MultiCropOptions
from insitu.raw_config import apply_override, deep_merge
from insitu.weights import PACKAGED, shipped_card

FRACTAL_MEAN, FRACTAL_STD = [0.40, 0.40, 0.40], [0.25, 0.25, 0.25]


class BasePretrainConfig(Strict):
    """``insitu base pretrain`` settings."""

    name: str = "fractal_vit_tiny"
    objective: Literal["dino", "mip"] = "dino"
    seed: int = 0
    out_dir: Path = Path("insitu-runs/base")
    backbone: BackboneConfig = Field(
        default_factory=lambda: BackboneConfig(name="vit_tiny_patch16_224", patch_size=8, img_size=64, kwargs={"depth": 6})
    )
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.04
    ema_momentum: float = 0.99
    out_dim: int = 2048
    teacher_temp: float = 0.04
    views: MultiCropOptions = Field(
        default_factory=lambda: MultiCropOptions(
            global_crops=2, local_crops=4, global_scale=(0.35, 1.0), local_scale=(0.08, 0.35), intensity=0.1
        )
    )
    num_systems: int = Field(100, ge=2, description="mip: size of the IFS system bank (the classes)")
    bank_seed: int | None = Field(
        None, description="mip: seed of the IFS system bank (default: seed); keep a continued base's bank while varying seed"
    )
    grey_prob: float = Field(0.0, ge=0.0, le=1.0, description="mip: share of images turned grey (helps 1-band users)")
    hue_bins: int = Field(
        0, ge=0, le=64, description="mip: > 0 also predicts each instance's hue class (of this many) and the background's texture class"
    )
    colour_layout: int = Field(
        0,
        ge=0,
        le=16,
        description="mip: > 0 also regresses the image's colour on this g x g grid (its average pool), keeping colour in the features",
    )
    colour_layout_weight: float = Field(1.0, gt=0.0, description="mip: weight of the colour-layout MSE against the system BCE")
    num_workers: int = 1
    export_every: int = Field(100, gt=0)
    accelerator: str = "auto"
    precision: str = "auto"


_MEAN, _STD = torch.tensor(FRACTAL_MEAN).view(3, 1, 1), torch.tensor(FRACTAL_STD).view(3, 1, 1)


def _normalise(img: torch.Tensor) -> torch.Tensor:
    return (img - _MEAN) / _STD


class _Views(IterableDataset):
    """Multi-crop views of the fractal stream; each DataLoader worker restarts the crop's generator from its own seed."""

    def __init__(self, stream: FractalStream, crop: MultiCrop) -> None:
        super().__init__()
        self.stream, self.crop = stream, crop

    def __iter__(self):  # noqa: ANN204
        if get_worker_info() is not None:  # in the main process the crop keeps its run-seeded generator
            self.crop.reseed(worker_seed())
        for img in self.stream:
            yield self.crop(_normalise(img))


def _collate(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([views[v] for views in batch]) for v in range(len(batch[0]))]


class _PeriodicExport(L.Callback):
    """Export the teacher every ``export_every`` steps, so a stopped run still leaves a usable base."""

    def __init__(self, cfg: BasePretrainConfig, run_dir: Path, start: float) -> None:
        self.cfg, self.run_dir, self.start = cfg, run_dir, start

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.cfg.export_every == 0 and trainer.global_step < self.cfg.steps:
            export_base(module, self.cfg, self.run_dir, time.perf_counter() - self.start, trainer)


class _Labelled(IterableDataset):
    def __init__(self, stream: FractalStream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self):  # noqa: ANN204
        for img, *labels in self.stream:
            yield _normalise(img), *labels


class _BaseTask(Task):
    """A fractal base task: AdamW without weight decay on biases and norms, linear warm-up then cosine to ``min_lr``."""

    training_text: str

    def __init__(self, cfg: BasePretrainConfig, ema_base: float | None = None) -> None:
        self.cfg = cfg  # before Task.__init__, which calls configure_models
        super().__init__(
            Optimisation(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr, cfg.weight_decay, ema_base=ema_base),
            {"base": cfg},
            NonFinitePolicy("stop", lr_key="lr", skip_key=None),
        )

    @property
    def exported(self) -> ViTBackbone:
        raise NotImplementedError


class MIPModule(_BaseTask):
    """Multi-instance prediction: ViT + linear multi-label head over the system bank; the ViT is exported."""

    def configure_models(self) -> None:
        cfg = self.cfg
        self.training_text = "multi-instance prediction (which IFS systems are in the image, multi-label BCE) from scratch, all parameters"
        self.student = create_backbone(cfg.backbone).set_trainable(True)
        self.head = torch.nn.Linear(2 * self.student.embed_dim, cfg.num_systems)
        if cfg.backbone.weights:
            self.training_text = self.training_text.replace("from scratch", f"continued from {cfg.backbone.weights}")
        if cfg.hue_bins:
            self.training_text = self.training_text.replace(
                "(which IFS systems", "(which IFS systems, which hue classes and which background texture"
            )
            self.hue_head = torch.nn.Linear(2 * self.student.embed_dim, cfg.hue_bins)
            self.texture_head = torch.nn.Linear(2 * self.student.embed_dim, NUM_TEXTURES)
        if cfg.colour_layout:
            self.training_text += f" + the image's colour on a {cfg.colour_layout}x{cfg.colour_layout} grid (MSE)"
            self.layout_head = torch.nn.Linear(2 * self.student.embed_dim, 3 * cfg.colour_layout**2)

    @property
    def exported(self) -> ViTBackbone:
        return self.student

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, labels, *extra = batch
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        grey = torch.rand(x.shape[0], device=x.device) < self.cfg.grey_prob
        x = torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
        cls, patches, _ = self.student.forward_tokens(x)
        pooled = torch.cat([cls, patches.mean(1)], 1)
        logits = self.head(pooled)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        if extra:  # hue classes (not for grey images: their hue is gone) and texture class
            hues, texture = extra
            hue_loss = torch.nn.functional.binary_cross_entropy_with_logits(self.hue_head(pooled), hues, reduction="none").mean(1)
            hue_loss = (hue_loss * (~grey).float()).sum() / (~grey).float().sum().clamp_min(1.0)
            texture_logits = self.texture_head(pooled)
            texture_loss = torch.nn.functional.cross_entropy(texture_logits, texture)
            loss = loss + hue_loss + texture_loss
            self.log("train/hue_loss", hue_loss, batch_size=x.shape[0])
            self.log("train/texture_acc", (texture_logits.argmax(1) == texture).float().mean(), prog_bar=True, batch_size=x.shape[0])
        if self.cfg.colour_layout:  # the (flipped, maybe grey) input's own colours: no label, keeps colour in the features
            target = torch.nn.functional.adaptive_avg_pool2d(x, self.cfg.colour_layout).flatten(1)
            layout_mse = torch.nn.functional.mse_loss(self.layout_head(pooled), target)
            loss = loss + self.cfg.colour_layout_weight * layout_mse
            self.log("train/layout_mse", layout_mse, prog_bar=True, batch_size=x.shape[0])
        if not torch.isfinite(loss):
            self.non_finite(loss)  # raises NonFiniteLossError (base pretraining always stops)
        with torch.no_grad():  # exact-set accuracy over the images' top-k systems (k = instances present)
            k = labels.sum(1).long()
            ranked = logits.argsort(1, descending=True)
            hit = torch.stack([labels[i, ranked[i, : k[i]]].sum() == k[i] for i in range(len(k))]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/set_acc", hit, prog_bar=True, batch_size=x.shape[0])
        return loss


class BasePretrainModule(_BaseTask):
    """Student ViT + head trained with DINO; the teacher (ViT + head) is their EMA."""

    training_text = "DINO self-distillation from scratch (all parameters), teacher weights exported"

    def __init__(self, cfg: BasePretrainConfig) -> None:
        super().__init__(cfg, ema_base=cfg.ema_momentum)

    def configure_models(self) -> None:
        cfg = self.cfg
        self.student = create_backbone(cfg.backbone).set_trainable(True)
        self.teacher = copy.deepcopy(self.student).set_trainable(False)
        dim = self.student.embed_dim
        self.head = DINOProjectionHead(dim, 512, 128, cfg.out_dim)
        self.teacher_head = DINOProjectionHead(dim, 512, 128, cfg.out_dim)
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.teacher_head.requires_grad_(False)
        self.loss = DINOLoss(output_dim=cfg.out_dim, teacher_temp=cfg.teacher_temp)

    def training_step(self, views: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        n_global = self.cfg.views.global_crops
        with torch.no_grad():
            t_out = [self.teacher_head(self.teacher.forward_tokens(v)[0]) for v in views[:n_global]]
        s_out = [self.head(self.student.forward_tokens(v)[0]) for v in views]
        loss = self.loss(t_out, s_out)
        if not torch.isfinite(loss):
            self.non_finite(loss)  # raises NonFiniteLossError (base pretraining always stops)
        self.log("train/loss", loss, prog_bar=True, batch_size=views[0].shape[0])
        return loss

    def update_teachers(self, momentum: float) -> None:
        update_momentum(self.student, self.teacher, momentum)
        update_momentum(self.head, self.teacher_head, momentum)

    @property
    def exported(self) -> ViTBackbone:
        return self.teacher


def load_base_config(path: Path | None, overrides: list[str]) -> BasePretrainConfig:
    # start from the defaults so that overriding one backbone key keeps the others
    raw: dict[str, Any] = deep_merge(
        BasePretrainConfig().model_dump(mode="json"), yaml.safe_load(Path(path).read_text()) if path else {}, leaves={"kwargs"}
    )
    for o in overrides:
        apply_override(raw, o)
    try:
        return BasePretrainConfig.model_validate(raw)
    except Exception as exc:  # noqa: BLE001 - pydantic errors become one typed message
        raise ConfigError(f"Invalid base-pretrain config {path}: {exc}") from None


def system_bank(cfg: BasePretrainConfig) -> SystemBank:
    """The IFS systems that are the classes: seeded by ``bank_seed``, else by ``seed``."""
    return SystemBank(cfg.num_systems, seed=cfg.seed if cfg.bank_seed is None else cfg.bank_seed)


def base_pretrain(cfg: BasePretrainConfig, quiet: bool = False) -> Path:
    """Train the base and write ``<out_dir>/<name>.safetensors`` (fp16) + ``<name>.json`` card."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module: MIPModule | BasePretrainModule
    if cfg.objective == "mip":
        module = MIPModule(cfg)
        bank = system_bank(cfg)
        data: IterableDataset = _Labelled(FractalStream(cfg.backbone.img_size, cfg.seed, bank=bank, hue_bins=cfg.hue_bins))
        loader = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    else:
        module = BasePretrainModule(cfg)
        crop = MultiCrop(cfg.backbone.img_size, module.student.patch_size, cfg.views)
        data = _Views(FractalStream(cfg.backbone.img_size, cfg.seed), crop)
        loader = DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_collate)
    run_dir = cfg.out_dir / cfg.name
    start = time.perf_counter()
    trainer = make_trainer(
        TrainerConfig(accelerator=cfg.accelerator, precision=cfg.precision),
        [_PeriodicExport(cfg, run_dir, start)],
        max_steps=cfg.steps,
        quiet=quiet,
        single_device=True,
        logger=L.pytorch.loggers.CSVLogger(run_dir, name="logs", version=""),
        enable_checkpointing=False,
        gradient_clip_val=3.0,
        log_every_n_steps=min(20, max(1, cfg.steps // 10)),
    )
    trainer.fit(module, loader)
    wall = time.perf_counter() - start
    return export_base(module, cfg, run_dir, wall, trainer)


def export_base(module: MIPModule | BasePretrainModule, cfg: BasePretrainConfig, run_dir: Path, wall: float, trainer: L.Trainer) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.exported.timm_state_dict().items()}
    weights = run_dir / f"{cfg.name}.safetensors"
    save_file(state, str(weights))
    device = (
        torch.cuda.get_device_name()
        if next(module.parameters()).is_cuda
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    card = {
        "name": cfg.name,
        "architecture": cfg.backbone.model_dump(mode="json", exclude={"weights", "pretrained"}),
        "training": module.training_text,
        "data": "procedurally generated IFS fractal images (insitu.domains.fractals), no stored data"
        + (f"; instances coloured by {cfg.hue_bins} hue classes on {NUM_TEXTURES} background texture classes" if cfg.hue_bins else ""),
        "init": cfg.backbone.weights,
        "steps": trainer.global_step,
        "batch_size": cfg.batch_size,
        "images_seen": trainer.global_step * cfg.batch_size,
        "images_seen_total": trainer.global_step * cfg.batch_size + _init_images(cfg.backbone.weights),
        "views": cfg.views.model_dump(mode="json"),
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
        "config": json.loads(cfg.model_dump_json()),
        "insitu_version": importlib.metadata.version("insitu"),  # the installed distribution's version, = insitu.__version__
    }
    (run_dir / f"{cfg.name}.json").write_text(json.dumps(card, indent=2))
    return weights


def _metric(trainer: L.Trainer, name: str) -> float | None:
    return float(trainer.callback_metrics[name]) if name in trainer.callback_metrics else None


def _init_images(weights: str | None) -> int:
    """Images an embedded base the run started from had already seen (0 for random init or a file)."""
    if weights and weights.startswith(PACKAGED):
        card = shipped_card(weights[len(PACKAGED) :])
        return int(card.get("images_seen_total", card.get("images_seen", 0)))
    return 0
