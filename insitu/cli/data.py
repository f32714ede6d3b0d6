"""Data commands: ``scan``."""

from __future__ import annotations

import argparse
from pathlib import Path

from insitu.cli.common import add_options, console, err_console, parse_options, summary_table


def add_scan(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("scan", help="scan a data folder into manifest.csv and quarantine.csv without training")
    s.add_argument("root", type=Path, help="folder (or file) to scan")
    s.add_argument("--domain", default="images", help="data domain (images, dicom, geotiff, video)")
    s.add_argument("--out", type=Path, required=True, help="folder for manifest.csv and quarantine.csv")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier scan in --out (only the files insitu wrote there)")
    s.add_argument("--no-near-duplicates", dest="near_duplicates", action="store_false", help="skip near_duplicates.csv (images domain)")
    add_options(s, "a domain option (data.options)")
    s.set_defaults(func=run_scan)


def run_scan(args: argparse.Namespace) -> int:
    from insitu.config import validate_options
    from insitu.domains import create_domain, get_domain_class
    from insitu.errors import ConfigError, EmptyDatasetError
    from insitu.io import claim_folder

    if not args.root.exists():
        raise ConfigError(f"{args.root} does not exist; pass the folder to scan.")
    options = validate_options(get_domain_class(args.domain).Options, parse_options(args.option), "--option", "scan")
    folder = claim_folder(args.out, "scan", args.overwrite)
    try:
        manifest = create_domain(args.domain, options).scan(args.root)
    except EmptyDatasetError as exc:
        err_console.print(f"[bold red]EmptyDatasetError[/]: {exc}")
        return 1
    manifest.write(args.out)
    near_duplicates = None
    if args.domain == "images" and args.near_duplicates and args.root.is_dir():  # not for a MedMNIST .npz
        from insitu.domains.near_duplicates import write_near_duplicates

        near_duplicates = write_near_duplicates(manifest, args.out)
    folder.record()
    counts = manifest.counts()
    rows = [(k, str(v)) for k, v in counts.items()] + [
        ("manifest", str(args.out / "manifest.csv")),
        ("quarantine", str(args.out / "quarantine.csv")),
    ]
    summary_table(f"insitu scan ({args.domain})", rows)
    if near_duplicates is not None:
        console.print(near_duplicates.line(), highlight=False, soft_wrap=True)
    for q in manifest.quarantine[:20]:
        path, message = q.path, q.message
        if manifest.path_salt is not None:  # manifest_paths: token: the terminal (often a scheduler's log file) shows tokens too
            from insitu.privacy import shareable_path, shareable_text

            path, message = shareable_path(q.path, manifest.root, token_salt=manifest.path_salt), shareable_text(q.message, manifest.root, q.path, manifest.path_salt)
        console.print(f"  quarantined {path}: {q.reason} ({message[:120]})", highlight=False, soft_wrap=True)
    return 0 if manifest.items else 1
