"""The collapse guard replayed on finished benchmark runs: would it have fired, and when?

For each run of one or more ``bench_objectives.py --out`` folders (their runs.jsonl, the kept
per-step metrics and adapter packages), two things:

1. **Replay.** The run's logged ``health/`` columns are fed step by step to today's
   `insitu.pipelines.health.CollapseGuard` with the default `HealthConfig` thresholds and the
   monitor's window (min(50, steps // 3)): teacher entropy ratio (uniform targets), marginal entropy
   ratio (one prototype), ``health/rankme`` (dimensional) and ``health/embedding_spread`` (head or
   projector). The table says which signs fired, at which step, and each sign's worst value. Runs
   logged before issue 38 logged RankMe uncentred on ≤ 32 items and no spread: their rank column is
   that older quantity (``rank logged as`` says which) and no spread is replayed for them.
2. **End state, recomputed.** Centred RankMe of the CLS features of a fixed set of ``--rank-items``
   images of the run's pretraining data (the first items of its training split, in manifest order),
   through the frozen base and through each kept package (student, teacher): the ratio adapted /
   frozen is what the dimensional guard compares at the end of a run that started from the frozen
   base (alarm below 0.5).

    python benchmarks/guard_replay.py --runs /path/bench-out/runs.jsonl [more.jsonl ...] [--rank-items 256]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_objectives import image_data  # noqa: E402
from insitu.adapters import AdaptedBackbone  # noqa: E402
from insitu.adapters.package import apply_package, load_package  # noqa: E402
from insitu.backbones import create_backbone  # noqa: E402
from insitu.config import DataConfig, HealthConfig  # noqa: E402
from insitu.objectives.health import rankme  # noqa: E402
from insitu.pipelines.data import ScannedData, collate  # noqa: E402
from insitu.pipelines.health import CollapseGuard  # noqa: E402
from insitu.pipelines.preprocess import resolve_preprocessing  # noqa: E402

COLUMNS = {
    "entropy": "health/teacher_entropy_ratio",
    "marginal": "health/teacher_marginal_entropy_ratio",
    "rank": "health/rankme",
    "spread": "health/embedding_spread",
}


def replay(metrics_csv: Path, steps: int, cfg: HealthConfig) -> dict[str, Any]:
    """Feed the logged health columns to a fresh guard; which signs fired (at which step) and each sign's worst value."""
    rows = list(csv.DictReader(metrics_csv.open()))
    guard = CollapseGuard(cfg.max_entropy_ratio, cfg.min_rank_fraction, min(cfg.window, max(1, steps // 3)), cfg.min_marginal_entropy_ratio, cfg.min_spread_fraction)
    fired: dict[str, int] = {}
    seen: dict[str, list[float]] = {k: [] for k in COLUMNS}
    for r in rows:
        values = {k: float(r[c]) if r.get(c) not in (None, "") else None for k, c in COLUMNS.items()}
        if all(v is None for v in values.values()):
            continue
        for k, v in values.items():
            if v is not None:
                seen[k].append(v)
        step = int(float(r["step"]))
        for alert in guard.observe(step, values["entropy"], values["rank"], values["marginal"], values["spread"]):
            sign = next(s for s, words in (("entropy", "teacher entropy"), ("marginal", "batch-mean"), ("spread", "spread"), ("rank", "effective rank")) if words in alert)
            fired[sign] = step
    worst = {
        "entropy max": max(seen["entropy"], default=None),
        "marginal min": min(seen["marginal"], default=None),
        "rank last/first": seen["rank"][-1] / seen["rank"][0] if seen["rank"] and seen["rank"][0] else None,
        "spread last/first": seen["spread"][-1] / seen["spread"][0] if seen["spread"] and seen["spread"][0] else None,
    }
    return {"fired": fired, **worst}


def rank_set(dataset: str, n: int) -> DataConfig:
    """The first ``n`` items of the run's pretraining data (its training split) as a data config."""
    data = image_data(dataset, argparse.Namespace(max_items=n))
    return DataConfig(**{**data, "image_size": 64})


@torch.no_grad()
def centred_rankme(model: AdaptedBackbone, cfg: DataConfig, package: Any) -> float:
    data = ScannedData.scan(cfg)
    items = data.manifest.items
    prep = resolve_preprocessing(package, data, items, 64, model)
    model.eval()
    cls = [model.forward_tokens(b["image"])[0].float() for b in DataLoader(prep.dataset(data, items), batch_size=64, collate_fn=collate)]
    return float(rankme(torch.cat(cls), centre=True))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="runs.jsonl of bench_objectives.py --out folders")
    p.add_argument("--rank-items", type=int, default=256)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = HealthConfig()
    runs = [json.loads(line) for path in args.runs for line in path.read_text().splitlines() if line.strip()]
    frozen_rank: dict[str, float] = {}
    print("| dataset | objective | seed | steps | rank logged as | fired (sign@step) | entropy max | marginal min | rank last/first | spread last/first | centred RankMe frozen | student / frozen | teacher / frozen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        metrics = Path(run["metrics_csv"]) if run.get("metrics_csv") else None
        if metrics is None or not metrics.is_file():
            print(f"| {run['dataset']} | {run['objective']} | {run['seed']} | no metrics kept |")
            continue
        header = metrics.open().readline()
        logged_as = "centred, fixed set" if "health/embedding_spread" in header or "health/match_entropy" in header else "uncentred, ≤ 32 items (before issue 38)"
        rep = replay(metrics, run["steps"], cfg)
        rs = rank_set(run["dataset"], args.rank_items)
        base = create_backbone({"weights": "insitu:fractal_vit_tiny", "img_size": 64, "in_chans": 1})
        if run["dataset"] not in frozen_rank:
            frozen_rank[run["dataset"]] = centred_rankme(AdaptedBackbone(base, None), rs, None)
        ratios = {}
        for kept in run.get("kept_adapters") or []:
            role = "teacher" if Path(kept).name.endswith("_teacher") else "student"
            pkg = load_package(kept)
            ratios[role] = centred_rankme(apply_package(pkg, base), rs, pkg) / frozen_rank[run["dataset"]]

        def f(v: float | None) -> str:
            return "" if v is None else f"{v:.3f}"

        fired = ", ".join(f"{k}@{v}" for k, v in rep["fired"].items()) or "none"
        print(
            f"| {run['dataset']} | {run['objective']} | {run['seed']} | {run['steps']} | {logged_as} | {fired} | {f(rep['entropy max'])} | "
            f"{f(rep['marginal min'])} | {f(rep['rank last/first'])} | {f(rep['spread last/first'])} | {frozen_rank[run['dataset']]:.1f} | "
            f"{f(ratios.get('student'))} | {f(ratios.get('teacher'))} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
