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
    ak.add_argument(
        "--encrypt", action="store_true", help="encrypt the private key with a passphrase ($INSITU_KEY_PASSPHRASE, or typed when asked)"
    )
    ak.set_defaults(func=run_keygen, light=True)
    asg = asub.add_parser("sign", help="sign a package (adds signature.json: tensors, insitu.json, card, name and version bound to your key)")
    asg.add_argument("path", type=Path, help="package folder or .zip")
    asg.add_argument("--key", type=Path, required=True, help="private key file from `insitu adapter keygen`")
    asg.add_argument("--signer", help="name to sign as (default: the key file's name)")
    asg.add_argument("--name", help="the registry name it is released as: publish lists it under that name only, pull refuses any other")
    asg.add_argument("--version", help="its version (with --name): pull --version checks it")
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
    al.add_argument("--trusted-keys", type=Path, help="folder of trusted .pub files: say whether each signer's key is among them")
    al.set_defaults(func=run_list, light=True)
    apl = asub.add_parser("pull", help="copy a package out of a registry after checking every file's hash (and signature)")
    apl.add_argument("name", help="entry name (see `insitu adapter list`)")
    apl.add_argument("registry", type=Path, help="registry folder")
    apl.add_argument("--out", type=Path, required=True, help="new folder for the package")
    trust_flags(apl)
    apl.add_argument("--version", help="refuse the package unless its signature binds this version")
    apl.set_defaults(func=run_pull, light=True)


def run_keygen(args: argparse.Namespace) -> int:
    from insitu.sharing.signing import generate_keypair

    private, public = generate_keypair(args.out, args.name, _new_passphrase() if args.encrypt else None)
    summary_table(
        "key pair written",
        [
            ("private key", f"{private} (keep it secret; never put it in a package)"),
            ("public key", f"{public} (give this to sites that trust you)"),
        ],
    )
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from insitu.sharing.signing import private_key_is_encrypted, sign_package

    passphrase = _passphrase(args.key) if private_key_is_encrypted(args.key) else None
    signer = sign_package(args.path, args.key, args.signer, entry_name=args.name, entry_version=args.version, passphrase=passphrase)
    rows = [("signer", signer.name), ("key fingerprint", signer.fingerprint), ("binds", signer.binding())]
    summary_table(f"signed {args.path}", rows)
    return 0


def _passphrase(key: Path) -> bytes | None:
    """$INSITU_KEY_PASSPHRASE, or typed at a terminal; None leaves the error to load_private_key."""
    import getpass
    import os
    import sys

    from insitu.sharing.signing import PASSPHRASE_ENV

    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase for {key}: ").encode() or None
    return None


def _new_passphrase() -> bytes:
    import getpass
    import os
    import sys

    from insitu.errors import ConfigError
    from insitu.sharing.signing import PASSPHRASE_ENV

    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise ConfigError(f"--encrypt needs a passphrase: set {PASSPHRASE_ENV}, or run keygen at a terminal to type it.")
    first, second = getpass.getpass("new passphrase: "), getpass.getpass("again: ")
    if not first or first != second:
        raise ConfigError("the passphrases were empty or differ; run keygen again.")
    return first.encode()


def run_publish(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import publish

    entry = publish(args.path, args.registry, args.name)
    signer = f"{entry.signer.name} ({entry.signer.fingerprint[:16]}…)" if entry.signer else "unsigned"
    if entry.signer and entry.version:
        signer += f", version {entry.version}"
    rows = [("name", entry.name), ("base", f"{entry.base_source} ({entry.base_fingerprint[:16]}…)"), ("signer", signer)]
    summary_table(f"published into {args.registry}", [*rows, ("size", f"{entry.size_bytes:,} bytes")])
    return 0


def run_list(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import list_packages, trusted_key_name, trusted_keys_of

    entries = list_packages(args.registry, args.base)
    trusted = trusted_keys_of(args.trusted_keys)
    if args.json:  # JSON escapes control characters itself
        rows = [e.model_dump(mode="json") for e in entries]
        if trusted is not None:
            for row, e in zip(rows, entries, strict=True):
                row["trusted_key"] = trusted_key_name(e, trusted)  # null: unsigned, or signed by a key not in the folder
        print(json.dumps(rows, indent=2, ensure_ascii=True))
        return 0
    caption = "signer and key: what the index claims; pull checks them against the signature"
    table = Table(title=safe_text(f"registry {args.registry}: {len(entries)} package(s)"), title_justify="left", caption=caption)
    for col in ("name", "base", "domain", "objective", "data", "signer", "size", "published"):
        table.add_column(col, overflow="fold")
    for e in entries:
        name = e.name + (f" (version {e.version})" if e.version else "")
        cells = (name, e.base_fingerprint[:12], e.domain or "?", e.objective, e.data, _signer_cell(e, trusted))
        table.add_row(*(safe_text(c) for c in cells), f"{e.size_bytes:,}", safe_text(e.published))
    console.print(table)
    return 0


def _signer_cell(entry, trusted) -> str:  # noqa: ANN001 - an IndexEntry and a trusted-keys mapping (or None)
    """The signer name with its key fingerprint and whether the key is trusted: a name alone says nothing (anyone can sign as any name)."""
    from insitu.sharing.registry import trusted_key_name

    if entry.signer is None:
        return "unsigned"
    key = f"{entry.signer.name}, key {entry.signer.fingerprint[:16]}"
    if trusted is None:
        return key + ", trust not checked"
    name = trusted_key_name(entry, trusted)
    return key + (f", trusted ({name})" if name else ", NOT trusted")


def run_pull(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import pull

    entry, signer = pull(args.name, args.registry, args.out, args.trusted_keys, args.require_signature, args.version)
    rows = [("package", entry.name), ("to", str(args.out)), ("hashes", "every file matches the index and the package's content hash")]
    rows.append(("index", "its claims (base, signer, version, metrics, item counts) match the package"))
    if signer is None:
        rows.append(("signature", "none: the package is unsigned (accepted because no --trusted-keys were given)"))
    elif signer.key_name is not None:
        rows.append(("signature", signer_text(signer)))
    else:
        claim = f"signed by {signer.name!r} (key {signer.fingerprint[:16]}…; {signer.binding()}); matches its files"
        rows.append(("signature", claim + ", but the signer was not checked: pass --trusted-keys DIR"))
    summary_table("pulled", rows)
    return 0
