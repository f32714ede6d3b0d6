"""The embedded demo: write a seeded dataset in a real format, pretrain, probe, report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from insitu.config import RunConfig, apply_override, validate_config
from insitu.domains import get_domain_class
from insitu.exports import markdown_table, plot_loss_curve, write_report
from insitu.io import atomic_write_text, claim_folder, read_owner
from insitu.pipelines.pretrain import PretrainResult, pretrain
from insitu.pipelines.probe import PROBE_NOTE, ProbeRow, probe_table, run_probe, write_probe_outputs
from insitu.privacy import shown_weights


def quickstart_config(out: Path, domain: str = "images", overrides: list[str] | None = None) -> RunConfig:
    """Write the demo data under ``out/data`` and return the validated quickstart config."""
    raw: dict[str, Any] = yaml.safe_load(resources.files("insitu.pipelines").joinpath("quickstart.yaml").read_text())
    for override in overrides or []:
        apply_override(raw, override)
    size = int(raw["data"].get("image_size", 64))
    demo = get_domain_class(domain).make_demo(out / "data", seed=int(raw.get("seed", 0)), size=size)
    raw["data"] = {**raw["data"], **demo.data}
    raw["probe"] = {**raw.get("probe", {}), "train": demo.probe_train, "test": demo.probe_test}
    raw["backbone"]["in_chans"] = demo.in_chans
    raw["out_dir"], raw["name"] = str(out.resolve().parent), out.resolve().name
    for override in overrides or []:  # overrides win over the demo's defaults too
        apply_override(raw, override)
    return validate_config(raw, "quickstart")


def quickstart(
    out: Path = Path("insitu-runs/quickstart"),
    domain: str = "images",
    overrides: list[str] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole pipeline on the embedded demo; writes ``out/adapter`` and ``out/report.md``.

    Re-running into the same folder replaces the earlier quickstart's own files and nothing else;
    a folder insitu did not create is refused (see :func:`insitu.io.claim_folder`).
    """
    start = time.perf_counter()
    out = Path(out)
    record = read_owner(out) if out.is_dir() else None
    folder = claim_folder(out, "quickstart", overwrite or (record or {}).get("command") == "quickstart", lock=True)
    try:
        cfg = quickstart_config(out, domain, overrides)
        result = pretrain(cfg, quiet=quiet, folder=folder)
        rows = run_probe(cfg, [result.adapter_dir]) if result.adapter_dir else []
        if rows:
            write_probe_outputs(rows, cfg.run_dir, cfg)
        wall = time.perf_counter() - start
        report = _report(cfg, result, rows, wall)
        summary = {
            "run_dir": str(cfg.run_dir),
            "report": str(report),
            "wall_s": round(wall, 1),
            "pretrain": result.summary,
            "probe": [asdict(r) for r in rows],
        }
        atomic_write_text(cfg.run_dir / "quickstart.json", json.dumps(summary, indent=2))
    finally:
        folder.record()
        folder.unlock()
    return summary


def describe_backbone(cfg: RunConfig) -> str:
    """One honest paragraph on where the backbone's weights came from."""
    bb = cfg.backbone
    if bb.weights and bb.weights.startswith("insitu:"):
        from insitu.backbones import packaged_card

        card = packaged_card(bb.weights.removeprefix("insitu:"))
        return (
            f"`{bb.weights}`: insitu's embedded base, a {card['architecture']['name']} ({card['architecture']['kwargs']}, "
            f"patch {card['architecture']['patch_size']}) pretrained on generated fractal images only, by {card['training']} "
            f"({card['steps']} steps, {card['images_seen']:,} images, {card['device']}). It has generic features, not a "
            "foundation model's: point `backbone.weights` at real weights (safetensors, a DINOv2 folder) or set "
            "`backbone.pretrained: true` when you can."
        )
    if bb.weights or bb.pretrained:
        return f"`{bb.name}` with weights from `{shown_weights(bb.weights).removeprefix('weights ') if bb.weights else 'the timm hub'}`."
    return (
        f"`{bb.name}` ({bb.kwargs or 'default size'}, patch {bb.patch_size}, {bb.img_size} px). **The backbone is randomly "
        f"initialised** (init seed {bb.init_seed}), so these numbers show the mechanics, not what a pretrained model gives. "
        "Use `backbone.weights: insitu:fractal_vit_tiny` (the embedded base), a local safetensors file, or "
        "`backbone.pretrained: true` for real weights."
    )


def _report(cfg: RunConfig, result: PretrainResult, rows: list[ProbeRow], wall: float) -> Path:
    loss_png = plot_loss_curve(cfg.run_dir, cfg.run_dir / "loss_curve.png")
    s = result.summary
    backbone_note = describe_backbone(cfg)
    probe = markdown_table(*probe_table(rows)) + "\n\n" + PROBE_NOTE
    sections = [
        (
            "What ran",
            f"Continual self-supervised pretraining (`{cfg.objective.name}`) of bottleneck adapters on a frozen ViT, "
            f"on the embedded demo data, then a frozen-feature probe. Total wall time {wall:.0f} s on {s['device']}.",
        ),
        ("Backbone", backbone_note),
        (
            "Data",
            f"{s['items']} unlabelled training images ({s['quarantined']} quarantined); the probe uses the labelled "
            f"train/test folders written next to it.",
        ),
        (
            "Training",
            f"{s['steps']} steps, final loss {s['final_loss']:.4f}, {s['trainable_params']:,} trainable vs "
            f"{s['frozen_params']:,} frozen parameters, {s['wall_s']} s, precision {s['precision']}.",
        ),
        ("Probe (frozen features)", probe),
        (
            "Files",
            "`adapter/` (adapter.safetensors, insitu.json, README.md), `config.yaml` (resolved config), `probe.csv`/`probe.json`, "
            "`logs/metrics.csv`, `tensorboard/`, `checkpoints/`, `manifest/`.",
        ),
    ]
    from insitu.exports.html import write_html_report
    from insitu.exports.plots import health_plot
    from insitu.exports.report_html import health_section

    figures = [("pretraining loss", loss_png)]
    if s.get("health"):
        sections.insert(4, ("Training health", health_section(s["health"])))
        figures.append(("training health metrics", health_plot(cfg.run_dir, cfg.run_dir / "health.png", cfg.health.max_entropy_ratio)))
    write_html_report(cfg.run_dir / "report.html", "insitu quickstart report", sections, [f for f in figures if f[1] is not None])
    return write_report(cfg.run_dir, "insitu quickstart report", sections, loss_png)
