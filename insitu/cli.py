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
    _setup_logging(args.quiet, light=getattr(args, "func", None) in _LIGHT_COMMANDS)
    try:
        return int(args.func(args) or 0)
    except InsituError as exc:
        err_console.print(f"[bold red]{type(exc).__name__}[/]: {safe_text(str(exc), 4000)}", highlight=False, markup=True, soft_wrap=True)
        return 2


def safe_text(value: object, limit: int = 300) -> str:
    """Text from a file or an error, fit for a terminal: no control/escape characters, no rich markup."""
    from rich.markup import escape

    text = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in str(value))
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit:,} more characters)"
    return escape(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insitu", description="Adapt vision foundation models to your imaging domain, on your machines.")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(title="commands")

    q = sub.add_parser("quickstart", help="generate the embedded demo data, pretrain adapters, probe, report")
    q.add_argument("--out", type=Path, default=Path("insitu-runs/quickstart"), help="run folder (default: insitu-runs/quickstart)")
    q.add_argument("--domain", default="images", help="which domain's demo to run (default: images)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out that another insitu command wrote (a quickstart's own is always replaced)",
    )
    q.set_defaults(func=_cmd_quickstart)

    t = sub.add_parser("pretrain", help="continual self-supervised pretraining of adapters from a config")
    t.add_argument("-c", "--config", type=Path, required=True, help="YAML config")
    t.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.max_steps=10"
    )
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument(
        "--overwrite", action="store_true", help="replace the earlier run in the run folder (only the files insitu wrote there are removed)"
    )
    t.add_argument("--probe", action="store_true", help="probe frozen vs adapted features at the end")
    t.set_defaults(func=_cmd_pretrain)

    pr = sub.add_parser(
        "probe", help="repeated linear-probe/kNN (and dense) evaluation: frozen backbone vs adapter packages, with bootstrap CIs"
    )
    pr.add_argument("-c", "--config", type=Path, required=True, help="YAML config (backbone and probe sections)")
    pr.add_argument("--adapter", type=Path, action="append", default=[], help="adapter package folder or .zip (repeatable)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pr.add_argument("--out", type=Path, help="folder for probe.csv and probe.json (default: the run folder)")
    pr.add_argument("--json", type=Path, help="also write the rows as JSON here")
    pr.add_argument("--overwrite", action="store_true", help="replace earlier probe.csv/probe.json and an existing --json file")
    pr.set_defaults(func=_cmd_probe)

    ft = sub.add_parser("finetune", help="train a downstream head (segmentation/classification) on labelled data")
    ft.add_argument("-c", "--config", type=Path, required=True, help="YAML config with a downstream section")
    ft.add_argument("--adapter", type=Path, help="adapter package folder or .zip (default: the untouched backbone)")
    ft.add_argument("--out", type=Path, help="model folder for insitu predict (default: <run>/finetune)")
    ft.add_argument("--overwrite", action="store_true", help="replace an earlier model in --out (only the files insitu wrote there)")
    ft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ft.set_defaults(func=_cmd_finetune)

    ev = sub.add_parser("evaluate", help="frozen backbone vs adapter packages on a downstream task: table, CSV/JSON, report.html")
    ev.add_argument("-c", "--config", type=Path, required=True, help="YAML config with a downstream section")
    ev.add_argument("--adapter", type=Path, action="append", default=[], help="adapter package folder or .zip (repeatable)")
    ev.add_argument("--out", type=Path, help="results folder (default: <run>/evaluate)")
    ev.add_argument("--overwrite", action="store_true", help="replace earlier results in --out (only the files insitu wrote there)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ev.set_defaults(func=_cmd_evaluate)

    pd = sub.add_parser("predict", help="run a fine-tuned model over images, scenes, series or videos; write native formats")
    pd.add_argument("model", type=Path, help="folder written by insitu finetune")
    pd.add_argument("inputs", type=Path, help="file or folder to predict")
    pd.add_argument("--out", type=Path, required=True, help="output folder")
    pd.add_argument("--overwrite", action="store_true", help="replace earlier predictions in --out (only the files insitu wrote there)")
    pd.add_argument("--domain", default=None, help="data domain (default: the one the model was trained on)")
    pd.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a domain option (tile_size too)")
    pd.set_defaults(func=_cmd_predict)

    s = sub.add_parser("scan", help="scan a data folder into manifest.csv and quarantine.csv without training")
    s.add_argument("root", type=Path, help="folder (or file) to scan")
    s.add_argument("--domain", default="images", help="data domain (images, dicom, geotiff, video)")
    s.add_argument("--out", type=Path, required=True, help="folder for manifest.csv and quarantine.csv")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier scan in --out (only the files insitu wrote there)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a domain option (data.options)")
    s.set_defaults(func=_cmd_scan)

    b = sub.add_parser("base", help="the embedded pretrained base (a ViT pretrained on generated fractals)")
    bsub = b.add_subparsers(title="base commands")
    bp = bsub.add_parser("pretrain", help="pretrain a ViT from scratch on generated fractal images (full-parameter DINO)")
    bp.add_argument("-c", "--config", type=Path, help="YAML (see configs/base/fractal_vit_tiny.yaml); defaults otherwise")
    bp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. steps=100")
    bp.set_defaults(func=_cmd_base_pretrain)

    f = sub.add_parser("federate", help="federated continual pretraining of adapters across sites (Flower)")
    fsub = f.add_subparsers(title="federate commands")
    for name, text in (
        ("simulate", "run every site on this machine in Flower's simulation engine (testing, measurement)"),
        ("server", "coordinate the rounds: listen on federated.address, average the sites' adapters, write the package"),
        ("site", "train this site's data in each round; only adapter and head tensors leave the machine"),
    ):
        fp = fsub.add_parser(name, help=text)
        fp.add_argument("-c", "--config", type=Path, required=True, help="YAML run config with a federated section")
        fp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key")
        if name == "simulate":
            fp.add_argument("--sites", type=int, default=None, help="number of sites (default: the federated.sites listed, else 2 shards)")
        if name != "site":
            fp.add_argument("--overwrite", action="store_true", help="replace insitu's earlier results in the run folder")
        fp.set_defaults(func=_cmd_federate, role=name)

    a = sub.add_parser("adapter", help="work with adapter packages")
    asub = a.add_subparsers(title="adapter commands")
    ai = asub.add_parser("inspect", help="validate a package and print its card")
    ai.add_argument("path", type=Path, help="package folder or .zip")
    ai.add_argument("--json", action="store_true", help="print insitu.json instead of a table")
    ai.set_defaults(func=_cmd_adapter_inspect)
    av = asub.add_parser("verify", help="check a package's integrity and, with --base, its compatibility with a backbone")
    av.add_argument("path", type=Path, help="package folder or .zip")
    av.add_argument("--base", type=Path, help="YAML with a backbone section (a run config) or a bare backbone mapping")
    _trust_flags(av)
    av.set_defaults(func=_cmd_adapter_verify)
    ae = asub.add_parser("export", help="pack a package as .zip / unpack it, or --merged: fold LoRA into a standalone backbone")
    ae.add_argument("path", type=Path, help="package folder or .zip")
    ae.add_argument("--out", type=Path, required=True, help="a .zip, a folder, or with --merged a .safetensors file")
    ae.add_argument("--overwrite", action="store_true", help="replace an existing --out file, or an earlier export folder insitu wrote")
    ae.add_argument("--merged", action="store_true", help="write the base weights with LoRA folded in (LoRA packages only)")
    ae.add_argument("--base", type=Path, help="base backbone spec (needed with --merged)")
    ae.set_defaults(func=_cmd_adapter_export)
    aa = asub.add_parser("apply", help="run base + adapters on a data folder and write features (safetensors)")
    aa.add_argument("path", type=Path, help="package folder or .zip")
    aa.add_argument("--base", type=Path, required=True, help="base backbone spec (YAML)")
    aa.add_argument("--data", type=Path, required=True, help="folder or file to embed")
    aa.add_argument("--domain", default=None, help="data domain (default: the package's)")
    aa.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a domain option")
    aa.add_argument("--out", type=Path, required=True, help="features .safetensors (item ids go next to it as .json)")
    aa.add_argument("--overwrite", action="store_true", help="replace existing --out files")
    _trust_flags(aa)
    aa.set_defaults(func=_cmd_adapter_apply)
    _sharing_parsers(asub)
    return p


def _trust_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-keys", type=Path, help="folder of trusted signers' .pub files: a signature present must verify")
    parser.add_argument("--require-signature", action="store_true", help="refuse unsigned packages (needs --trusted-keys)")


def _sharing_parsers(asub: argparse._SubParsersAction) -> None:
    """`adapter keygen|sign|publish|list|pull`: signed packages and registries (insitu.sharing)."""
    ak = asub.add_parser("keygen", help="make an Ed25519 key pair: NAME.key (private, 0600) and NAME.pub (give this out)")
    ak.add_argument("--out", type=Path, required=True, help="folder for the key files (keep it outside any package)")
    ak.add_argument("--name", required=True, help="key name (letters, digits, . _ -)")
    ak.set_defaults(func=_cmd_adapter_keygen)
    asg = asub.add_parser("sign", help="sign a package (adds signature.json: tensors and insitu.json bound to your key)")
    asg.add_argument("path", type=Path, help="package folder or .zip")
    asg.add_argument("--key", type=Path, required=True, help="private key file from `insitu adapter keygen`")
    asg.add_argument("--signer", help="name to sign as (default: the key file's name)")
    asg.set_defaults(func=_cmd_adapter_sign)
    ap = asub.add_parser("publish", help="copy a package into a registry folder and list it in its index.json")
    ap.add_argument("path", type=Path, help="package folder or .zip")
    ap.add_argument("registry", type=Path, help="registry folder (created when missing)")
    ap.add_argument("--name", help="entry name (default: <objective>-<content hash prefix>)")
    ap.set_defaults(func=_cmd_adapter_publish)
    al = asub.add_parser("list", help="list a registry's packages")
    al.add_argument("registry", type=Path, help="registry folder")
    al.add_argument("--base", help="only packages for this base fingerprint (a prefix is enough)")
    al.add_argument("--json", action="store_true", help="print the index entries as JSON")
    al.set_defaults(func=_cmd_adapter_list)
    apl = asub.add_parser("pull", help="copy a package out of a registry after checking every file's hash (and signature)")
    apl.add_argument("name", help="entry name (see `insitu adapter list`)")
    apl.add_argument("registry", type=Path, help="registry folder")
    apl.add_argument("--out", type=Path, required=True, help="new folder for the package")
    _trust_flags(apl)
    apl.set_defaults(func=_cmd_adapter_pull)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from insitu.pipelines.quickstart import quickstart

    summary = quickstart(args.out, args.domain, args.overrides, quiet=args.quiet, overwrite=args.overwrite)
    p = summary["pretrain"]
    _summary_table(
        "insitu quickstart",
        [
            ("run folder", summary["run_dir"]),
            ("report", summary["report"]),
            ("steps / final loss", f"{p['steps']} / {p['final_loss']:.4f}"),
            ("trainable / frozen params", f"{p['trainable_params']:,} / {p['frozen_params']:,}"),
            ("wall time", f"{summary['wall_s']} s (" + ", ".join(f"{k} {v} s" for k, v in summary["phases_s"].items()) + ")"),
        ],
    )
    _probe_table(summary["probe"])
    console.print(summary["verdict"])
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain
    from insitu.pipelines.probe import run_probe

    cfg = load_config(args.config, args.overrides)
    result = pretrain(cfg, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
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
    rows = None
    if args.probe:
        from dataclasses import asdict

        from insitu.pipelines.probe import write_probe_outputs

        rows = run_probe(cfg, [result.adapter_dir])
        _probe_table([asdict(r) for r in rows])
        write_probe_outputs(rows, result.run_dir, cfg)
    from insitu.exports.report_html import write_pretrain_report

    console.print(f"report: {write_pretrain_report(cfg, result, rows)}", highlight=False)
    return 0


def _cmd_base_pretrain(args: argparse.Namespace) -> int:
    from insitu.pipelines.base_pretrain import base_pretrain, load_base_config

    cfg = load_base_config(args.config, args.overrides)
    weights = base_pretrain(cfg, quiet=args.quiet)
    card = json.loads(weights.with_suffix(".json").read_text())
    _summary_table(
        f"insitu base pretrain: {cfg.name}",
        [
            ("weights", str(weights)),
            ("card", str(weights.with_suffix(".json"))),
            ("steps / images seen", f"{card['steps']} / {card['images_seen']:,}"),
            ("final loss", f"{card['final_loss']:.4f}"),
            ("wall time", f"{card['wall_s']} s on {card['device']}"),
        ],
    )
    return 0


def _cmd_federate(args: argparse.Namespace) -> int:
    from insitu.federated.run import load_federation_config, run_server, run_simulation, run_site

    cfg = load_federation_config(args.config, args.overrides, args.role)
    if args.role == "site":
        items = run_site(cfg)
        console.print(f"site finished: trained on {items} local items; nothing but adapter tensors left this machine", highlight=False)
        return 0
    result = run_simulation(cfg, args.sites, args.overwrite) if args.role == "simulate" else run_server(cfg, args.overwrite)
    s = result.summary
    dropped = sum(len(r.dropped) for r in result.state.rounds)
    _summary_table(
        f"insitu federate {args.role}: {cfg.name}",
        [
            ("run folder", str(result.run_dir)),
            ("adapter package", str(result.adapter_dir)),
            ("rounds x local steps", f"{s['rounds']} x {s['local_steps']} ({s['aggregation']})"),
            ("sites dropped (all rounds)", str(dropped)),
            ("sent per site per round", f"{s['shared_bytes_per_site_per_round']:,} bytes (full model: {s['full_model_bytes']:,})"),
            ("wall per round", ", ".join(f"{w:.1f}" for w in s["wall_s_per_round"]) + " s"),
        ],
    )
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from insitu.config import load_config
    from insitu.io import add_files, check_output_file
    from insitu.pipelines.probe import run_probe, write_probe_outputs

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.run_dir
    if args.json:
        check_output_file(args.json, args.overwrite)
    folder = add_files(out, ("probe.csv", "probe.json"), "probe", args.overwrite)  # refuse before the work
    result = run_probe(cfg, args.adapter)
    rows = [asdict(r) for r in result]
    _probe_table(rows)
    csv_path, json_path = write_probe_outputs(result, out, cfg)
    folder.record(csv_path.name, json_path.name)
    console.print(f"wrote {csv_path} and {json_path}", highlight=False, soft_wrap=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.finetune import finetune

    cfg = load_config(args.config, args.overrides)
    result = finetune(cfg, args.adapter, out_dir=args.out or cfg.run_dir / "finetune", overwrite=args.overwrite)
    rows = [(k, f"{v:.4f}") for k, v in result.metrics.items()]
    rows += [("trainable params", f"{result.trainable_params:,}"), ("train/test", f"{result.n_train}/{result.n_test}")]
    _summary_table(f"insitu finetune: {result.name}", [*rows, ("model folder", str(result.out_dir))])
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.evaluate import evaluate, table_rows

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.run_dir / "evaluate"
    headers, cells = table_rows(evaluate(cfg, args.adapter, out, overwrite=args.overwrite))
    table = Table(title=f"insitu evaluate: {cfg.name} (mean ± std over seeds)")
    for h in headers:
        table.add_column(h)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    console.print(f"results: {out / 'evaluate.csv'}, {out / 'evaluate.json'}; report: {out / 'report.html'}", highlight=False)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from insitu.config import apply_override
    from insitu.pipelines.predict import predict

    options: dict = {}
    for opt in args.option:
        apply_override(options, opt)
    written = predict(args.model, args.inputs, args.out, args.domain, options, overwrite=args.overwrite)
    _summary_table("insitu predict", [("files written", str(len(written))), ("folder", str(args.out))])
    return 0 if written else 1


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
    from insitu.io import claim_folder

    folder = claim_folder(args.out, "scan", args.overwrite)
    try:
        manifest = create_domain(args.domain, options).scan(args.root)
    except EmptyDatasetError as exc:
        err_console.print(f"[bold red]EmptyDatasetError[/]: {exc}")
        return 1
    manifest.write(args.out)
    folder.record()
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
    from insitu.package_format import vet_package  # no torch: vetting a package stays light and fast

    vetted = vet_package(args.path)
    meta = vetted.meta
    if args.json:  # JSON escapes control characters itself
        print(json.dumps(meta.model_dump(mode="json"), indent=2, ensure_ascii=True))
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
            ("tensors", f"{meta.tensors['adapter']} adapter, {meta.tensors['head']} head ({len(vetted.header)} total)"),
            ("content sha256", meta.content_sha256 or "not recorded (package from an older insitu): integrity cannot be checked"),
            ("objective", str(meta.objective.get("name", "?"))),
            ("training", json.dumps({k: meta.training.get(k) for k in ("steps", "items", "final_loss", "device")})),
            ("normalizer", "stored" if meta.normalizer else "none"),
        ],
    )
    return 0


def _base_backbone(path: Path):  # noqa: ANN202 - returns a ViTBackbone (imported lazily)
    import yaml

    from insitu.backbones import create_backbone
    from insitu.config import BackboneConfig
    from insitu.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"--base {path} does not exist; pass a YAML run config or backbone mapping.")
    raw = yaml.safe_load(path.read_text()) or {}
    section = raw.get("backbone", raw) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--base {path} holds no backbone mapping.")
    from insitu.config import validate_options

    return create_backbone(BackboneConfig.model_validate(validate_options(BackboneConfig, section, "backbone", str(path))))


def _cmd_adapter_verify(args: argparse.Namespace) -> int:
    from insitu.package_format import vet_package

    trust = _trust(args)
    vetted = vet_package(args.path)
    hashed = "content hash ok" if vetted.meta.content_sha256 else "no content hash recorded (older package)"
    rows = [("integrity", f"ok: insitu.json valid, {len(vetted.header)} finite tensors in adapter.safetensors, {hashed}")]
    rows.append(("signature", _signature_text(vetted, trust, args.path)))
    if args.base:
        from insitu.adapters.package import apply_package, load_package

        backbone = _base_backbone(args.base)
        apply_package(load_package(args.path), backbone)  # raises AdapterMismatchError naming each differing field
        rows.append(("base", f"compatible with {backbone.source} (fingerprint {backbone.fingerprint[:16]}…)"))
    _summary_table(f"verified {args.path}", rows)
    return 0


def _cmd_adapter_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from insitu.adapters import LoRAAdapters, merge_lora
    from insitu.adapters.package import CARD_FILE, META_FILE, SIGNATURE_FILE, TENSORS_FILE, apply_package, load_package, write_zip
    from insitu.errors import ConfigError
    from insitu.io import check_output_file, claim_folder

    pkg = load_package(args.path)  # validate before writing anything
    folder = None
    if args.merged or args.out.suffix == ".zip":
        check_output_file(args.out, args.overwrite)
    elif not args.path.is_dir():
        folder = claim_folder(args.out, "adapter export", args.overwrite)
    if args.merged:
        if not args.base:
            raise ConfigError("--merged needs --base (the backbone the LoRA weights are folded into).")
        model = apply_package(pkg, _base_backbone(args.base))
        if not isinstance(model.adapters, LoRAAdapters):
            raise ConfigError(f"--merged works for LoRA packages only; {args.path} holds {pkg.meta.adapter.get('kind')!r} adapters.")
        save_file(merge_lora(model.backbone.vit, model.adapters), str(args.out))
    elif args.out.suffix == ".zip":
        if not args.path.is_dir():
            raise ConfigError(f"{args.path} is already a .zip; pass a folder as --out to unpack it.")
        write_zip(args.path, args.out)
    else:
        if folder is None:
            raise ConfigError(f"{args.path} is already a folder; pass a .zip as --out to pack it.")
        from insitu.package_format import vet_package

        vetted = vet_package(args.path)  # every member read with its size cap; insitu.json kept byte for byte (a signature binds it)
        files = {
            TENSORS_FILE: vetted.tensor_bytes,
            META_FILE: vetted.meta_bytes,
            CARD_FILE: vetted.card or b"",
            SIGNATURE_FILE: vetted.signature,
        }
        for name, data in files.items():
            if data is not None:
                (args.out / name).write_bytes(data)
        folder.record()
    _summary_table("exported", [("from", str(args.path)), ("to", str(args.out))])
    return 0


def _cmd_adapter_apply(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from insitu.adapters.package import apply_package, load_package
    from insitu.api import embed_folder
    from insitu.config import apply_override
    from insitu.errors import AdapterFormatError
    from insitu.io import check_output_file

    for out in (args.out, args.out.with_suffix(".json")):
        check_output_file(out, args.overwrite)
    pkg = load_package(args.path, _trust(args))
    model = apply_package(pkg, _base_backbone(args.base))
    options: dict = {}
    for opt in args.option:
        apply_override(options, opt)
    domain = args.domain or pkg.meta.input.get("domain", "images")
    size = int(pkg.meta.input.get("image_size", model.backbone.img_size))
    feats, ids = embed_folder(args.data, model, domain, options, size, pkg.meta.normalizer)
    import numpy as np
    import torch

    if not np.isfinite(feats).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(feats).all(axis=1))[:8]]
        raise AdapterFormatError(
            f"{args.path} produced non-finite features for items {bad}; nothing was written. Check the package and those inputs."
        )

    save_file({"features": torch.from_numpy(feats).contiguous()}, str(args.out))
    args.out.with_suffix(".json").write_text(json.dumps({"item_ids": ids, "package": args.path.name}, indent=2))
    _summary_table("features written", [("items", str(len(ids))), ("dim", str(feats.shape[1])), ("file", str(args.out))])
    return 0


