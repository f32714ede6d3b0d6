"""Federated adapters vs each site alone vs all data pooled, on real data split into sites.

Sites (materialised as symlinked or PNG class folders in a temporary directory; labels are never
used for pretraining):

- ``polypgen``: PolypGen's two centres as two real sites (each 250 polyp + 250 no-polyp
  frames). Probe: polyp vs no polyp over both centres, folds grouped by sequence (negative frames
  of one sequence never straddle folds) and near-duplicate hash; RGB, the base's stem adapted.
- ``pneumoniamnist``: ``--sites`` sites (3 unless told) of ``--site-items`` training X-rays each with
  pneumonia shares spread evenly from 0.15 to 0.85 (3 sites: 0.15 / 0.50 / 0.85; 5 sites: 0.15 / 0.325 /
  0.50 / 0.675 / 0.85; non-IID, seeded). Probe: the held-out val split (270 images), never pretrained on.
- ``busi``: the 622 ultrasound images dealt to 3 sites, a site drawing its own class with
  probability 0.6 and each other class with 0.2 (non-IID, seeded). Probe: all BUSI images
  (the in-situ setting of docs/evaluation.md), folds grouped by near-duplicate hash.

Conditions per seed, same recipe for all (the quickstart's SimCLR bottleneck adapters in the last
two blocks of the shipped base, lr 0.02, batch 32, cached views; chosen before this benchmark
existed and not tuned here): ``federated`` (R rounds x L local steps at every site, FedAvg by
items, Flower's simulation engine), ``site k alone`` (R x L steps on site k's data: the work it
does in the federation), ``pooled`` (S x R x L steps on all sites' data together: the same total
steps as the federation; the upper bound). Every model is probed with the library's repeated
protocol (stratified group 5-fold x repeats, full and 10 % labels, linear and kNN) in the same run
as the frozen base. Across seeds: mean +/- std, and paired differences (federated - mean of sites
alone, federated - pooled, federated - frozen) with a 95 % t interval over seeds.

With ``--aggregation fedavg trimmed_mean median krum`` the conditions are instead one federation
per aggregation rule (same seed, same sites, same recipe; ``federated.aggregation`` alone
differs), all probed in the same run; reported per rule: probe accuracy, the paired difference to
``fedavg`` over seeds, the simulation's wall time per round, and the bytes per round the server
sends and receives (the serialised payloads: the shared tensors as Flower encodes them, per site).
The sites-alone and pooled conditions are not run in this mode. The real gRPC transport with TLS
on and off is timed by ``benchmarks/bench_federated_tls.py`` (simulation has no transport).

With ``--attack signflip`` every rule is also run with one attacking site (chosen from the seed,
the same site for every rule): each round it trains as usual, then replies ``g + F * (w - g)``
(``g``: the global tensors it received, ``w``: what it trained; ``F = --attack-factor``, -20 unless
told), i.e. its update sign-flipped and boosted. The attack lives in this benchmark only: the
simulated site's Flower client is wrapped (``SignFlipSites``); the server, its checks and every rule
are the library's, with insitu's defences at their defaults (``max_update_norm`` off, the 1e6
magnitude check, item counts clipped to 10^6 and no site above half the weight). Primary measure,
declared before the 5-site runs: kNN accuracy with all labels (``knn 100%``) on the held-out val
split, paired over seeds against honest ``fedavg`` and against the frozen base (95 % t interval).

    python benchmarks/bench_federated.py                         # all three datasets, seeds 0 1 2
    python benchmarks/bench_federated.py --datasets polypgen --seeds 0 --rounds 2 --local-steps 2   # smoke
    python benchmarks/bench_federated.py --datasets pneumoniamnist polypgen --aggregation fedavg trimmed_mean median krum
    python benchmarks/bench_federated.py --datasets pneumoniamnist --sites 5 --aggregation fedavg trimmed_mean median krum --attack signflip
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from insitu.config import load_config
from insitu.federated import flower
from insitu.federated.run import run_simulation
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PNEUMONIA = DATA / "medical" / "pneumoniamnist" / "pneumoniamnist_balanced_trainval.npz"
BUSI = DATA / "medical" / "busi"
POLYPGEN = DATA / "endoscopy" / "polypgen"


# ---------------------------------------------------------------- sites and probes


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def polypgen_sites(tmp: Path, seed: int, args: argparse.Namespace) -> tuple[list[Path], dict[str, Any], int]:
    sites, probe = [], tmp / "probe"
    for centre in ("A", "B"):
        root = POLYPGEN / f"centre_{centre}"
        site = tmp / f"site_{centre}"
        for i, f in enumerate(sorted(root.rglob("*.jpg"))):
            _link(f, site / f"{i:04d}.jpg")
            cls = "positive" if "positive" in f.parts else "negative"
            seq = f.parent.name if cls == "negative" else f"pos{i}"
            _link(f, probe / cls / f"{centre}_{seq}_{f.name}")
        sites.append(site)
    # aspect crop: frame size gives the class away otherwise (docs/surgical_video.md, "Size and aspect shortcuts")
    options = {"labels": "folders", "channels": 3, "group_pattern": r"^([AB]_(?:seq\d+_neg|pos\d+))", "aspect": "crop"}
    side = {"domain": "images", "root": str(probe), "options": options}
    return sites, _probe(side, args, near_duplicates=True), 3


def pneumonia_sites(tmp: Path, seed: int, args: argparse.Namespace) -> tuple[list[Path], dict[str, Any], int]:
    arrays = np.load(PNEUMONIA)
    images, labels = arrays["train_images"], arrays["train_labels"].reshape(-1)
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in (0, 1)}
    sites = []
    for k, share in enumerate(np.linspace(0.15, 0.85, args.sites)):
        n1 = round(args.site_items * float(share))
        picks = [(1, pools[1].pop()) for _ in range(n1)] + [(0, pools[0].pop()) for _ in range(args.site_items - n1)]
        site = tmp / f"site_{k + 1}"
        for c, i in picks:
            (site / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(site / str(c) / f"{i}.png")
        sites.append(site)
    side = {"domain": "images", "root": str(PNEUMONIA), "options": {"split": "val", "channels": 1}}
    return sites, _probe(side, args, near_duplicates=False), 1


def busi_sites(tmp: Path, seed: int, args: argparse.Namespace) -> tuple[list[Path], dict[str, Any], int]:
    rng = np.random.default_rng(seed)
    classes = ["benign", "malignant", "normal"]
    sites = [tmp / f"site_{k + 1}" for k in range(3)]
    for c, name in enumerate(classes):
        for f in sorted((BUSI / name).glob("*.png")):
            k = rng.choice(3, p=[0.6 if j == c else 0.2 for j in range(3)])
            _link(f, sites[k] / name / f.name)
    side = {"domain": "images", "root": str(BUSI), "options": {"channels": 1, "labels": "folders"}}
    return sites, _probe(side, args, near_duplicates=True), 1


SITES = {"polypgen": polypgen_sites, "pneumoniamnist": pneumonia_sites, "busi": busi_sites}


def _probe(side: dict[str, Any], args: argparse.Namespace, near_duplicates: bool) -> dict[str, Any]:
    return {
        "train": {**side, "image_size": 64},
        "folds": 5,
        "repeats": args.repeats,
        "label_fractions": [1.0, 0.1],
        "bootstrap": args.bootstrap,
        "knn_k": 10,
        "group_near_duplicates": near_duplicates,
    }


def run_config(name: str, seed: int, out: Path, data: Path, in_chans: int, steps: int, probe: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's recipe (SimCLR, bottleneck adapters in the last 2 blocks, cached views), unchanged."""
    return {
        "name": name,
        "seed": seed,
        "out_dir": str(out),
        "data": {  # pretraining sees images squared as the probe's are
            "domain": "images",
            "root": str(data),
            "options": {"labels": "none", "channels": in_chans, "aspect": probe["train"]["options"].get("aspect", "keep")},
            "image_size": 64,
        },
        "backbone": {"weights": "insitu:fractal_vit_tiny", "img_size": 64, "in_chans": in_chans},
        "adapter": {"name": "bottleneck", "options": {"blocks": 2, "bottleneck_dim": 64, "scale": 0.1}},
        "objective": {
            "name": "simclr",
            "options": {"temperature": 0.2, "views": {"global_crops": 2, "local_crops": 0, "global_scale": [0.3, 1.0], "intensity": 0.6}},
        },
        "train": {"max_steps": steps, "batch_size": 32, "lr": 0.02, "warmup_steps": 10, "cached_views": 4, "checkpoint_every": steps},
        "trainer": {"accelerator": "cpu"},
        "health": {"enabled": False},
        "probe": probe,
    }


