"""What every command shares: the consoles, safe terminal text, result tables, common flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


def safe_text(value: object, limit: int = 300) -> str:
    """Text from a file or an error, fit for a terminal: no control/escape characters, no rich markup."""
    from rich.markup import escape

    text = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in str(value))
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit:,} more characters)"
    return escape(text)


def summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=safe_text(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [(safe_text(k), safe_text(v)) for k, v in rows]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def probe_table(rows: list[dict]) -> None:
    from insitu.pipelines.probe import PROBE_NOTE
    from insitu.pipelines.probe import probe_table as probe_cells

    headers, cells = probe_cells(rows)
    table = Table(title="probe (frozen features)", title_justify="left", caption=PROBE_NOTE, caption_justify="left")
    for col in headers:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*row)
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)  # logs and pipes: no folding


def add_overrides(parser: argparse.ArgumentParser, help: str = "override a config key") -> None:  # noqa: A002 - argparse's name
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_options(parser: argparse.ArgumentParser, help: str) -> None:  # noqa: A002 - argparse's name
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags as a (nested) dict, parsed like config overrides."""
    from insitu.raw_config import apply_override

    options: dict[str, Any] = {}
    for pair in pairs:
        apply_override(options, pair)
    return options


def trust_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-keys", type=Path, help="folder of trusted signers' .pub files: a signature by one of them is then required")
    parser.add_argument("--require-signature", action="store_true", help="say so explicitly: --trusted-keys already refuses unsigned packages")


def trust(args: argparse.Namespace):  # noqa: ANN201 - a TrustPolicy (imported lazily)
    from insitu.sharing.signing import TrustPolicy

    return TrustPolicy(args.trusted_keys, args.require_signature)


def signer_text(signer) -> str:  # noqa: ANN001 - an insitu.sharing.signing.Signer
    return f"signed by {signer.name!r}, trusted key {signer.key_name} (fingerprint {signer.fingerprint[:16]}…); {signer.binding()}"


def base_backbone(path: Path):  # noqa: ANN201 - returns a ViTBackbone (imported lazily)
    """The backbone a ``--base`` YAML names (a run config's backbone section, or a bare backbone mapping)."""
    import yaml

    from insitu.backbones import create_backbone
    from insitu.config import BackboneConfig, validate_options
    from insitu.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"--base {path} does not exist; pass a YAML run config or backbone mapping.")
    raw = yaml.safe_load(path.read_text()) or {}
    section = raw.get("backbone", raw) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--base {path} holds no backbone mapping.")
    return create_backbone(BackboneConfig.model_validate(validate_options(BackboneConfig, section, "backbone", str(path))))
