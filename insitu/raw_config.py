"""Edits of a config before it is validated: dotted ``key.sub=value`` overrides and deep merges.

Both work on plain mappings as read from YAML; `insitu.config` validates the result once.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from insitu.errors import ConfigError


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in override:
        raise ConfigError(f"Override {override!r} must look like key.sub=value (for example train.max_steps=10).")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override {override!r}: {part!r} is a value, not a section.")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0]
        raise ConfigError(
            f"Override {key.strip()!r}: the value {value!r} is not plain YAML ({detail}). Pass a number, true/false, "
            "a string, [a, list] or {a: mapping}; tags such as !!python/object are never loaded."
        ) from None


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any], leaves: Collection[str] = ()) -> dict[str, Any]:
    """A new mapping: ``base`` with ``extra``'s keys set, descending into mappings present in both.

    Keys named in ``leaves`` (for example a component's free-form ``kwargs``) are replaced whole,
    never merged. The merge changes neither input, and values taken from ``extra`` are copied, so
    later edits of the result leave ``extra`` (a shipped constant, say) untouched; sub-mappings of
    ``base`` that ``extra`` does not touch are shared with the result, not copied.
    """
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in leaves:
            out[key] = deep_merge(out[key], value, leaves)
        else:
            out[key] = copy.deepcopy(value)
    return out
