"""Training commands: ``quickstart``, ``pretrain``, ``base pretrain`` and ``federate``."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from insitu.cli.common import add_overrides, console, err_console, probe_table, safe_text, summary_table
from insitu.errors import ConfigError, RunInterrupted


def add_quickstart(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quickstart", help="generate the embedded demo data, pretrain adapters, probe, report")
    q.add_argument("--out", type=Path, default=Path("insitu-runs/quickstart"), help="run folder (default: insitu-runs/quickstart)")
    q.add_argument("--domain", default="images", help="which domain's demo to run (default: images)")
    add_overrides(q)
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out that another insitu command wrote (a quickstart's own is always replaced)",
    )
    q.set_defaults(func=run_quickstart)


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("pretrain", help="continual self-supervised pretraining of adapters from a config")
    t.add_argument("-c", "--config", type=Path, required=True, help="YAML config")
    add_overrides(t, "override a config key, e.g. train.max_steps=10")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument(
        "--overwrite", action="store_true", help="replace the earlier run in the run folder (only the files insitu wrote there are removed)"
    )
    t.add_argument("--probe", action="store_true", help="probe frozen vs adapted features at the end")
    t.set_defaults(func=run_pretrain)


def add_base(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("base", help="the embedded pretrained base (a ViT pretrained on generated fractals)")
    bsub = b.add_subparsers(title="base commands")
    bp = bsub.add_parser(
        "pretrain", help="pretrain a ViT from scratch on generated fractal images (a run config with data.domain: fractals)"
    )
    bp.add_argument("-c", "--config", type=Path, required=True, help="YAML run config, e.g. configs/base/fractal_vit_tiny.yaml")
    add_overrides(bp, "override a key, e.g. train.max_steps=100")
    bp.add_argument("--overwrite", action="store_true", help="replace the earlier base in the run folder (only the files insitu wrote)")
    bp.set_defaults(func=run_base_pretrain)


def add_federate(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("federate", help="federated continual pretraining of adapters across sites (Flower)")
    fsub = f.add_subparsers(title="federate commands")
    for name, text in (
        ("simulate", "run every site on this machine in Flower's simulation engine (testing, measurement)"),
        ("server", "coordinate the rounds: listen on federated.address, average the sites' adapters, write the package"),
        ("site", "train this site's data in each round; only adapter and head tensors leave the machine"),
    ):
        fp = fsub.add_parser(name, help=text)
        fp.add_argument("-c", "--config", type=Path, required=True, help="YAML run config with a federated section")
        add_overrides(fp, "override a key")
        if name == "simulate":
            fp.add_argument("--sites", type=int, default=None, help="number of sites (default: the federated.sites listed, else 2 shards)")
        if name != "site":
            fp.add_argument("--overwrite", action="store_true", help="replace insitu's earlier results in the run folder")
        fp.set_defaults(func=run_federate, role=name)


def run_quickstart(args: argparse.Namespace) -> int:
    from insitu.pipelines.quickstart import quickstart

    summary = quickstart(args.out, args.domain, args.overrides, quiet=args.quiet, overwrite=args.overwrite)
    p = summary["pretrain"]
    summary_table(
        "insitu quickstart",
        [
            ("run folder", summary["run_dir"]),
            ("report", summary["report"]),
            ("steps / final loss", f"{p['steps']} / {p['final_loss']:.4f}"),
            ("trainable / frozen params", f"{p['trainable_params']:,} / {p['frozen_params']:,}"),
            ("wall time", f"{summary['wall_s']} s (" + ", ".join(f"{k} {v} s" for k, v in summary["phases_s"].items()) + ")"),
        ],
    )
    probe_table(summary["probe"])
    console.print(summary["verdict"])
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    if cfg.data.domain == "fractals":  # a base pretraining run (insitu.pipelines.base_pretrain)
        if args.resume or args.probe:
            raise ConfigError("--resume and --probe are for adapter runs; a base run (data.domain: fractals) takes neither.")
        return _base_run(cfg, args)
    try:
        result = pretrain(cfg, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    except RunInterrupted as exc:  # exit 128 + signal, as a shell reports a killed process: a workflow must not carry on
        again = " ".join(["insitu pretrain -c", shlex.quote(str(args.config)), *(f"--set {shlex.quote(o)}" for o in args.overrides), "--resume"])
        err_console.print(f"[bold red]RunInterrupted[/]: {safe_text(str(exc), 4000)}", highlight=False, soft_wrap=True)
        err_console.print(f"resume with: {again}", highlight=False, markup=False, soft_wrap=True)
        return exc.exit_code
    if result.adapter_dir is None:  # a non-zero DDP rank
        return 0
    summary_table(
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
    rows = _probe_after_pretrain(cfg, result) if args.probe else None
    from insitu.pipelines.report import write_pretrain_report

    console.print(f"report: {write_pretrain_report(cfg, result, rows)}", highlight=False)
    return 0


def _probe_after_pretrain(cfg, result) -> list:  # noqa: ANN001 - a RunConfig and a PretrainResult (imported lazily)
    from dataclasses import asdict

    from insitu.pipelines.probe import run_probe, write_probe_outputs

    rows = run_probe(cfg, [result.adapter_dir])
    probe_table([asdict(r) for r in rows])
    write_probe_outputs(rows, result.run_dir, cfg)
    return rows


def run_base_pretrain(args: argparse.Namespace) -> int:
    from insitu.config import load_config

    return _base_run(load_config(args.config, args.overrides), args)


def _base_run(cfg, args: argparse.Namespace) -> int:  # noqa: ANN001 - a RunConfig (imported lazily)
    from insitu.pipelines.base_pretrain import base_pretrain

    weights = base_pretrain(cfg, quiet=args.quiet, overwrite=args.overwrite)
    card = json.loads(weights.with_suffix(".json").read_text())
    summary_table(
        f"insitu base pretrain: {cfg.name}",
        [
            ("weights", str(weights)),
            ("card", str(weights.with_suffix(".json"))),
            ("steps / images seen", f"{card['steps']} / {card['images_seen']:,}"),
            ("distinct images, whole chain", f"{card['distinct_images_seen_total']:,} of {card['images_seen_total']:,} seen"),
            ("final loss", f"{card['final_loss']:.4f}"),
            ("wall time", f"{card['wall_s']} s on {card['device']}"),
        ],
    )
    return 0


def run_federate(args: argparse.Namespace) -> int:
    from insitu.federated.run import load_federation_config, run_server, run_simulation, run_site

    cfg = load_federation_config(args.config, args.overrides, args.role)
    if args.role == "site":
        items = run_site(cfg)
        console.print(f"site finished: trained on {items} local items; nothing but adapter tensors left this machine", highlight=False)
        return 0
    result = run_simulation(cfg, args.sites, args.overwrite) if args.role == "simulate" else run_server(cfg, args.overwrite)
    s, fed = result.summary, cfg.federated
    dropped = sum(len(r.dropped) for r in result.state.rounds)
    security = [("channel, site replies", f"{'TLS' if fed.tls else 'plaintext'}, {'signed (federated.site_keys)' if fed.site_keys else 'not checked'}")]
    summary_table(
        f"insitu federate {args.role}: {cfg.name}",
        [
            ("run folder", str(result.run_dir)),
            ("adapter package", str(result.adapter_dir)),
            ("rounds x local steps", f"{s['rounds']} x {s['local_steps']} ({s['aggregation']})"),
            ("sites dropped (all rounds)", str(dropped)),
            ("sent per site per round", f"{s['shared_bytes_per_site_per_round']:,} bytes (full model: {s['full_model_bytes']:,})"),
            ("wall per round", ", ".join(f"{w:.1f}" for w in s["wall_s_per_round"]) + " s"),
            *(security if args.role == "server" else []),
        ],
    )
    return 0
