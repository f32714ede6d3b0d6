"""Image-text pretraining on REAL clinical notes (COVID-19 image data collection): ConVIRT, CLIP-style, baselines, DINO.

Supersedes benchmarks/bench_convirt.py for evidence (that script stays: PneumoniaMNIST with SYNTHETIC
text written from the label, a mechanics check). Config: configs/medical/covid_cxr_convirt.yaml
(X-rays only, patients split once ~70/30 stratified by class; held-out patients never in pretraining).

PRIMARY ENDPOINT (declared before the first run): image→text Recall@5 on the held-out patients'
pairs, ConVIRT (adapters + text upper layers + projections) minus the projection-only baseline
(frozen image tower, frozen text tower, only g_v/g_u trained), pooled over the seeds, 95% CI from
the two-way bootstrap over held-out patients and training seeds (insitu.heads.stats). Everything
else is secondary and reported without multiplicity correction.

Conditions, all on the same training patients and scored on the same held-out patients, per seed:

- convirt: bottleneck adapters on the frozen shipped base + MiniLM upper 3 layers + projections;
  ConVIRT loss (τ = 0.1 fixed, λ = 0.75).
- clip: the same towers with the CLIP-style objective (symmetric λ = 0.5, learnt temperature).
- frozen_image: ConVIRT with image_tower: frozen (no adapters) and the same trained text layers.
- proj_only: image_tower: frozen and text trainable_layers: 0: only the two projections train.
- No zero-training image-text baseline: with untrained projections the image and text spaces are
  unrelated (random projections), so its expected Recall@k is the chance level, printed per k.
- dino: DINO (image only) with adapters on the same training images; a linear and a kNN probe of
  the 3-class finding on backbone features, train patients -> held-out patients (`insitu probe`),
  next to the frozen base and the ConVIRT/CLIP image towers (what the reports buy an image encoder).

Intervals: per condition, the two-way bootstrap over held-out patients and seeds; per seed run,
`insitu retrieve`'s bootstrap over held-out patients. Zero-shot: 3 classes from the prompts in
prompts/covid_cxr.yaml, labelled held-out images only.

Run (one process): ``OMP_NUM_THREADS=1 python benchmarks/bench_image_text.py --out OUT`` (20 steps: the measured setting). On a loaded
machine the conditions can run as parallel parts, each with its own ``--out``, then be merged (the merge runs the
probe over every part's packages and prints every table):

    OMP_NUM_THREADS=1 python benchmarks/bench_image_text.py --conditions convirt proj_only --out OUT/a --no-tables &
    OMP_NUM_THREADS=1 python benchmarks/bench_image_text.py --conditions clip frozen_image --out OUT/b --no-tables &
    OMP_NUM_THREADS=1 python benchmarks/bench_image_text.py --conditions dino --out OUT/c --no-tables &
    wait; OMP_NUM_THREADS=1 python benchmarks/bench_image_text.py --merge OUT/a OUT/b OUT/c --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from insitu.config import load_config
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe
from insitu.pipelines.retrieval import KS, evaluate_retrieval, load_prompts, paired_seed_delta, seed_pooled_interval

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "medical" / "covid_cxr_convirt.yaml"
PROMPTS = REPO / "prompts" / "covid_cxr.yaml"
CONDITIONS = {  # the primary endpoint's two conditions first
    "convirt": [],
    "proj_only": ["objective.options.image_tower=frozen", "objective.options.trainable_layers=0"],
    "clip": ["objective.name=clip", "objective.options.temperature=0.07", "objective.options.lam=0.5"],
    "frozen_image": ["objective.options.image_tower=frozen"],
}
METRICS = [f"image_to_text@{k}" for k in KS] + [f"text_to_image@{k}" for k in KS] + ["zero_shot"]
PRIMARY = ("convirt", "proj_only", "image_to_text@5")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args, out)
        return
    prompts = load_prompts(PROMPTS)
    hits: dict[str, dict[str, list[list[int]]]] = {c: {m: [] for m in METRICS} for c in CONDITIONS}
    chance, groups, adapters, wall = {}, None, {}, {}
    for name, extra in CONDITIONS.items():
        if name not in args.conditions:
            continue
        for seed in args.seeds:
            cfg = load_config(CONFIG, overrides=[*base_overrides(args, out, name, seed), *extra])
            t0 = time.perf_counter()
            run = pretrain(cfg, quiet=True)
            result = evaluate_retrieval(cfg, run.adapter_dir, prompts)
            wall.setdefault(name, []).append(time.perf_counter() - t0)
            adapters.setdefault(name, []).append(run.adapter_dir)
            chance, groups = result.chance, result.groups
            for m in METRICS:
                hits[name][m].append(result.hits[m])
            save(out, hits, groups, chance, adapters, wall)
            print(
                f"{name} seed {seed}: {run.steps} steps, loss {run.final_loss:.3f}, {wall[name][-1]:.0f} s; "
                f"i2t R@5 {result.image_to_text[5]:.3f} {result.intervals['image_to_text@5']}, "
                f"zero-shot {result.zero_shot_acc:.3f} {result.zero_shot_interval}",
                flush=True,
            )
    if "dino" in args.conditions:
        for seed in args.seeds:
            dino(args, out, seed, adapters, wall)
            save(out, hits, groups, chance, adapters, wall)
    if not args.no_tables:
        print_tables(hits, groups, chance, probe(args, out, adapters), wall, args)


def save(out: Path, hits: dict, groups: list[str] | None, chance: dict, adapters: dict, wall: dict) -> None:
    """Everything a merge needs, after every run (a stopped benchmark keeps what it finished)."""
    adapters = {k: [str(p) for p in v] for k, v in adapters.items()}
    (out / "hits.json").write_text(json.dumps({"hits": hits, "groups": groups, "chance": chance, "adapters": adapters, "wall": wall}))


def merge(args: argparse.Namespace, out: Path) -> None:
    """Combine parts run with different --conditions (same seeds, steps and held-out patients), probe, print."""
    hits: dict[str, dict[str, list[list[int]]]] = {c: {m: [] for m in METRICS} for c in CONDITIONS}
    groups, chance, adapters, wall = None, {}, {}, {}
    for part in args.merge:
        if not (Path(part) / "hits.json").is_file():  # a part still on its first condition: its finished packages only
            for adapter in sorted(Path(part).glob("runs/*_s*/adapter")):
                adapters.setdefault(adapter.parent.name.rsplit("_s", 1)[0], []).append(adapter)
            continue
        saved = json.loads((Path(part) / "hits.json").read_text())
        if saved["groups"] is not None:
            numbered: dict[str, str] = {}  # parts may name patients differently (hashed or g0, g1, ...): compare the structure
            saved["groups"] = [numbered.setdefault(g, f"g{len(numbered)}") for g in saved["groups"]]
            if groups is not None and saved["groups"] != groups:
                raise SystemExit(f"{part} was scored on other held-out pairs; merge parts of one configuration only")
            groups, chance = saved["groups"], {int(k): v for k, v in saved["chance"].items()}
        for c, per_metric in saved["hits"].items():
            if per_metric["zero_shot"]:
                hits[c] = per_metric
        adapters.update({k: [Path(p) for p in v] for k, v in saved["adapters"].items()})
        wall.update(saved["wall"])
    print_tables(hits, groups, chance, [] if args.no_probe else probe(args, out, adapters), wall, args)


def base_overrides(args: argparse.Namespace, out: Path, name: str, seed: int) -> list[str]:
    return [
        f"out_dir={out}/runs",
        f"name={name}_s{seed}",
        f"seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.checkpoint_every={args.steps}",
        "trainer.accelerator=cpu",
    ]


def dino(args: argparse.Namespace, out: Path, seed: int, adapters: dict[str, list[Path]], wall: dict) -> None:
    """DINO adapters (image only) on the same training images, one seed."""
    cfg = load_config(CONFIG, overrides=[*base_overrides(args, out, "dino", seed), "objective={name: dino}"])
    t0 = time.perf_counter()
    run = pretrain(cfg, quiet=True)
    wall.setdefault("dino", []).append(time.perf_counter() - t0)
    adapters.setdefault("dino", []).append(run.adapter_dir)
    print(f"dino seed {seed}: {run.steps} steps, loss {run.final_loss:.3f}, {wall['dino'][-1]:.0f} s", flush=True)


def probe(args: argparse.Namespace, out: Path, adapters: dict[str, list[Path]]) -> list:
    """One probe of the frozen base and every image tower (ConVIRT, CLIP, DINO packages), train -> held-out patients."""
    packages = [p for name in ("convirt", "clip", "dino") for p in adapters.get(name, [])]
    if not packages:
        return []
    cfg = load_config(CONFIG, overrides=[f"out_dir={out}/runs", "name=probe", "trainer.accelerator=cpu"])
    return run_probe(cfg, packages)


def pooled(h: list[list[int]], groups: list[str]) -> tuple[float, float, float]:
    return seed_pooled_interval(np.array(h), groups)


def print_tables(hits: dict, groups: list[str] | None, chance: dict, probe_rows: list, wall: dict, args: argparse.Namespace) -> None:
    done = [c for c in hits if hits[c]["zero_shot"]]
    if done and groups is not None:
        n_zs = int((np.array(hits[done[0]]["zero_shot"][0]) >= 0).sum())
        n_pat = len(set(groups))
        print(
            f"\nheld-out patients: {n_pat} ({len(groups)} pairs; zero-shot on {n_zs} labelled images); seeds per condition in (), "
            f"{args.steps} steps, batch {args.batch_size}; pooled over seeds [95% CI: two-way bootstrap, patients x seeds]"
        )
        header = f"{'condition':14s}" + "".join(f"{m.replace('image_to_text', 'i2t').replace('text_to_image', 't2i'):>24s}" for m in METRICS)
        print(header)
        for c in done:
            cells = [pooled(hits[c][m], groups) for m in METRICS]
            print(f"{c + f' ({len(hits[c][METRICS[0]])})':14s}" + "".join(f"{v:7.3f} [{lo:.3f},{hi:.3f}]" for v, lo, hi in cells))
        print(f"{'chance':14s}" + "".join(f"{chance[k]:>24.3f}" for k in KS) * 2 + f"{'(majority below)':>24s}")
        per_seed = {c: [float(np.mean(np.array(h)[np.array(h) >= 0])) for h in hits[c]["image_to_text@5"]] for c in done}
        print("\nper-seed image→text R@5: " + "; ".join(f"{c} " + ", ".join(f"{x:.3f}" for x in v) for c, v in per_seed.items()))
        zs = np.array(hits[done[0]]["zero_shot"][0])
        print(f"zero-shot: {n_zs} labelled held-out images; always-majority-class accuracy would be {majority_share(zs, args):.3f}")
        print("\npaired differences, pooled over seeds [95% CI, two-way bootstrap]; PRIMARY first")
        pairs = [PRIMARY, ("convirt", "frozen_image", "image_to_text@5"), ("clip", "proj_only", "image_to_text@5")]
        pairs += [("convirt", "proj_only", "text_to_image@5"), ("convirt", "proj_only", "zero_shot"), ("clip", "convirt", "image_to_text@5")]
        for a, b, m in pairs:
            if a in done and b in done:
                n = min(len(hits[a][m]), len(hits[b][m]))  # seed s of one paired with seed s of the other
                d, lo, hi = paired_seed_delta(np.array(hits[a][m][:n]), np.array(hits[b][m][:n]), groups)
                tag = "PRIMARY " if (a, b, m) == PRIMARY else ""
                print(f"  {tag}{a} - {b}, {m} ({n} seeds): {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    if probe_rows:
        print(f"\nprobe of the 3-class finding on backbone features, train patients -> held-out patients ({probe_rows[0].n_train} -> {probe_rows[0].n_test} images)")
        print(f"{'model':48s} {'linear':>8s} {'kNN':>8s}")
        for row in probe_rows:
            print(f"{row.name[-48:]:48s} {row.linear_acc:8.3f} {row.knn_acc:8.3f}")
    print("\nwall per run (pretrain + retrieval), s: " + ", ".join(f"{c} {np.mean(v):.0f}" for c, v in wall.items()))


def majority_share(zero_shot_hits: np.ndarray, args: argparse.Namespace) -> float:
    """The share of the largest class among the labelled held-out images (from the evaluation config)."""
    from insitu.pipelines.data import ScannedData

    cfg = load_config(CONFIG)
    labels = [i.label for i in ScannedData.scan(cfg.probe.test).manifest.items]
    return max(labels.count(c) for c in set(labels)) / len(labels)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--conditions", nargs="+", default=[*CONDITIONS, "dino"], choices=[*CONDITIONS, "dino"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/work/bench-out/imagetext")
    p.add_argument("--no-tables", action="store_true", help="a part of a parallel run: save hits.json, print no tables, run no probe")
    p.add_argument("--no-probe", action="store_true", help="with --merge: the retrieval tables only")
    p.add_argument("--merge", nargs="+", help="folders of parts (their hits.json): combine, probe, print every table")
    return p.parse_args()


if __name__ == "__main__":
    main()