def _trust(args: argparse.Namespace):  # noqa: ANN202 - a TrustPolicy (imported lazily)
    from insitu.sharing.signing import TrustPolicy

    return TrustPolicy(args.trusted_keys, args.require_signature)


def _signer_text(signer) -> str:  # noqa: ANN001 - an insitu.sharing.signing.Signer
    return f"signed by {signer.name!r}, trusted key {signer.key_name} (fingerprint {signer.fingerprint[:16]}…)"


def _signature_text(vetted, trust, path: Path) -> str:  # noqa: ANN001 - a VettedPackage and a TrustPolicy
    from insitu.sharing.signing import digests_of, signature_claim

    digests = digests_of(vetted)
    signer = trust.check(digests, str(path))
    if signer is not None:
        return _signer_text(signer)
    claim = signature_claim(digests, str(path))  # files must match a signature even when no trust folder is given
    if claim is None:
        return "unsigned" + (" (accepted: --require-signature not given)" if trust.keys else "")
    return f"signed by {claim.name!r} (key {claim.fingerprint[:16]}…); signer not checked: pass --trusted-keys DIR"


def _cmd_adapter_keygen(args: argparse.Namespace) -> int:
    from insitu.sharing.signing import generate_keypair

    private, public = generate_keypair(args.out, args.name)
    _summary_table(
        "key pair written",
        [
            ("private key", f"{private} (keep it secret; never put it in a package)"),
            ("public key", f"{public} (give this to sites that trust you)"),
        ],
    )
    return 0


