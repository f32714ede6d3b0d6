"""Adapter package commands: ``adapter inspect|verify|export|apply`` (sharing ones: :mod:`insitu.cli.sharing`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from insitu.cli.common import add_options, base_backbone, parse_options, signer_text, summary_table, trust, trust_flags
from insitu.cli.sharing import add_sharing


def add_adapter(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("adapter", help="work with adapter packages")
    asub = a.add_subparsers(title="adapter commands")
    ai = asub.add_parser("inspect", help="validate a package and print its card")
    ai.add_argument("path", type=Path, help="package folder or .zip")
    ai.add_argument("--json", action="store_true", help="print insitu.json instead of a table")
    ai.set_defaults(func=run_inspect, light=True)
    av = asub.add_parser("verify", help="check a package's integrity and, with --base, its compatibility with a backbone")
    av.add_argument("path", type=Path, help="package folder or .zip")
    av.add_argument("--base", type=Path, help="YAML with a backbone section (a run config) or a bare backbone mapping")
    trust_flags(av)
    av.set_defaults(func=run_verify, light=True)
    ae = asub.add_parser("export", help="pack a package as .zip / unpack it, or --merged: fold LoRA into a standalone backbone")
    ae.add_argument("path", type=Path, help="package folder or .zip")
    ae.add_argument("--out", type=Path, required=True, help="a .zip, a folder, or with --merged a .safetensors file")
    ae.add_argument("--overwrite", action="store_true", help="replace an existing --out file, or an earlier export folder insitu wrote")
    ae.add_argument("--merged", action="store_true", help="write the base weights with LoRA folded in (LoRA packages only)")
    ae.add_argument("--base", type=Path, help="base backbone spec (needed with --merged)")
    ae.add_argument(
        "--weights",
        choices=("student", "teacher"),
        default="student",
        help="student: the package as it is (default); teacher: a package whose adapters are the EMA teacher's it carries",
    )
    ae.set_defaults(func=run_export)
    aa = asub.add_parser("apply", help="run base + adapters on a data folder and write features (safetensors)")
    aa.add_argument("path", type=Path, help="package folder or .zip")
    aa.add_argument("--base", type=Path, required=True, help="base backbone spec (YAML)")
    aa.add_argument("--data", type=Path, required=True, help="folder or file to embed")
    aa.add_argument("--domain", default=None, help="data domain (default: the package's)")
    add_options(aa, "a domain option")
    aa.add_argument("--out", type=Path, required=True, help="features .safetensors (item ids go next to it as .json)")
    aa.add_argument("--overwrite", action="store_true", help="replace existing --out files")
    trust_flags(aa)
    aa.set_defaults(func=run_apply)
    add_sharing(asub)


def run_inspect(args: argparse.Namespace) -> int:
    from insitu.package_format import vet_package  # no torch: vetting a package stays light and fast

    vetted = vet_package(args.path)
    meta = vetted.meta
    if args.json:  # JSON escapes control characters itself
        print(json.dumps(meta.model_dump(mode="json"), indent=2, ensure_ascii=True))
        return 0
    b = meta.base
    summary_table(
        f"adapter package {args.path}",
        [
            ("format", f"{meta.format} v{meta.format_version}"),
            ("base", b.source),
            ("fingerprint", b.fingerprint),
            ("base shape", f"{b.num_blocks} blocks, width {b.embed_dim}, patch {b.patch_size}, {b.in_chans} ch, {b.img_size} px"),
            ("adapter", json.dumps(meta.adapter)),
            ("trainable params", f"{meta.trainable_params:,}"),
            ("tensors", f"{meta.tensors['adapter']} adapter, {meta.tensors['head']} head ({len(vetted.header)} total)"),
            ("content sha256", meta.content_sha256 or "not recorded (package from an older insitu): integrity cannot be checked"),
            ("weights", meta.weights + (" (EMA teacher's adapters)" if meta.weights == "teacher" else "")),
            ("teacher", f"carried ({meta.teacher.tensors} adapter tensors): export --weights teacher" if meta.teacher else "none"),
            ("objective", str(meta.objective.get("name", "?"))),
            ("training", json.dumps({k: meta.training.get(k) for k in ("steps", "items", "final_loss", "device")})),
            ("normalizer", "stored" if meta.normalizer else "none"),
        ],
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from insitu.package_format import vet_package

    policy = trust(args)
    vetted = vet_package(args.path)
    hashed = "content hash ok" if vetted.meta.content_sha256 else "no content hash recorded (older package)"
    rows = [("integrity", f"ok: insitu.json valid, {len(vetted.header)} finite tensors in adapter.safetensors, {hashed}")]
    if vetted.meta.teacher is not None:
        rows.append(("teacher", f"ok: {vetted.meta.teacher.tensors} finite adapter tensors in teacher.safetensors, content hash ok"))
    rows.append(("signature", _signature_text(vetted, policy, args.path)))
    if args.base:
        from insitu.adapters.package import apply_package, load_package

        backbone = base_backbone(args.base)
        apply_package(load_package(args.path), backbone)  # raises AdapterMismatchError naming each differing field
        rows.append(("base", f"compatible with {backbone.source} (fingerprint {backbone.fingerprint[:16]}…)"))
    summary_table(f"verified {args.path}", rows)
    return 0


def _signature_text(vetted, policy, path: Path) -> str:  # noqa: ANN001 - a VettedPackage and a TrustPolicy
    from insitu.sharing.signing import digests_of, signature_claim

    digests = digests_of(vetted)
    signer = policy.check(digests, str(path))
    if signer is not None:
        return signer_text(signer)
    claim = signature_claim(digests, str(path))  # files must match a signature even when no trust folder is given
    if claim is None:
        return "unsigned" + (" (accepted: --require-signature not given)" if policy.keys else "")
    return f"signed by {claim.name!r} (key {claim.fingerprint[:16]}…); signer not checked: pass --trusted-keys DIR"


def run_export(args: argparse.Namespace) -> int:
    from insitu.adapters.package import load_package
    from insitu.errors import ConfigError
    from insitu.io import check_output_file, claim_folder

    pkg = load_package(args.path, weights=args.weights)  # validate before writing anything; no teacher: ConfigError
    teacher = args.weights == "teacher" and not args.merged
    folder = None
    if args.merged or args.out.suffix == ".zip":
        check_output_file(args.out, args.overwrite)
    elif teacher or not args.path.is_dir():
        folder = claim_folder(args.out, "adapter export", args.overwrite)
    if args.merged:
        _export_merged(args, pkg)
    elif teacher:
        from insitu.adapters.package import export_package

        export_package(args.path, args.out, "teacher", overwrite=True)  # the output was checked or claimed above
        if folder is not None:
            folder.record()
    elif args.out.suffix == ".zip":
        from insitu.adapters.package import write_zip

        if not args.path.is_dir():
            raise ConfigError(f"{args.path} is already a .zip; pass a folder as --out to unpack it.")
        write_zip(args.path, args.out)
    else:
        if folder is None:
            raise ConfigError(f"{args.path} is already a folder; pass a .zip as --out to pack it.")
        _unpack(args.path, args.out)
        folder.record()
    summary_table("exported", [("from", str(args.path)), ("to", str(args.out)), ("weights", args.weights)])
    return 0


def _export_merged(args: argparse.Namespace, pkg) -> None:  # noqa: ANN001 - an AdapterPackage
    from safetensors.torch import save_file

    from insitu.adapters import LoRAAdapters
    from insitu.adapters.package import apply_package
    from insitu.errors import ConfigError

    if not args.base:
        raise ConfigError("--merged needs --base (the backbone the LoRA weights are folded into).")
    model = apply_package(pkg, base_backbone(args.base))
    if not isinstance(model.adapters, LoRAAdapters):
        raise ConfigError(f"--merged works for LoRA packages only; {args.path} holds {pkg.meta.adapter.get('kind')!r} adapters.")
    save_file(model.merged_state_dict(), str(args.out))


def _unpack(zip_path: Path, out: Path) -> None:
    from insitu.package_format import CARD_FILE, META_FILE, SIGNATURE_FILE, TEACHER_FILE, TENSORS_FILE, vet_package

    vetted = vet_package(zip_path)  # every member read with its size cap; insitu.json kept byte for byte (a signature binds it)
    files = {
        TENSORS_FILE: vetted.tensor_bytes,
        META_FILE: vetted.meta_bytes,
        CARD_FILE: vetted.card or b"",
        SIGNATURE_FILE: vetted.signature,
        TEACHER_FILE: vetted.teacher_bytes,
    }
    for name, data in files.items():
        if data is not None:
            (out / name).write_bytes(data)


def run_apply(args: argparse.Namespace) -> int:
    from insitu.adapters.package import apply_package, load_package
    from insitu.api import embed_folder
    from insitu.io import check_output_file, write_json

    for out in (args.out, args.out.with_suffix(".json")):
        check_output_file(out, args.overwrite)
    pkg = load_package(args.path, trust(args))
    model = apply_package(pkg, base_backbone(args.base))
    domain = args.domain or pkg.meta.input.get("domain", "images")
    # the package's preprocessing contract (insitu.pipelines.preprocess): its normaliser, size, channels and bands
    feats, ids = embed_folder(args.data, model, domain, parse_options(args.option), package=pkg)
    _save_features(args.out, args.path, feats, ids)
    write_json(args.out.with_suffix(".json"), {"item_ids": ids, "package": args.path.name})
    summary_table("features written", [("items", str(len(ids))), ("dim", str(feats.shape[1])), ("file", str(args.out))])
    return 0


def _save_features(out: Path, package: Path, feats, ids: list[str]) -> None:  # noqa: ANN001 - a numpy array
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from insitu.errors import AdapterFormatError
    from insitu.io import atomic_path

    if not np.isfinite(feats).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(feats).all(axis=1))[:8]]
        raise AdapterFormatError(
            f"{package} produced non-finite features for items {bad}; nothing was written. Check the package and those inputs."
        )
    with atomic_path(out) as tmp:
        save_file({"features": torch.from_numpy(feats).contiguous()}, str(tmp))
