"""The ``insitu`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from insitu.errors import InsituError

console = Console(stderr=False)
err_console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    try:
        return int(args.func(args) or 0)
    except InsituError as exc:
        err_console.print(f"[bold red]{type(exc).__name__}[/]: {exc}", highlight=False, markup=True, soft_wrap=True)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insitu", description="Adapt vision foundation models to your imaging domain, on your machines.")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(title="commands")

    q = sub.add_parser("quickstart", help="generate the embedded demo data, pretrain adapters, probe, report")
    q.add_argument("--out", type=Path, default=Path("insitu-runs/quickstart"), help="run folder (default: insitu-runs/quickstart)")
    q.add_argument("--domain", default="images", help="which domain's demo to run (default: images)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    q.set_defaults(func=_cmd_quickstart)

    t = sub.add_parser("pretrain", help="continual self-supervised pretraining of adapters from a config")
    t.add_argument("-c", "--config", type=Path, required=True, help="YAML config")
    t.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.max_steps=10"
    )
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--probe", action="store_true", help="probe frozen vs adapted features at the end")
    t.set_defaults(func=_cmd_pretrain)

    pr = sub.add_parser("probe", help="linear-probe and kNN accuracy: frozen backbone vs adapter packages")
    pr.add_argument("-c", "--config", type=Path, required=True, help="YAML config (backbone and probe sections)")
    pr.add_argument("--adapter", type=Path, action="append", default=[], help="adapter package folder or .zip (repeatable)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pr.add_argument("--json", type=Path, help="also write the table as JSON here")
    pr.set_defaults(func=_cmd_probe)

    s = sub.add_parser("scan", help="scan a data folder into manifest.csv and quarantine.csv without training")
    s.add_argument("root", type=Path, help="folder (or file) to scan")
    s.add_argument("--domain", default="images", help="data domain (images, dicom, geotiff, video)")
    s.add_argument("--out", type=Path, required=True, help="folder for manifest.csv and quarantine.csv")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a domain option (data.options)")
    s.set_defaults(func=_cmd_scan)

    a = sub.add_parser("adapter", help="work with adapter packages")
    asub = a.add_subparsers(title="adapter commands")
    ai = asub.add_parser("inspect", help="validate a package and print its card")
    ai.add_argument("path", type=Path, help="package folder or .zip")
    ai.add_argument("--json", action="store_true", help="print insitu.json instead of a table")
    ai.set_defaults(func=_cmd_adapter_inspect)
    return p


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from insitu.pipelines.quickstart import quickstart

    summary = quickstart(args.out, args.domain, args.overrides, quiet=args.quiet)
    p = summary["pretrain"]
    _summary_table(
        "insitu quickstart",
        [
            ("run folder", summary["run_dir"]),
            ("report", summary["report"]),
            ("steps / final loss", f"{p['steps']} / {p['final_loss']:.4f}"),
            ("trainable / frozen params", f"{p['trainable_params']:,} / {p['frozen_params']:,}"),
            ("wall time", f"{summary['wall_s']} s"),
        ],
    )
    _probe_table(summary["probe"])
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain
    from insitu.pipelines.probe import run_probe

    cfg = load_config(args.config, args.overrides)
    result = pretrain(cfg, resume=args.resume, quiet=args.quiet)
    if result.adapter_dir is None:  # a non-zero DDP rank
        return 0
    _summary_table(
        f"insitu pretrain: {cfg.name}",
        [
            ("run folder", str(result.run_dir)),
            ("adapter package", str(result.adapter_dir)),
            ("items (quarantined)", f"{result.items} ({result.quarantined})"),
            ("steps / final loss", f"{result.steps} / {result.final_loss}"),
            ("trainable params", f"{result.trainable_params:,}"),
            ("wall time", f"{result.wall_s:.1f} s"),
        ],
    )
    if args.probe:
        from dataclasses import asdict

        _probe_table([asdict(r) for r in run_probe(cfg, [result.adapter_dir])])
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from insitu.config import load_config
    from insitu.pipelines.probe import run_probe

    cfg = load_config(args.config, args.overrides)
    rows = [asdict(r) for r in run_probe(cfg, args.adapter)]
    _probe_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _cmd_scan(args: argparse.Namespace) -> int:
    from insitu.config import apply_override, validate_options
    from insitu.domains import create_domain, get_domain_class
    from insitu.errors import ConfigError, EmptyDatasetError

    if not args.root.exists():
        raise ConfigError(f"{args.root} does not exist; pass the folder to scan.")
    raw: dict = {}
    for opt in args.option:
        apply_override(raw, opt)
    options = validate_options(get_domain_class(args.domain).Options, raw, "--option", "scan")
    try:
        manifest = create_domain(args.domain, options).scan(args.root)
    except EmptyDatasetError as exc:
        err_console.print(f"[bold red]EmptyDatasetError[/]: {exc}")
        return 1
    manifest.write(args.out)
    counts = manifest.counts()
    rows = [(k, str(v)) for k, v in counts.items()] + [
        ("manifest", str(args.out / "manifest.csv")),
        ("quarantine", str(args.out / "quarantine.csv")),
    ]
    _summary_table(f"insitu scan ({args.domain})", rows)
    for q in manifest.quarantine[:20]:
        console.print(f"  quarantined {q.path}: {q.reason} ({q.message[:120]})", highlight=False, soft_wrap=True)
    return 0 if manifest.items else 1


def _cmd_adapter_inspect(args: argparse.Namespace) -> int:
    from insitu.adapters.package import load_package

    pkg = load_package(args.path)
    meta = pkg.meta
    if args.json:
        console.print_json(json.dumps(meta.model_dump(mode="json")))
        return 0
    b = meta.base
    _summary_table(
        f"adapter package {args.path}",
        [
            ("format", f"{meta.format} v{meta.format_version}"),
            ("base", b.source),
            ("fingerprint", b.fingerprint),
            ("base shape", f"{b.num_blocks} blocks, width {b.embed_dim}, patch {b.patch_size}, {b.in_chans} ch, {b.img_size} px"),
            ("adapter", json.dumps(meta.adapter)),
            ("trainable params", f"{meta.trainable_params:,}"),
            ("tensors", f"{meta.tensors['adapter']} adapter, {meta.tensors['head']} head ({len(pkg.tensors)} total)"),
            ("objective", meta.objective.get("name", "?")),
            ("training", json.dumps({k: meta.training.get(k) for k in ("steps", "items", "final_loss", "device")})),
            ("normalizer", "stored" if meta.normalizer else "none"),
        ],
    )
    return 0


def _summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _probe_table(rows: list[dict]) -> None:
    table = Table(title="probe (frozen features)", title_justify="left")
    for col in ("features", "linear acc", "kNN acc", "trainable params", "train/test"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], f"{r['linear_acc']:.3f}", f"{r['knn_acc']:.3f}", f"{r['trainable_params']:,}", f"{r['n_train']}/{r['n_test']}"
        )
    console.print(table)


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    import lightning.pytorch  # noqa: F401 - import first: it configures its loggers on import

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated.*")


if __name__ == "__main__":
    sys.exit(main())
