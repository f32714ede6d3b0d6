"""The ``insitu`` command: :func:`main` and the parser; one module per group of commands."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from rich.logging import RichHandler

from insitu.cli import adapter, data, evaluate, train
from insitu.cli.common import err_console, safe_text
from insitu.errors import InsituError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.quiet, light=getattr(args, "light", False))
    try:
        return int(args.func(args) or 0)
    except InsituError as exc:
        err_console.print(f"[bold red]{type(exc).__name__}[/]: {safe_text(str(exc), 4000)}", highlight=False, markup=True, soft_wrap=True)
        return getattr(exc, "exit_code", 2)  # RunInterrupted (a quickstart stopped by SIGTERM): 128 + signal


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insitu", description="Adapt vision foundation models to your imaging domain, on your machines.")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(title="commands")
    for add in (
        train.add_quickstart,
        train.add_pretrain,
        evaluate.add_probe,
        evaluate.add_finetune,
        evaluate.add_evaluate,
        evaluate.add_retrieve,
        evaluate.add_predict,
        data.add_scan,
        train.add_base,
        train.add_federate,
        adapter.add_adapter,
    ):
        add(sub)
    return p


def _setup_logging(quiet: bool, light: bool = False) -> None:
    """Rich logs on stderr; with ``light`` (commands that never need the ML stack) Lightning is not imported."""
    level = logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    if light:  # vetting a package never needs the ML stack (importing torch alone is ~0.65 GB)
        return
    import lightning.pytorch  # noqa: F401 - import first: it configures its loggers on import

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated.*")


__all__ = ["build_parser", "main", "safe_text"]

if __name__ == "__main__":
    sys.exit(main())