# ---------------------------------------------------------------- one seed


def one_seed(dataset: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    sites, probe, chans = SITES[dataset](tmp / "data", seed, args)
    share = args.rounds * args.local_steps
    out = tmp / "runs"
    adapters, timing = {}, {}
    fed_raw = run_config("federated", seed, out, sites[0], chans, share, probe)
    fed_raw["federated"] = {"rounds": args.rounds, "local_steps": args.local_steps, "site_threads": args.site_threads}
    fed_raw["federated"]["sites"] = [{**fed_raw["data"], "root": str(s)} for s in sites]
    start = time.perf_counter()
    fed = run_simulation(load_config(fed_raw))
    timing["federated"] = time.perf_counter() - start
    adapters["federated"] = fed.adapter_dir
    for name, root, steps in [("pooled", tmp / "data", len(sites) * share)] + [(f"site {k + 1} alone", s, share) for k, s in enumerate(sites)]:
        raw = run_config(name.replace(" ", "_"), seed, out, root, chans, steps, probe)
        if name == "pooled":  # every site's folder under one root (recursive scan); the probe folder is not a site
            raw["data"]["root"] = str(tmp / "pooled")
            for s in sites:
                for f in s.rglob("*"):
                    if f.is_file():
                        _link(f, tmp / "pooled" / s.name / f.relative_to(s))
        start = time.perf_counter()
        adapters[name] = pretrain(load_config(raw), quiet=True).adapter_dir
        timing[name] = time.perf_counter() - start
    cfg = load_config(run_config("probe", seed, out, sites[0], chans, 1, probe))
    rows = run_probe(cfg, list(adapters.values()))
    names = ["frozen", *adapters]
    scores = {n: {(r.probe, r.labels): r for r in row.results} for n, row in zip(names, rows[: len(names)], strict=True)}  # last: the PCA baseline
    return {
        "dataset": dataset,
        "seed": seed,
        "sites": len(sites),
        "items": [len([p for p in s.rglob("*") if p.is_file() or p.is_symlink()]) for s in sites],
        "scores": {n: {f"{p} {lab:.0%}": (r.mean, r.delta, r.ci_low, r.ci_high) for (p, lab), r in s.items()} for n, s in scores.items()},
        "wall_s": timing,
        "round_wall_s": [r.wall_s for r in fed.state.rounds],
        "bytes_per_round": fed.state.shared_bytes,
        "full_model_bytes": fed.state.full_model_bytes,
    }


def payload_bytes(arrays: list[np.ndarray]) -> int:
    """The bytes of one message's tensors as Flower serialises them (``ndarrays_to_parameters``: numpy .npy per tensor)."""
    from insitu.federated.flower import require_flower

    common = require_flower()
    return int(sum(len(t) for t in common.ndarrays_to_parameters(arrays).tensors))


class SignFlipSites:
    """The library's simulated sites (``factory``: its ``SiteFactory``), except that site ``attacker`` replies ``g + factor * (w - g)``.

    ``g`` is the global state the site received, ``w`` what it trained on its data; a site that
    declines (empty reply) is left alone. Only the reply's tensors change: its item count and
    metrics are the site's own, so the server's checks see an ordinary, well-formed reply."""

    def __init__(self, factory: Any, attacker: int, factor: float) -> None:
        self.factory, self.attacker, self.factor = factory, attacker, factor

    def __call__(self, context: Any) -> Any:
        client = self.factory(context)
        return SignFlipped(client, self.factor) if int(context.node_config["partition-id"]) == self.attacker else client


def _signflipped_class() -> type:
    from flwr.client import Client

    common = flower.require_flower()

    class _SignFlipped(Client):
        def __init__(self, inner: Any, factor: float) -> None:
            super().__init__()
            self.inner, self.factor = inner, factor

        def get_properties(self, ins: Any) -> Any:
            return self.inner.get_properties(ins)

        def get_parameters(self, ins: Any) -> Any:
            return self.inner.get_parameters(ins)

        def evaluate(self, ins: Any) -> Any:
            return self.inner.evaluate(ins)

        def fit(self, ins: Any) -> Any:
            res = self.inner.fit(ins)
            trained = common.parameters_to_ndarrays(res.parameters)
            if trained:
                received = common.parameters_to_ndarrays(ins.parameters)
                flipped = [(g + self.factor * (w - g)).astype(np.float32) for g, w in zip(received, trained, strict=True)]
                res.parameters = common.ndarrays_to_parameters(flipped)
            return res

    return _SignFlipped


def SignFlipped(inner: Any, factor: float) -> Any:  # noqa: N802 - a class built on first use (Flower is an optional import)
    return _signflipped_class()(inner, factor)


def attacker_site(seed: int, sites: int) -> int:
    """The attacking site's index for this seed: its own stream, so it does not depend on how the sites were drawn."""
    return int(np.random.default_rng([seed, 35]).integers(sites))


def federate(raw: dict[str, Any], attack: tuple[int, float] | None) -> Any:
    """``run_simulation`` on ``raw``; with ``attack = (site, factor)`` that site's client is wrapped for the run only."""
    if attack is None:
        return run_simulation(load_config(raw))
    import flwr.clientapp as apps

    # simulate() imports ClientApp from this name at call time; the library's SiteFactory stays importable as is (Ray pickles it by name)
    original = apps.ClientApp

    class AttackedApp(original):
        def __init__(self, client_fn: Any, **options: Any) -> None:
            super().__init__(client_fn=SignFlipSites(client_fn, *attack), **options)

    apps.ClientApp = AttackedApp
    try:
        return run_simulation(load_config(raw))
    finally:
        apps.ClientApp = original


def rules_seed(dataset: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One federation per aggregation rule (and per attack condition) on the same sites and seed, then one probe run over all of them."""
    sites, probe, chans = SITES[dataset](tmp / "data", seed, args)
    out = tmp / "runs"
    adapters, rounds, timing, traffic, notes = {}, {}, {}, {}, {}
    attacker = attacker_site(seed, len(sites))
    conditions = [(rule, None) for rule in args.aggregation]
    if args.attack:  # the attacked fedavg first: a broken attack shows in minutes, not after the honest runs
        conditions = [(args.aggregation[0], (attacker, args.attack_factor)), *conditions]
        conditions += [(rule, (attacker, args.attack_factor)) for rule in args.aggregation[1:]]
    for rule, attack in conditions:
        name = rule if attack is None else f"{rule} {args.attack}"
        raw = run_config(f"federated_{name.replace(' ', '_')}", seed, out, sites[0], chans, args.rounds * args.local_steps, probe)
        raw["federated"] = {"rounds": args.rounds, "local_steps": args.local_steps, "site_threads": args.site_threads, "aggregation": rule}
        raw["federated"]["sites"] = [{**raw["data"], "root": str(s)} for s in sites]
        start = time.perf_counter()
        fed = federate(raw, attack)
        timing[name] = time.perf_counter() - start
        adapters[name] = fed.adapter_dir
        rounds[name] = [r.wall_s for r in fed.state.rounds]
        message = payload_bytes(fed.state.arrays)  # every message carries the shared tensors once, each way
        sent = [message * (len(r.accepted) + sum(1 for k in r.dropped if not k.startswith("failed-"))) for r in fed.state.rounds]
        received = [message * len(r.accepted) for r in fed.state.rounds]
        traffic[name] = {"message": message, "sent": sent, "received": received, "accepted": [len(r.accepted) for r in fed.state.rounds]}
        notes[name] = [{"norms": r.update_norms, "clipped": r.clipped, "dropped": r.dropped} for r in fed.state.rounds]
        norms = sorted(fed.state.rounds[0].update_norms.values(), reverse=True)
        print(
            f"  [{dataset} seed {seed} {name}: {timing[name]:.0f} s, rounds {', '.join(f'{w:.1f}' for w in rounds[name])} s; "
            f"round 1 update norms {', '.join(f'{x:.3g}' for x in norms)}; averaged {traffic[name]['accepted']}]",
            flush=True,
        )
    cfg = load_config(run_config("probe", seed, out, sites[0], chans, 1, probe))
    rows = run_probe(cfg, list(adapters.values()))
    names = ["frozen", *adapters]
    scores = {n: {(r.probe, r.labels): r for r in row.results} for n, row in zip(names, rows[: len(names)], strict=True)}
    return {
        "dataset": dataset,
        "seed": seed,
        "sites": len(sites),
        "items": [len([p for p in s.rglob("*") if p.is_file() or p.is_symlink()]) for s in sites],
        "scores": {n: {f"{p} {lab:.0%}": (r.mean, r.delta, r.ci_low, r.ci_high) for (p, lab), r in s.items()} for n, s in scores.items()},
        "wall_s": timing,
        "round_wall_s": rounds,
        "traffic": traffic,
        "attacker": attacker if args.attack else None,  # the partition (0-based; the server labels replies by arrival, not by partition)
        "rounds": notes,
    }


PRIMARY = "knn 100%"  # declared before the 5-site attack runs: kNN, all labels, on the probe split


def report_rules(results: list[dict[str, Any]]) -> None:
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        run_order = list(runs[0]["wall_s"])
        models = [m for m in run_order if " " not in m] + [m for m in run_order if " " in m]  # honest rules, then attacked
        keys = list(runs[0]["scores"]["frozen"])
        r0 = runs[0]
        seeds = [r["seed"] for r in runs]
        print(f"\n### {dataset}: {r0['sites']} sites ({', '.join(map(str, r0['items']))} images), seeds {seeds}\n")
        if r0.get("attacker") is not None:
            print("Attacking partition per seed (1-based): " + ", ".join(f"seed {r['seed']}: {r['attacker'] + 1}" for r in runs) + "\n")

        def acc(r: dict[str, Any], m: str, k: str) -> float:
            return r["scores"][m][k][0]

        print(f"Primary ({PRIMARY}), mean ± std over seeds; paired differences over seeds, mean [95 % t interval]:\n")
        print("| model | accuracy | − fedavg (honest) | − frozen | later rounds wall s | sent / received per round |")
        print("|---|---|---|---|---|---|")
        for m in ["frozen", *models]:
            v = [acc(r, m, PRIMARY) for r in runs]
            cell = f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"
            vs_fedavg = "-" if m == "fedavg" else t_interval([acc(r, m, PRIMARY) - acc(r, "fedavg", PRIMARY) for r in runs])
            vs_frozen = "-" if m == "frozen" else t_interval([acc(r, m, PRIMARY) - acc(r, "frozen", PRIMARY) for r in runs])
            if m == "frozen":
                wall = traffic = "-"
            else:
                later = [w for r in runs for w in r["round_wall_s"][m][1:]]
                wall = f"{np.mean(later):.1f} ({min(later):.1f}–{max(later):.1f})" if later else "-"
                sent = sorted({b for r in runs for b in r["traffic"][m]["sent"]})
                received = sorted({b for r in runs for b in r["traffic"][m]["received"]})
                traffic = f"{' / '.join(f'{b:,}' for b in sent)} / {' / '.join(f'{b:,}' for b in received)}"
            print(f"| {m} | {cell} | {vs_fedavg} | {vs_frozen} | {wall} | {traffic} |")

        print("\nEvery probe, mean ± std over seeds:\n")
        print("| model | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for m in ["frozen", *models]:
            cells = []
            for key in keys:
                v = [acc(r, m, key) for r in runs]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
            print(f"| {m} | " + " | ".join(cells) + " |")
        print("\nPaired difference to honest fedavg over seeds, mean [95 % t interval]:\n")
        print("| model | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for m in [x for x in ["frozen", *models] if x != "fedavg"]:
            cells = [t_interval([acc(r, m, k) - acc(r, "fedavg", k) for r in runs]) for k in keys]
            print(f"| {m} − fedavg | " + " | ".join(cells) + " |")
        print("\nCost per round (simulation, this CPU): round 1 (Ray start, sites build their data) and later rounds; sites averaged:\n")
        print("| model | round 1 wall s | later rounds wall s, mean (min–max) | sites averaged per round |")
        print("|---|---|---|---|")
        for m in models:
            first = [r["round_wall_s"][m][0] for r in runs]
            later = [w for r in runs for w in r["round_wall_s"][m][1:]]
            accepted = sorted({a for r in runs for a in r["traffic"][m]["accepted"]})
            later_text = f"{np.mean(later):.1f} ({min(later):.1f}–{max(later):.1f})" if later else "-"
            print(f"| {m} | {np.mean(first):.1f} ({min(first):.1f}–{max(first):.1f}) | {later_text} | {', '.join(map(str, accepted))} |")
        print(f"\nOne message (the shared tensors, serialised) is {r0['traffic'][models[0]]['message']:,} bytes each way per site.")
        if any("rounds" in r for r in runs):
            print("\nUpdate norms (L2 distance of each accepted reply to the global state), per round, largest / median of the others:\n")
            for m in models:
                cells = []
                for r in runs:
                    for k, rec in enumerate(r.get("rounds", {}).get(m, [])):
                        norms = sorted(rec["norms"].values(), reverse=True)
                        if norms:
                            cells.append(f"s{r['seed']}r{k + 1} {norms[0]:.3g}/{np.median(norms[1:]) if len(norms) > 1 else float('nan'):.3g}")
                print(f"- {m}: " + "; ".join(cells))
            for m in [x for x in models if x.startswith("krum") and " " in x]:  # did Krum ever pick the attacker (the largest update)?
                recs = [rec for r in runs for rec in r.get("rounds", {}).get(m, []) if rec["norms"]]
                picked = sum(1 for rec in recs if "not chosen by krum" not in rec["clipped"].get(max(rec["norms"], key=rec["norms"].get), ""))
                print(f"- {m}: the largest update (the attacker's) was the one Krum chose in {picked} of {len(recs)} rounds")


# ---------------------------------------------------------------- report


def t_interval(diffs: list[float]) -> str:
    from insitu.heads.stats import seed_interval

    mean, low, high = seed_interval(diffs)
    return f"{mean:+.3f} (1 seed)" if len(diffs) < 2 else f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def report(results: list[dict[str, Any]]) -> None:
    from insitu.heads.stats import format_delta

    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        models = list(runs[0]["scores"])
        sites = [m for m in models if m.startswith("site")]
        print(f"\n### {dataset}: {runs[0]['sites']} sites ({', '.join(map(str, runs[0]['items']))} images), seeds {[r['seed'] for r in runs]}\n")
        print("| probe | " + " | ".join(models) + " |")
        print("|---|" + "---|" * len(models))
        for key in runs[0]["scores"]["frozen"]:
            cells = []
            for m in models:
                v = [r["scores"][m][key][0] for r in runs]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
            print(f"| {key} | " + " | ".join(cells) + " |")
        print("\nPaired differences over seeds, mean [95 % t interval]:\n")
        print("| probe | federated − frozen | federated − mean of sites alone | federated − pooled | within-seed CIs of federated − frozen |")
        print("|---|---|---|---|---|")
        for key in runs[0]["scores"]["frozen"]:
            fed = [r["scores"]["federated"][key][0] for r in runs]
            frozen = [r["scores"]["frozen"][key][0] for r in runs]
            alone = [np.mean([r["scores"][s][key][0] for s in sites]) for r in runs]
            pooled = [r["scores"]["pooled"][key][0] for r in runs]
            within = ", ".join(format_delta(*r["scores"]["federated"][key][1:]) for r in runs)
            print(
                f"| {key} | {t_interval([a - b for a, b in zip(fed, frozen, strict=True)])} | "
                f"{t_interval([a - b for a, b in zip(fed, alone, strict=True)])} | {t_interval([a - b for a, b in zip(fed, pooled, strict=True)])} | {within} |"
            )
        r0 = runs[0]
        print(
            f"\nSent per site per round: {r0['bytes_per_round']:,} bytes (adapters + SimCLR projector, float32); the whole model would be "
            f"{r0['full_model_bytes']:,} bytes ({r0['full_model_bytes'] / r0['bytes_per_round']:.1f}x). Simulation wall per round (s), per seed: "
            + "; ".join(", ".join(f"{w:.1f}" for w in r["round_wall_s"]) for r in runs)
            + ". Run wall (s), seed 0: "
            + ", ".join(f"{k} {v:.0f}" for k, v in r0["wall_s"].items())
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["polypgen", "pneumoniamnist", "busi"], choices=list(SITES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--site-items", type=int, default=240, help="PneumoniaMNIST training images per site")
    p.add_argument("--sites", type=int, default=3, help="PneumoniaMNIST sites (pneumonia shares spread evenly over 0.15-0.85)")
    p.add_argument("--attack", choices=["signflip"], default=None, help="with --aggregation: also run every rule with one sign-flipping site")
    p.add_argument("--attack-factor", type=float, default=-20.0, help="the attacker replies g + FACTOR * (its update)")
    p.add_argument("--from-json", type=Path, default=None, help="print the report of an earlier --json file (all or some seeds) and exit")
    p.add_argument("--site-threads", type=int, default=2, help="torch threads per simulated site (2 on a 2-core CPU: one worker, sites in turn)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument(
        "--aggregation",
        nargs="+",
        default=None,
        choices=["fedavg", "trimmed_mean", "median", "krum"],
        help="compare these aggregation rules (fedavg is always included: the reference) instead of federated vs alone vs pooled",
    )
    args = p.parse_args()
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        (report_rules if "traffic" in results[0] else report)(results)
        return
    if args.attack and args.aggregation is None:
        p.error("--attack needs --aggregation (the rules to attack)")
    if args.aggregation is not None:
        args.aggregation = ["fedavg", *[r for r in dict.fromkeys(args.aggregation) if r != "fedavg"]]
    results = []
    for dataset in args.datasets:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="bench_federated_") as tmp:
                run = one_seed if args.aggregation is None else rules_seed
                results.append(run(dataset, seed, args, Path(tmp)))
                print(f"[{dataset} seed {seed} done: {sum(results[-1]['wall_s'].values()):.0f} s of training]", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1, default=str))
    (report if args.aggregation is None else report_rules)(results)


if __name__ == "__main__":
    main()
