"""Downstream commands: ``probe``, ``finetune``, ``evaluate``, ``retrieve`` and ``predict``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from insitu.cli.common import add_options, add_overrides, console, parse_options, probe_table, summary_table


def add_probe(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "probe", help="repeated linear-probe/kNN (and dense) evaluation: frozen backbone vs adapter packages, with bootstrap CIs"
    )
    pr.add_argument("-c", "--config", type=Path, required=True, help="YAML config (backbone and probe sections)")
    pr.add_argument("--adapter", type=Path, action="append", default=[], help="adapter package folder or .zip (repeatable)")
    add_overrides(pr)
    pr.add_argument("--out", type=Path, help="folder for probe.csv and probe.json (default: the run folder)")
    pr.add_argument("--json", type=Path, help="also write the rows as JSON here")
    pr.add_argument("--overwrite", action="store_true", help="replace earlier probe.csv/probe.json and an existing --json file")
    pr.set_defaults(func=run_probe)


def add_finetune(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="train a downstream head (segmentation/classification) on labelled data")
    ft.add_argument("-c", "--config", type=Path, required=True, help="YAML config with a downstream section")
    ft.add_argument("--adapter", type=Path, help="adapter package folder or .zip (default: the untouched backbone)")
    ft.add_argument("--out", type=Path, help="model folder for insitu predict (default: <run>/finetune)")
    ft.add_argument("--overwrite", action="store_true", help="replace an earlier model in --out (only the files insitu wrote there)")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_overrides(ft)
    ft.set_defaults(func=run_finetune)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="frozen backbone vs adapter packages on a downstream task: table, CSV/JSON, report.html")
    ev.add_argument("-c", "--config", type=Path, required=True, help="YAML config with a downstream section")
    ev.add_argument("--adapter", type=Path, action="append", default=[], help="adapter package folder or .zip (repeatable)")
    ev.add_argument("--out", type=Path, help="results folder (default: <run>/evaluate)")
    ev.add_argument("--overwrite", action="store_true", help="replace earlier results in --out (only the files insitu wrote there)")
    add_overrides(ev)
    ev.set_defaults(func=run_evaluate)


def add_retrieve(sub: argparse._SubParsersAction) -> None:
    rt = sub.add_parser(
        "retrieve", help="image-text retrieval (Recall@k both ways) and zero-shot accuracy of a ConVIRT/CLIP adapter package"
    )
    rt.add_argument("-c", "--config", type=Path, required=True, help="YAML config whose data (or probe.test) holds image-text pairs")
    rt.add_argument("--adapter", type=Path, required=True, help="adapter package folder or .zip trained with convirt or clip")
    rt.add_argument("--prompts", type=Path, help="YAML/JSON mapping each class name to a prompt or a list of prompts (zero-shot)")
    rt.add_argument("--out", type=Path, help="folder for retrieval.csv and retrieval.json (default: <run>/retrieval)")
    rt.add_argument("--overwrite", action="store_true", help="replace earlier results in --out (only the files insitu wrote there)")
    add_overrides(rt)
    rt.set_defaults(func=run_retrieve)


def add_predict(sub: argparse._SubParsersAction) -> None:
    pd = sub.add_parser("predict", help="run a fine-tuned model over images, scenes, series or videos; write native formats")
    pd.add_argument("model", type=Path, help="folder written by insitu finetune")
    pd.add_argument("inputs", type=Path, help="file or folder to predict")
    pd.add_argument("--out", type=Path, required=True, help="output folder")
    pd.add_argument("--overwrite", action="store_true", help="replace earlier predictions in --out (only the files insitu wrote there)")
    pd.add_argument("--domain", default=None, help="data domain (default: the one the model was trained on)")
    pd.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    pd.add_argument("--batch-size", type=int, default=16, help="tiles or images per forward pass (bounds memory)")
    add_options(pd, "a domain option (tile_size too)")
    pd.set_defaults(func=run_predict)


def run_probe(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from insitu.config import load_config
    from insitu.io import add_files, check_output_file, write_json
    from insitu.pipelines.probe import primary_summary, run_probe, write_probe_outputs

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.run_dir
    if args.json:
        check_output_file(args.json, args.overwrite)
    folder = add_files(out, ("probe.csv", "probe.json"), "probe", args.overwrite)  # refuse before the work
    result = run_probe(cfg, args.adapter)
    rows = [asdict(r) for r in result]
    probe_table(rows)
    for line in primary_summary(rows):  # the verdict: the primary endpoint alone
        console.print(line, highlight=False, soft_wrap=True)
    csv_path, json_path = write_probe_outputs(result, out, cfg)
    folder.record(csv_path.name, json_path.name)
    console.print(f"wrote {csv_path} and {json_path}", highlight=False, soft_wrap=True)
    if args.json:
        write_json(args.json, rows, default=str)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.finetune import finetune

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.run_dir / "finetune"
    result = finetune(cfg, args.adapter, out_dir=out, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
    rows = [(k, f"{v:.4f}") for k, v in result.metrics.items()]
    rows += [("trainable params", f"{result.trainable_params:,}"), ("train/test", f"{result.n_train}/{result.n_test}")]
    summary_table(f"insitu finetune: {result.name}", [*rows, ("model folder", str(result.out_dir))])
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.pipelines.evaluate import evaluate, table_rows

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.run_dir / "evaluate"
    headers, cells = table_rows(evaluate(cfg, args.adapter, out, overwrite=args.overwrite))
    _print_table(f"insitu evaluate: {cfg.name} (mean ± std over seeds)", headers, cells)
    console.print(f"results: {out / 'evaluate.csv'}, {out / 'evaluate.json'}; report: {out / 'report.html'}", highlight=False)
    return 0


def run_retrieve(args: argparse.Namespace) -> int:
    from insitu.config import load_config
    from insitu.io import add_files
    from insitu.pipelines.retrieval import evaluate_retrieval, load_prompts, result_table, write_retrieval, zero_shot_line

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.run_dir / "retrieval"
    prompts = load_prompts(args.prompts) if args.prompts else None
    folder = add_files(out, ("retrieval.csv", "retrieval.json"), "retrieve", args.overwrite)  # refuse before the work
    result = evaluate_retrieval(cfg, args.adapter, prompts)
    written = write_retrieval(result, out)
    folder.record(*(p.name for p in written))
    _print_table(f"insitu retrieve: {cfg.name} ({result.n_pairs} held-out pairs, {result.n_groups} groups)", *result_table(result))
    if result.zero_shot_acc is not None:
        console.print(zero_shot_line(result), highlight=False)
    console.print("results: " + ", ".join(str(p) for p in written), highlight=False)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from insitu.pipelines.predict import predict

    options = parse_options(args.option)
    written = predict(args.model, args.inputs, args.out, args.domain, options, args.overwrite, args.device, args.batch_size)
    summary_table("insitu predict", [("files written", str(len(written))), ("folder", str(args.out))])
    return 0 if written else 1


def _print_table(title: str, headers: list[str], cells: list[list[str]]) -> None:
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for row in cells:
        table.add_row(*row)
    console.print(table)
