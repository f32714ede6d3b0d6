"""Wall time per round over Flower's real gRPC transport on loopback, with TLS and site keys on vs off.

Simulation has no transport, so this runs the deployment commands themselves: ``insitu federate
server`` and one ``insitu federate site`` process per site, on 127.0.0.1. Sites: PneumoniaMNIST
training X-rays dealt to ``--sites`` sites of ``--site-items`` images (pneumonia shares spread
from 0.15 to 0.85, non-IID, seeded), the quickstart's recipe (SimCLR bottleneck adapters in the
last 2 blocks of the shipped base, 64 px, cached views), ``--rounds`` x ``--local-steps``.

Modes, run in turn (``--repeats`` times each, alternating):

- ``plain``: no TLS, no site keys (allowed on loopback, with a warning);
- ``tls+keys``: a throwaway CA and server certificate for 127.0.0.1 (``federated.tls``), an Ed25519
  key per site (``federated.site_key``) trusted by the server (``federated.site_keys``): TLS on the
  channel, the admission challenge before round 1, and a signed, verified reply every round.

Reported per mode: the server's wall per round from ``rounds.json`` (round 1 includes waiting for the
sites to start and, with keys, their admission; later rounds are the steady state) and the whole
run's wall (server start to exit).

    python benchmarks/bench_federated_tls.py --rounds 4 --local-steps 5
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the throwaway CA and server certificate come from the TLS tests' helper

from tests.test_federated_tls import _pem_pair as certificate  # noqa: E402

PNEUMONIA = REPO.parent / "shared" / "data" / "medical" / "pneumoniamnist" / "pneumoniamnist_balanced_trainval.npz"


def make_sites(tmp: Path, args: argparse.Namespace) -> list[Path]:
    arrays = np.load(PNEUMONIA)
    images, labels = arrays["train_images"], arrays["train_labels"].reshape(-1)
    rng = np.random.default_rng(args.seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in (0, 1)}
    shares = np.linspace(0.15, 0.85, args.sites) if args.sites > 1 else [0.5]
    sites = []
    for k, share in enumerate(shares):
        n1 = round(args.site_items * share)
        site = tmp / f"site_{k + 1}"
        for c, n in ((1, n1), (0, args.site_items - n1)):
            (site / str(c)).mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                i = pools[c].pop()
                Image.fromarray(images[i]).save(site / str(c) / f"{i}.png")
        sites.append(site)
    return sites


def base_config(site: Path, out: Path, args: argparse.Namespace, port: int) -> dict[str, Any]:
    """The quickstart's recipe, as bench_federated.py runs it; one site's copy (the server drops ``data``)."""
    return {
        "name": "federated",
        "seed": args.seed,
        "out_dir": str(out),
        "data": {"domain": "images", "root": str(site), "options": {"labels": "none", "channels": 1}, "image_size": 64},
        "backbone": {"weights": "insitu:fractal_vit_tiny", "img_size": 64, "in_chans": 1},
        "adapter": {"name": "bottleneck", "options": {"blocks": 2, "bottleneck_dim": 64, "scale": 0.1}},
        "objective": {
            "name": "simclr",
            "options": {"temperature": 0.2, "views": {"global_crops": 2, "local_crops": 0, "global_scale": [0.3, 1.0], "intensity": 0.6}},
        },
        "train": {"max_steps": 1, "batch_size": 32, "lr": 0.02, "warmup_steps": 10, "cached_views": 4},
        "trainer": {"accelerator": "cpu"},
        "health": {"enabled": False},
        "federated": {"rounds": args.rounds, "local_steps": args.local_steps, "min_sites": args.sites, "address": f"127.0.0.1:{port}"},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(mode: str, sites: list[Path], tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from insitu.sharing.signing import generate_keypair

    work = tmp / f"{mode.replace('+', '_')}_{time.monotonic_ns()}"
    work.mkdir(parents=True)
    port = free_port()
    raw = base_config(sites[0], work / "runs", args, port)
    server = {k: v for k, v in raw.items() if k != "data"}
    site_sets: list[list[str]] = [[] for _ in sites]
    if mode == "tls+keys":
        ca_cert, _, ca = certificate(work / "certs", "ca")
        server_cert, server_key, _ = certificate(work / "certs", "server", ca)
        server["federated"] = {
            **raw["federated"],
            "tls": {"ca_cert": str(ca_cert), "server_cert": str(server_cert), "server_key": str(server_key)},
            "site_keys": str(work / "trusted"),
        }
        raw["federated"]["tls"] = {"ca_cert": str(ca_cert)}
        (work / "trusted").mkdir(parents=True)
        for k in range(len(sites)):
            generate_keypair(work / "keys", f"site-{k + 1}")
            (work / "trusted" / f"site-{k + 1}.pub").write_bytes((work / "keys" / f"site-{k + 1}.pub").read_bytes())
            site_sets[k] = [f"federated.site_key={work / 'keys' / f'site-{k + 1}.key'}"]
    (work / "server.yaml").write_text(yaml.safe_dump(server))
    (work / "site.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "insitu", "--quiet", "federate"]
    logs = []

    def start(name: str, extra: list[str]) -> subprocess.Popen:
        log = (work / f"{name}.log").open("w")
        logs.append(work / f"{name}.log")
        return subprocess.Popen([*cmd, *extra], stdout=log, stderr=subprocess.STDOUT)

    began = time.perf_counter()
    procs = [start("server", ["server", "-c", str(work / "server.yaml")])]
    try:
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if procs[0].poll() is not None:
                raise RuntimeError("the server exited:\n" + logs[0].read_text()[-3000:])
            time.sleep(0.2)
        for k, site in enumerate(sites):
            sets = [x for s in [f"data.root={site}", *site_sets[k]] for x in ("--set", s)]
            procs.append(start(f"site{k + 1}", ["site", "-c", str(work / "site.yaml"), *sets]))
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    total = time.perf_counter() - began
    if any(codes):
        raise RuntimeError(f"{mode}: exit codes {codes}\n" + "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs))
    rounds = json.loads((work / "runs" / "federated" / "rounds.json").read_text())["rounds"]
    assert all(len(r["accepted"]) == len(sites) for r in rounds), rounds
    return {"mode": mode, "round_wall_s": [r["wall_s"] for r in rounds], "total_s": total, "bytes_per_site": rounds[0]["bytes_per_site"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--site-items", type=int, default=120)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating plain and tls+keys")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take before it is killed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_federated_tls_") as tmp:
        sites = make_sites(Path(tmp) / "data", args)
        for rep in range(args.repeats):
            for mode in ("plain", "tls+keys"):
                results.append(one_run(mode, sites, Path(tmp), args))
                r = results[-1]
                print(f"[{mode} run {rep + 1}: rounds {', '.join(f'{w:.2f}' for w in r['round_wall_s'])} s; total {r['total_s']:.1f} s]", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{args.sites} sites x {args.site_items} PneumoniaMNIST images, {args.rounds} rounds x {args.local_steps} local steps, gRPC on 127.0.0.1\n")
    print("| mode | runs | round 1 wall s | later rounds wall s, mean (min–max) | whole run s |")
    print("|---|---|---|---|---|")
    for mode in ("plain", "tls+keys"):
        rs = [r for r in results if r["mode"] == mode]
        first = [r["round_wall_s"][0] for r in rs]
        later = [w for r in rs for w in r["round_wall_s"][1:]]
        later_text = f"{np.mean(later):.2f} ({min(later):.2f}–{max(later):.2f})" if later else "-"
        print(f"| {mode} | {len(rs)} | {np.mean(first):.2f} | {later_text} | {np.mean([r['total_s'] for r in rs]):.1f} |")
    print(f"\nShared tensors per site per round: {results[0]['bytes_per_site']:,} bytes each way.")


if __name__ == "__main__":
    main()
