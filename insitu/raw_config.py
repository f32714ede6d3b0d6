"""Edits of a config before it is validated: dotted ``key.sub=value`` overrides, deep merges, and old shapes upgraded.

All work on plain mappings as read from YAML; `insitu.config` validates the result once. Every component section
has one shape, ``{name, options}``; `upgrade_config` rewrites the older flat ones (``adapter: {kind, blocks, ...}``,
``downstream: {head: fpn, decoder_dim: 8}``) into it, with a one-line deprecation note, so configs in user
repositories and the ``config.yaml`` of old run and head folders still load.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from insitu.errors import ConfigError

log = logging.getLogger("insitu")
_noted: set[str] = set()  # deprecation lines already logged in this process (each is said once)

# DownstreamConfig's old flat head options with their old defaults: a default was offered to every head and is dropped
# (each head's own default is the same), any other value moves to downstream.head.options (where a head that does not
# take it is a ConfigError, as before)
OLD_HEAD_OPTIONS = {"hidden_dim": 256, "decoder_dim": 64}


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


def config_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` upgraded to the current shapes, then each ``key.sub=value`` applied (an old flat key lands where it now lives)."""
    raw = upgrade_config(raw)
    for override in overrides:
        key, sep, value = override.partition("=")
        new = upgrade_key(key.strip(), value)
        if sep and new != key.strip():
            _note(f"Deprecated override key {key.strip()!r}: read as {new!r} (component sections are {{name, options}}).")
        apply_override(raw, f"{new}={value}" if sep else override)
    return raw


def upgrade_key(key: str, value: str = "") -> str:
    """Where an old flat dotted key lives in the ``{name, options}`` shape (``adapter.blocks`` -> ``adapter.options.blocks``)."""
    parts = key.split(".")
    if parts[0] == "adapter" and len(parts) > 1 and parts[1] not in ("name", "options"):
        return "adapter.name" if parts[1:] == ["kind"] else ".".join(["adapter", "options", *parts[1:]])
    if parts[0] == "downstream" and len(parts) > 1 and parts[1] in OLD_HEAD_OPTIONS:
        return ".".join(["downstream", "head", "options", *parts[1:]])
    if parts == ["downstream", "head"] and not isinstance(_yaml_or_none(value), dict):
        return "downstream.head.name"
    return key


def _yaml_or_none(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return None


def upgrade_config(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the old flat component sections rewritten as ``{name, options}`` (a new mapping; ``raw`` is unchanged).

    ``adapter: {kind: lora, blocks: 2, rank: 4}`` -> ``adapter: {name: lora, options: {blocks: 2, rank: 4}}``;
    ``downstream: {head: fpn, decoder_dim: 8}`` -> ``downstream: {head: {name: fpn, options: {decoder_dim: 8}}}``.
    Flat keys next to a new-shape section (an old override on a new config) move into its options and win.
    One deprecation line is logged per section rewritten; a section already in the new shape is left as it is.
    """
    out = dict(raw)
    adapter = out.get("adapter")
    if isinstance(adapter, Mapping) and set(adapter) - {"name", "options"}:
        if "kind" in adapter and "name" in adapter:
            raise ConfigError(
                f"Invalid config: 'adapter' has both kind ({adapter['kind']!r}, the old shape) and name ({adapter['name']!r}); "
                "keep adapter.name only."
            )
        flat = {k: copy.deepcopy(v) for k, v in adapter.items() if k not in ("kind", "name", "options")}
        options = adapter.get("options", {})
        name = adapter.get("name", adapter.get("kind", "bottleneck"))
        out["adapter"] = {"name": name, "options": {**options, **flat} if isinstance(options, Mapping) else options}
        _deprecated("adapter", out["adapter"])
    downstream = out.get("downstream")
    if isinstance(downstream, Mapping) and (isinstance(downstream.get("head"), str) or set(OLD_HEAD_OPTIONS) & set(downstream)):
        ds = dict(downstream)
        head = ds.get("head", "linear")
        head = {"name": head} if isinstance(head, str) else dict(head) if isinstance(head, Mapping) else head
        moved = {k: ds.pop(k) for k in OLD_HEAD_OPTIONS if k in ds}
        kept = {k: v for k, v in moved.items() if v != OLD_HEAD_OPTIONS[k]}
        if isinstance(head, dict) and (kept or "options" not in head):
            options = head.get("options", {})
            head["options"] = {**options, **kept} if isinstance(options, Mapping) else options
        ds["head"] = head
        out["downstream"] = ds
        _deprecated("downstream.head", head)
    return out


def _deprecated(section: str, new: Any) -> None:
    shape = yaml.safe_dump(new, default_flow_style=True, width=1 << 20).strip()
    _note(f"Deprecated config shape: '{section}' is read as {section}: {shape}; write it so (every component section is {{name, options}}).")


def _note(line: str) -> None:
    if line not in _noted:
        _noted.add(line)
        log.warning(line)


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
