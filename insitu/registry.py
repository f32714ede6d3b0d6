"""One registration pattern for every kind of component: adapters, objectives, domains, heads.

A component's module registers it with a decorator, ``@OBJECTIVES.register("dino")``, and the
component declares its typed options as a pydantic ``Options`` model. The table of each registry
below names the module that registers each name, so a name's module (and torch, pydicom, rasterio
or PyAV behind it) is imported only when that name is asked for: ``insitu.config`` lists names
without importing anything and imports only the modules a config names, to validate their options.
A new method is one file, one decorator and its line in the table here.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from insitu.errors import ConfigError

T = TypeVar("T")
C = TypeVar("C")


def join_and(names: list[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``: names quoted for a message."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


class NoOptions(BaseModel):
    """The options of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


ItemKind = Literal["images", "pairs", "clips", "fractals"]


@dataclass(frozen=True)
class Needs:
    """What a registered objective requires of the rest of a run; `insitu.config` checks it before anything loads.

    ``items``: what one training item must be: ``images`` (C×H×W), ``pairs`` (an image and its text,
    ``data.domain: pairs``), ``clips`` (T×C×H×W windows, the video domain's ``mode: clips``) or ``fractals``
    (generated images with their IFS labels, ``data.domain: fractals``), as the
    domain declares with ``Domain.yields``; ``frames``: the frames a clip needs (``data.options.clip_frames``).
    ``teacher``: the run keeps an EMA teacher (the pipeline builds one and the package stores it).
    ``cacheable_views``: a step only passes the loader's views to the models, so ``train.cached_views`` may
    cache the frozen prefix's output for them (which also needs adapters that start after block 0).
    ``text_tower``: the text encoder an image-text objective loads (``objective.options.text_encoder``).
    """

    items: ItemKind = "images"
    frames: int = 1
    teacher: bool = False
    cacheable_views: bool = False
    text_tower: str | None = None


class Registry(Generic[T]):
    """Names -> components of one kind, each with its ``Options``; unknown names raise `ConfigError` with a suggestion."""

    def __init__(self, kind: str, modules: dict[str, str]) -> None:
        self.kind = kind
        self.modules = dict(modules)  # name -> the module whose import registers it
        self._entries: dict[str, tuple[T, type[BaseModel]]] = {}

    def register(self, name: str, options: type[BaseModel] | None = None) -> Callable[[C], C]:
        """Decorator: register a class or factory under ``name``; its options default to its ``Options`` attribute."""
        if name not in self.modules:
            raise ValueError(f"{self.kind} {name!r} is not in its registry's table (insitu/registry.py): add its module there")

        def deco(component: C) -> C:
            self._entries[name] = (component, options or getattr(component, "Options", NoOptions))
            return component

        return deco

    def _entry(self, name: str) -> tuple[T, type[BaseModel]]:
        if not isinstance(name, str) or name not in self.modules:
            raise ConfigError(unknown_name_message(self.kind, str(name), list(self.modules)))
        if name not in self._entries:
            try:
                importlib.import_module(self.modules[name])
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    f"{self.kind.capitalize()} {name!r} is not available: {exc}. Install insitu with its dependencies."
                ) from exc
            if name not in self._entries:
                raise RuntimeError(f"{self.modules[name]} does not register {self.kind} {name!r}")
        return self._entries[name]

    def get(self, name: str) -> T:
        """The component registered under ``name`` (its module is imported on first use)."""
        return self._entry(name)[0]

    def options(self, name: str) -> type[BaseModel]:
        """The pydantic model of ``name``'s options."""
        return self._entry(name)[1]

    def names(self) -> list[str]:
        return sorted(self.modules)

    def unknown_option_hint(self, name: str, key: str, prefix: str) -> str:
        """For an option ``key`` that ``name`` does not take: the names that take it, or ``name``'s closest option."""
        owners = [n for n in self.names() if key in self.options(n).model_fields]
        if owners:
            return f": an option of {self.kind} {join_and(owners)}, not of {name!r}"
        return closest_field(self.options(name), (key,), prefix)

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


ADAPTERS: Registry[Any] = Registry(
    "adapter kind",
    {
        "bottleneck": "insitu.adapters.bottleneck",
        "sequential": "insitu.adapters.sequential",
        "lora": "insitu.adapters.lora",
        "spectral": "insitu.adapters.spectral",
    },
)
OBJECTIVES: Registry[Any] = Registry(
    "objective",
    {
        "dino": "insitu.objectives.dino",
        "simclr": "insitu.objectives.simclr",
        "rsp": "insitu.objectives.temporal",
        "cvrl": "insitu.objectives.temporal",
        "convirt": "insitu.objectives.convirt",
        "clip": "insitu.objectives.convirt",
        "glare": "insitu.objectives.glare",
        "sigreg": "insitu.objectives.sigreg",
        "self_distill": "insitu.objectives.self_distill",
        "graph_matching": "insitu.objectives.graph_matching",
        "mip": "insitu.objectives.mip",
    },
)
DOMAINS: Registry[Any] = Registry(
    "domain",
    {
        "images": "insitu.domains.images",
        "dicom": "insitu.domains.dicom",
        "geotiff": "insitu.domains.geotiff",
        "video": "insitu.domains.video",
        "pairs": "insitu.domains.pairs",
        "fractals": "insitu.domains.fractals",
    },
)
CLASSIFICATION_HEADS: Registry[Any] = Registry(
    "classification head", {"linear": "insitu.heads.classification", "mlp": "insitu.heads.classification"}
)
SEGMENTATION_HEADS: Registry[Any] = Registry(
    "segmentation head", {n: "insitu.heads.segmentation" for n in ("linear", "fpn", "upernet")}
)
REGISTRIES = (ADAPTERS, OBJECTIVES, DOMAINS, CLASSIFICATION_HEADS, SEGMENTATION_HEADS)  # prediction writers: each domain's write_predictions


