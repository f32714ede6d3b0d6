"""Signed packages and registries: ``adapter keygen|sign|publish|list|pull`` (:mod:`insitu.sharing`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from insitu.cli.common import console, safe_text, signer_text, summary_table, trust_flags


def add_sharing(asub: argparse._SubParsersAction) -> None:
    """`adapter keygen|sign|publish|list|pull`: signed packages and registries (insitu.sharing)."""
    ak = asub.add_parser("keygen", help="make an Ed25519 key pair: NAME.key (private, 0600) and NAME.pub (give this out)")
    ak.add_argument("--out", type=Path, required=True, help="folder for the key files (keep it outside any package)")
    ak.add_argument("--name", required=True, help="key name (letters, digits, . _ -)")
    ak.set_defaults(func=run_keygen, light=True)
    asg = asub.add_parser("sign", help="sign a package (adds signature.json: tensors and insitu.json bound to your key)")
    asg.add_argument("path", type=Path, help="package folder or .zip")
    asg.add_argument("--key", type=Path, required=True, help="private key file from `insitu adapter keygen`")
    asg.add_argument("--signer", help="name to sign as (default: the key file's name)")
    asg.set_defaults(func=run_sign, light=True)
    ap = asub.add_parser("publish", help="copy a package into a registry folder and list it in its index.json")
    ap.add_argument("path", type=Path, help="package folder or .zip")
    ap.add_argument("registry", type=Path, help="registry folder (created when missing)")
    ap.add_argument("--name", help="entry name (default: <objective>-<content hash prefix>)")
    ap.set_defaults(func=run_publish, light=True)
    al = asub.add_parser("list", help="list a registry's packages")
    al.add_argument("registry", type=Path, help="registry folder")
    al.add_argument("--base", help="only packages for this base fingerprint (a prefix is enough)")
    al.add_argument("--json", action="store_true", help="print the index entries as JSON")
    al.set_defaults(func=run_list, light=True)
    apl = asub.add_parser("pull", help="copy a package out of a registry after checking every file's hash (and signature)")
    apl.add_argument("name", help="entry name (see `insitu adapter list`)")
    apl.add_argument("registry", type=Path, help="registry folder")
    apl.add_argument("--out", type=Path, required=True, help="new folder for the package")
    trust_flags(apl)
    apl.set_defaults(func=run_pull, light=True)


def run_keygen(args: argparse.Namespace) -> int:
    from insitu.sharing.signing import generate_keypair

    private, public = generate_keypair(args.out, args.name)
    summary_table(
        "key pair written",
        [
            ("private key", f"{private} (keep it secret; never put it in a package)"),
            ("public key", f"{public} (give this to sites that trust you)"),
        ],
    )
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from insitu.sharing.signing import sign_package

    signer = sign_package(args.path, args.key, args.signer)
    summary_table(f"signed {args.path}", [("signer", signer.name), ("key fingerprint", signer.fingerprint)])
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import publish

    entry = publish(args.path, args.registry, args.name)
    signer = f"{entry.signer.name} ({entry.signer.fingerprint[:16]}…)" if entry.signer else "unsigned"
    rows = [("name", entry.name), ("base", f"{entry.base_source} ({entry.base_fingerprint[:16]}…)"), ("signer", signer)]
    summary_table(f"published into {args.registry}", [*rows, ("size", f"{entry.size_bytes:,} bytes")])
    return 0


def run_list(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import list_packages

    entries = list_packages(args.registry, args.base)
    if args.json:  # JSON escapes control characters itself
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2, ensure_ascii=True))
        return 0
    table = Table(title=safe_text(f"registry {args.registry}: {len(entries)} package(s)"), title_justify="left")
    for col in ("name", "base", "domain", "objective", "data", "signer", "size", "published"):
        table.add_column(col, overflow="fold")
    for e in entries:
        cells = (e.name, e.base_fingerprint[:12], e.domain or "?", e.objective, e.data, e.signer.name if e.signer else "unsigned")
        table.add_row(*(safe_text(c) for c in cells), f"{e.size_bytes:,}", safe_text(e.published))
    console.print(table)
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import pull

    entry, signer = pull(args.name, args.registry, args.out, args.trusted_keys, args.require_signature)
    rows = [("package", entry.name), ("to", str(args.out)), ("hashes", "every file matches the index and the package's content hash")]
    rows.append(("signature", signer_text(signer) if signer else "not checked (unsigned, or no --trusted-keys given)"))
    summary_table("pulled", rows)
    return 0
