"""What may leave the machine: one redaction helper for every shareable file.

Folder names identify people (PACS exports are named after patients), so nothing insitu writes
for sharing (adapter packages, reports, manifests, summaries) holds a local path: configs go
through `redact_config`, manifest paths through `shareable_path` (relative to the scanned root,
or an opaque salted token), and free text (library error messages) through `scrub_text`.
A run that says its paths are private (``manifest_paths: token``: DICOM's default, the images
domain's opt-in; `private_run`) shows every path as a token (`shareable_text` for messages that
quote one, `shareable_extra` for mask paths) and has its run folder's ``config.yaml`` redacted.

Tokens are salted with a secret that never enters a shareable file: ``INSITU_SALT`` when set
(stable across machines), else a random salt created once in the private cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REDACTED = "<local path>"
DATA_ROOT = "<data root>"
SALT_ENV = "INSITU_SALT"
# keys whose string values name local files or folders
PATH_KEY = re.compile(r"root|dir|path|folder|file|weights|mask", re.IGNORECASE)
# `org/name` (optionally `hf-hub:`/`timm/`): a hub id, unless such a path exists here
HUB_ID = re.compile(r"^(hf-hub:|hf_hub:)?[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# values that are not paths even under a path-like key (``manifest_paths: token``)
PLAIN_VALUES = {"token", "relative", "auto", "none", "thread", "process"}


def cache_root() -> Path:
    """The private cache (``INSITU_CACHE``, default ``~/.cache/insitu``): never shared."""
    return Path(os.environ.get("INSITU_CACHE", Path.home() / ".cache" / "insitu"))


def secret_salt(private_dir: Path | None = None, env: str = SALT_ENV) -> str:
    """The secret salt: ``$INSITU_SALT`` when set, else one random salt kept in ``private_dir``."""
    if os.environ.get(env):
        return os.environ[env]
    folder = Path(private_dir) if private_dir is not None else cache_root()
    path = folder / "salt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16))
    return path.read_text().strip()


def path_token(path: str | Path, salt: str, prefix: str = "file") -> str:
    """An opaque token for a path: without the salt, guessing the path cannot confirm it."""
    digest = hashlib.sha256(f"{salt}\x00{path}".encode()).hexdigest()[:16]
    return f"{prefix}-{digest}"


def shareable_path(path: str | Path, root: str | Path, salt: str | None = None, token_salt: str | None = None) -> str:
    """``path`` as a manifest may show it: relative to ``root`` (a folder, or a file's folder), else a token.

    Values that are neither under ``root`` nor a local path (DICOM tokens) are returned unchanged.
    With ``token_salt`` (the images domain's ``manifest_paths: token``) every path is shown as a token of its
    root-relative spelling, salted with it: the token is the same on every machine that shares the salt.
    """
    text = str(path)
    rel = _relative(text, root)
    if token_salt is not None:
        return path_token(rel if rel is not None else text, token_salt)
    if rel is not None:
        return rel
    if Path(text).is_absolute() or _exists(text):
        return path_token(text, salt if salt is not None else secret_salt())
    return text


def _relative(text: str, root: str | Path) -> str | None:
    """``text`` relative to ``root`` (a file root gives the file's name), or None when it is not under it."""
    for candidate in (Path(text), Path(text).absolute()):
        for base in _bases(root):
            try:
                rel = candidate.relative_to(base).as_posix()
            except ValueError:
                continue
            return rel if rel != "." else candidate.name
    return None


def shareable_text(text: str, root: str | Path, path: str | Path | None = None, token_salt: str | None = None) -> str:
    """Free text about ``path`` (a decoder's message) as a shareable file may hold it.

    The root's spellings become ``<data root>``; with ``token_salt``, every spelling of ``path`` (as given,
    absolute, resolved, root-relative, its name) and each folder name between the root and the file become
    the path's token first, so a message that quotes a patient-named file or folder names neither.
    """
    if token_salt is not None and path is not None:
        token = shareable_path(path, root, token_salt=token_salt)
        rel = _relative(str(path), root)
        spellings = {str(path), str(Path(path).absolute()), str(Path(path).resolve()), Path(path).name}
        if rel is not None:
            spellings |= {rel, *rel.split("/")[:-1]}
        for spelling in sorted((s for s in spellings if len(s) >= 3), key=len, reverse=True):
            text = text.replace(spelling, token)
    return scrub_text(text, [root])


def shareable_extra(extra: dict[str, Any], root: str | Path, token_salt: str | None = None) -> str:
    """A manifest item's ``extra`` as JSON for a shareable file: with ``token_salt`` each value that names a local
    file (a mask under ``options.masks``) is a salted token; the root's spellings are scrubbed either way."""
    if token_salt is not None:
        extra = {k: path_token(_relative(v, root) or v, token_salt) if isinstance(v, str) and is_private_path(v, k) else v for k, v in extra.items()}
    return scrub_text(json.dumps(extra, sort_keys=True), [root])


def private_run(config: dict[str, Any]) -> bool:
    """Whether a dumped run config reads private data: any data section (``data``, ``probe.train``, a federated
    site, ...) with ``options.manifest_paths: token`` (DICOM's default; the images domain's opt-in). The run
    folder's ``config.yaml`` of such a run holds no local path (`redact_config`)."""
    if isinstance(config, dict):
        options = config.get("options")
        if "domain" in config and isinstance(options, dict) and options.get("manifest_paths") == "token":
            return True
        return any(private_run(v) for v in config.values())
    if isinstance(config, list):
        return any(private_run(v) for v in config)
    return False


def scrub_text(text: str, roots: Iterable[str | Path]) -> str:
    """Replace every spelling of each root in free text (an error message) by ``<data root>``."""
    for root in roots:
        for base in sorted({str(b) for b in _bases(root)}, key=len, reverse=True):
            if len(base) >= 3:  # a one- or two-letter relative root would mangle ordinary words
                text = text.replace(base, DATA_ROOT)
    return text


def _bases(root: str | Path) -> list[Path]:
    """The folder paths under which items of ``root`` live: as given, absolute and resolved."""
    root = Path(root)
    if not str(root) or str(root) == ".":
        return [Path.cwd()]
    out = []
    for p in (root, root.absolute(), root.resolve()):
        folder = p.parent if p.is_file() else p
        if folder not in out:
            out.append(folder)
    return out


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a config with every local path replaced by ``<local path>``.

    Redacted: any value under a key named like *root*, *dir*, *path*, *folder*, *file*, *weights*
    (except ``insitu:`` base ids and hub ids), and under any key a value that is absolute, starts
    with ``~``, holds a path separator or names an existing file or folder (hub ids excepted).
    """
    return _redact(json.loads(json.dumps(config, default=str)), None)


def _redact(value: Any, key: str | None) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if isinstance(value, str) and is_private_path(value, key):
        return REDACTED
    return value


def is_private_path(value: str, key: str | None = None) -> bool:
    """Whether a config value names a local file or folder (by its key's name or its own form)."""
    if not value or value.startswith("insitu:"):
        return False
    exists = _exists(value)
    if HUB_ID.match(value) and not exists:
        return key is not None and bool(PATH_KEY.search(key)) and value.lower() not in PLAIN_VALUES and "/" not in value
    if key is not None and PATH_KEY.search(key):
        return value.lower() not in PLAIN_VALUES or exists
    return exists or Path(value).is_absolute() or value.startswith("~") or "/" in value or "\\" in value


def _exists(value: str) -> bool:
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError):
        return False


def shown_weights(weights: str | None) -> str:
    """How a report names ``backbone.weights``: base and hub ids as they are, local files redacted."""
    if not weights:
        return "random init"
    return f"weights {REDACTED if is_private_path(weights, 'weights') else weights}"