class AdapterOptions(BaseModel):
    """The options every adapter kind shares (a run config's ``adapter.options``); each kind's module subclasses it.

    ``kind``: ``bottleneck`` (parallel to the MLP), ``sequential`` (Houlsby, after each sublayer) or
    ``lora`` (attention projections), written in a config as ``adapter.name``; the options are validated by
    that kind's ``Options``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: str = "bottleneck"
    blocks: Literal["all"] | int | list[int] = "all"

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        if isinstance(value, int) and value <= 0:
            raise ValueError("an integer means 'the last k blocks' and must be >= 1")
        return value


def adapter_options(section: AdapterOptions | BaseModel | dict[str, Any]) -> AdapterOptions:
    """An adapter section validated by its kind's registered ``Options``: a run config's ``{name, options}`` (a dict or
    `insitu.config.AdapterConfig`), or the flat ``{kind, blocks, ...}`` Python callers pass (``bottleneck`` when unnamed)."""
    if isinstance(section, AdapterOptions):
        return section
    if isinstance(section, BaseModel):
        section = section.model_dump()
    if "name" in section or "options" in section:
        section = {**section.get("options", {}), "kind": section.get("name", "bottleneck")}
    return ADAPTERS.options(section.get("kind", "bottleneck")).model_validate(section)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}."


def config_error(exc: ValidationError, where: str, hint: Callable[[tuple[Any, ...]], str], prefix: str = "") -> ConfigError:
    """One line per pydantic error, naming the dotted key; ``hint(loc)`` completes an unknown-key line."""
    lines = [f"Invalid config {where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"]))
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'{hint(err['loc'])}")
        elif err["type"] == "missing":
            lines.append(f"  missing required key '{loc}'")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a whole section's check: its message says what
            lines.append(f"  '{loc}': {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  '{loc}': {err['msg']} (got {err.get('input')!r})")
    return ConfigError("\n".join(lines))


def closest_field(model: type[BaseModel] | None, loc: tuple[Any, ...], prefix: str = "") -> str:
    """``; did you mean '<key>'?`` for the unknown key at ``loc`` in ``model`` (nested sections followed)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        model = _model_of(getattr(field, "annotation", None))
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1) if model else []
    return f"; did you mean '{'.'.join(str(p) for p in (*([prefix] if prefix else []), *loc[:-1], close[0]))}'?" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def validated(model: type[BaseModel], options: dict[str, Any], prefix: str, where: str) -> BaseModel:
    """``options`` validated by ``model`` and its bounds; a `ConfigError` names each bad key."""
    try:
        result = model.model_validate(options)
    except ValidationError as exc:
        known = f" (known: {', '.join(model.model_fields)})"
        raise config_error(exc, where, lambda loc: closest_field(model, loc, prefix) + known, prefix) from None
    problems = option_bound_problems(result, prefix)
    if problems:
        raise ConfigError("\n".join([f"Invalid config {where}:", *problems]))
    return result


def validate_options(model: type[BaseModel], options: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    """Validate a component's own options block; returns the completed (defaults filled) dict."""
    return validated(model, options, prefix, where).model_dump(mode="json")


# Bounds for option fields whose model declares none: sizes are positive, probabilities and
# momenta lie in [0, 1], temperatures are positive, and no float is NaN or infinite.
POSITIVE_INT_OPTION = re.compile(r"(^|_)(dim|size|heads|length|regions)$")
UNIT_INTERVAL_OPTION = re.compile(r"(^|_)(prob|probability|momentum|fraction)($|_)")
POSITIVE_FLOAT_OPTION = re.compile(r"(^|_)temp(erature)?$")


def option_bound_problems(options: BaseModel, prefix: str) -> list[str]:
    """Out-of-range values in a validated options model (nested models included), one line each."""
    problems = []
    for name in type(options).model_fields:
        value, key = getattr(options, name), f"{prefix}.{name}"
        if isinstance(value, BaseModel):
            problems += option_bound_problems(value, key)
            continue
        numbers = value if isinstance(value, (tuple, list)) else [value]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"  '{key}': must be a finite number (got {v!r})")
            elif isinstance(v, int) and POSITIVE_INT_OPTION.search(name) and v <= 0:
                problems.append(f"  '{key}': must be a positive whole number (got {v!r})")
            elif UNIT_INTERVAL_OPTION.search(name) and not 0 <= v <= 1:
                problems.append(f"  '{key}': must lie in [0, 1] (got {v!r})")
            elif POSITIVE_FLOAT_OPTION.search(name) and v <= 0:
                problems.append(f"  '{key}': must be > 0 (got {v!r})")
    return problems