def _cmd_adapter_sign(args: argparse.Namespace) -> int:
    from insitu.sharing.signing import sign_package

    signer = sign_package(args.path, args.key, args.signer)
    _summary_table(f"signed {args.path}", [("signer", signer.name), ("key fingerprint", signer.fingerprint)])
    return 0


def _cmd_adapter_publish(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import publish

    entry = publish(args.path, args.registry, args.name)
    signer = f"{entry.signer.name} ({entry.signer.fingerprint[:16]}…)" if entry.signer else "unsigned"
    rows = [("name", entry.name), ("base", f"{entry.base_source} ({entry.base_fingerprint[:16]}…)"), ("signer", signer)]
    _summary_table(f"published into {args.registry}", [*rows, ("size", f"{entry.size_bytes:,} bytes")])
    return 0


def _cmd_adapter_list(args: argparse.Namespace) -> int:
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


def _cmd_adapter_pull(args: argparse.Namespace) -> int:
    from insitu.sharing.registry import pull

    entry, signer = pull(args.name, args.registry, args.out, args.trusted_keys, args.require_signature)
    rows = [("package", entry.name), ("to", str(args.out)), ("hashes", "every file matches the index and the package's content hash")]
    rows.append(("signature", _signer_text(signer) if signer else "not checked (unsigned, or no --trusted-keys given)"))
    _summary_table("pulled", rows)
    return 0


def _summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=safe_text(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [(safe_text(k), safe_text(v)) for k, v in rows]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _probe_table(rows: list[dict]) -> None:
    from insitu.pipelines.probe import PROBE_NOTE, probe_table

    headers, cells = probe_table(rows)
    table = Table(title="probe (frozen features)", title_justify="left", caption=PROBE_NOTE, caption_justify="left")
    for col in headers:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*row)
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)  # logs and pipes: no folding


def _setup_logging(quiet: bool, light: bool = False) -> None:
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


# commands that never need the ML stack (no torch import: light and fast)
_LIGHT_COMMANDS = (
    _cmd_adapter_inspect,
    _cmd_adapter_verify,
    _cmd_adapter_keygen,
    _cmd_adapter_sign,
    _cmd_adapter_publish,
    _cmd_adapter_list,
    _cmd_adapter_pull,
)

if __name__ == "__main__":
    sys.exit(main())
