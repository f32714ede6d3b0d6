"""The embedded demo: write a seeded dataset in a real format, pretrain, probe, report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from insitu.config import RunConfig, validate_config
from insitu.domains import get_domain_class
from insitu.domains.base import DemoData
from insitu.exports import markdown_table, plot_loss_curve, write_report
from insitu.exports.verdict import verdict_text as exports_verdict
from insitu.io import claim_folder, read_owner, write_json
from insitu.pipelines.pretrain import PretrainResult, pretrain
from insitu.pipelines.probe import PROBE_NOTE, ProbeRow, probe_table, result_rows, run_probe, write_probe_outputs
from insitu.privacy import shown_weights
from insitu.raw_config import config_overrides, deep_merge
from insitu.weights import shipped_card

log = logging.getLogger("insitu")


def quickstart_config(out: Path, domain: str = "images", overrides: list[str] | None = None) -> tuple[RunConfig, DemoData]:
    """Write the demo data under ``out/data``; return the validated quickstart config and what the demo wrote."""
    raw: dict[str, Any] = yaml.safe_load(resources.files("insitu.pipelines").joinpath("quickstart.yaml").read_text())
    raw = config_overrides(raw, overrides or [])
    size = int(raw["data"].get("image_size", 64))
    demo = get_domain_class(domain).make_demo(out / "data", seed=int(raw.get("seed", 0)), size=size)
    raw = deep_merge(raw, demo.recipe)
    raw["data"] = {**raw["data"], **demo.data}
    raw["probe"] = {**raw.get("probe", {}), "train": demo.probe_train, "test": demo.probe_test}
    raw["backbone"]["in_chans"] = demo.in_chans
    raw["out_dir"], raw["name"] = str(out.resolve().parent), out.resolve().name
    raw = config_overrides(raw, overrides or [])  # overrides win over the demo's defaults too
    return validate_config(raw, "quickstart"), demo


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
    clock = PhaseClock(quiet)
    out = Path(out)
    record = read_owner(out) if out.is_dir() else None
    folder = claim_folder(out, "quickstart", overwrite or (record or {}).get("command") == "quickstart", lock=True)
    try:
        clock.start("data", "writing the demo data")
        cfg, demo = quickstart_config(out, domain, overrides)
        clock.start("pretrain", f"pretraining adapters ({cfg.train.max_steps} steps; the progress bar shows its ETA)")
        result = pretrain(cfg, quiet=quiet, folder=folder)
        clock.start("probe", "probing frozen vs adapted features")
        rows = run_probe(cfg, [result.adapter_dir]) if result.adapter_dir else []
        if rows:
            write_probe_outputs(rows, cfg.run_dir, cfg)
        clock.start("report", "writing the report")
        report = _report(cfg, result, rows, clock, demo.description)
        clock.stop()
        summary = {
            "run_dir": str(cfg.run_dir),
            "report": str(report),
            "wall_s": round(clock.total, 1),
            "phases_s": clock.rounded(),
            "verdict": verdict_text(rows),
            "pretrain": result.summary,
            "probe": [asdict(r) for r in rows],
        }
        write_json(cfg.run_dir / "quickstart.json", summary)
    finally:
        folder.record()
        folder.unlock()
    return summary


# measured wall seconds of each phase of the embedded quickstart on the project's 2-core CPU (README);
# only used to print a rough ETA before each phase
TYPICAL_PHASE_S = {"data": 1, "pretrain": 28, "probe": 6, "report": 1}


class PhaseClock:
    """Wall time per phase, with one progress line (elapsed, rough time left) when a phase starts."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()
        self.phases: dict[str, float] = {}
        self.current: tuple[str, float] | None = None

    def start(self, name: str, what: str) -> None:
        self.stop()
        now = time.perf_counter()
        self.current = (name, now)
        left = sum(v for k, v in TYPICAL_PHASE_S.items() if k not in self.phases)
        if not self.quiet:
            log.info("[%s] %s (%.0f s elapsed, about %.0f s left)", name, what, now - self.t0, left)

    def stop(self) -> None:
        if self.current is not None:
            name, t = self.current
            self.phases[name] = time.perf_counter() - t
            self.current = None

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.phases.items()}


def describe_backbone(cfg: RunConfig) -> str:
    """One honest paragraph on where the backbone's weights came from."""
    bb = cfg.backbone
    if bb.weights and bb.weights.startswith("insitu:"):
        card = shipped_card(bb.weights.removeprefix("insitu:"))
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


def verdict_text(rows: list[ProbeRow]) -> str:
    """The report's verdict paragraph, decided by the pre-registered primary endpoint (:mod:`insitu.exports.verdict`)."""
    return exports_verdict(result_rows(rows))


def _report(cfg: RunConfig, result: PretrainResult, rows: list[ProbeRow], clock: PhaseClock, demo: str) -> Path:
    loss_png = plot_loss_curve(cfg.run_dir, cfg.run_dir / "loss_curve.png")
    s = result.summary
    backbone_note = describe_backbone(cfg)
    probe = markdown_table(*probe_table(rows)) + "\n\n" + PROBE_NOTE
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items())
    blocks = cfg.adapter.options["blocks"]
    where = "every block" if blocks == "all" else f"the last {blocks} blocks" if isinstance(blocks, int) else f"blocks {blocks}"
    verdict = (
        f"{cfg.adapter.name.capitalize()} adapters in {where} of a frozen ViT (`{cfg.backbone.weights or cfg.backbone.name}`) were "
        f"trained by `{cfg.objective.name}` self-supervision on {s['items']} unlabelled demo images; then a "
        "linear and a kNN probe compared frozen and adapted features on held-out images.\n\n" + verdict_text(rows)
    )
    caveat = (
        f"The demo: {demo}.\n\nWhat a real foundation model would change: "
        + (
            "the embedded base is a small ViT pretrained on generated fractals"
            if (cfg.backbone.weights or "").startswith("insitu:")
            else "this backbone is not a foundation model (see Backbone below)"
        )
        + ", so it starts weaker and adapts differently than DINOv2 or RAD-DINO would; with real weights "
        "(`backbone.weights`) the frozen baseline is higher and the room for adaptation is different. These numbers "
        "show the method and the measurement on this demo, not what your data will gain."
    )
    sections = [
        ("Verdict", verdict),
        ("What these numbers show", caveat),
        (
            "What ran",
            f"Continual self-supervised pretraining (`{cfg.objective.name}`) of {cfg.adapter.name} adapters on a frozen ViT, "
            f"on the embedded demo data, then a frozen-feature probe, on {s['device']}. Wall time before this report: "
            f"{clock.total:.0f} s ({phases}).",
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
    from insitu.exports.plots import forest_plot, health_plot
    from insitu.exports.report_html import FOREST_CAPTION, health_section

    figures = [("pretraining loss", loss_png)]
    if s.get("health"):
        sections.insert(6, ("Training health", health_section(s["health"])))
        figures.append(("training health metrics", health_plot(cfg.run_dir, cfg.run_dir / "health.png", cfg.health.max_entropy_ratio)))
    lead = (FOREST_CAPTION, forest_plot(result_rows(rows), cfg.run_dir / "forest_plot.png"))
    write_html_report(cfg.run_dir / "report.html", "insitu quickstart report", sections, [f for f in figures if f[1] is not None], lead)
    return write_report(cfg.run_dir, "insitu quickstart report", sections, loss_png, lead)
