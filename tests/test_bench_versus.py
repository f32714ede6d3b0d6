"""bench_objectives' --versus table: two objectives compared directly, paired by seed, on the same test items."""

import numpy as np
import pytest

from benchmarks.bench_objectives import versus_table


def row(correct, primary=False):
    """A probe row whose per-item counts (1 repeat × N × (correct, seen)) give ``correct`` items right."""
    counts = np.zeros((1, len(correct), 2))
    counts[0, :, 0], counts[0, :, 1] = correct, 1
    return {"probe": "knn", "labels": 0.1, "metric": "accuracy", "counts": counts.tolist(), "items": [f"i{n}" for n in range(len(correct))],
            "units": [f"g{n}" for n in range(len(correct))], "primary": primary, "knn_features": "standardised"}  # fmt: skip


def run(objective, seed, correct):
    frozen = {"name": "frozen", "results": [row(np.zeros(len(correct)))]}
    student = {"name": "+ adapters (x)", "results": [row(correct, primary=True)]}
    return {"dataset": "d", "steps": 10, "seed": seed, "objective": objective, "probe": [frozen, student]}


def test_versus_pairs_by_seed_and_pools_the_difference():
    n = 40
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1, 2):
        b = rng.random(n) < 0.5
        a = b.copy()
        a[: 16 + seed] = True  # a gets the first 16, 17, 18 items right in seeds 0, 1, 2 (b about half of them)
        gained = int(a.sum() - b.sum())
        runs += [run("a", seed, a.astype(float)), run("b", seed, b.astype(float))]
        runs[-2]["gained"] = gained
    headers, cells = versus_table(runs, "a", "b", n_boot=500)
    (cell,) = cells
    got = dict(zip(headers, cell, strict=True))
    per_seed = [g["gained"] / n for g in runs[::2]]
    assert got["seeds"] == "0 1 2" and got["primary"] == "yes"
    assert [float(v) for v in got["Δ per seed"].split(", ")] == pytest.approx(per_seed, abs=5e-4)
    pooled = float(got["a − b [two-way 95% CI: items × seeds]"].split(" [")[0])
    assert pooled == pytest.approx(np.mean(per_seed), abs=5e-4)
    assert got["verdict"].startswith("resolved gain")  # every seed gains, no item loses


def test_versus_names_a_missing_objective():
    with pytest.raises(SystemExit, match="no runs of"):
        versus_table([run("a", 0, np.ones(5))], "a", "b")


def test_guard_replay_fires_on_a_logged_spread_collapse_and_not_on_a_healthy_log(tmp_path):
    from benchmarks.guard_replay import replay
    from insitu.config import HealthConfig

    def log(spread):
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.csv"
        lines = ["step,health/rankme,health/embedding_spread"] + [f"{s},30.0,{spread(s)}" for s in range(0, 300, 5)]
        path.write_text("\n".join(lines) + "\n")
        return path

    collapsed = replay(log(lambda s: 0.02 if s < 40 else 0.004), 300, HealthConfig())
    assert collapsed["fired"] == {"spread": 90}  # below 0.5 × start from step 40, for the 50-step window
    assert collapsed["spread last/first"] == pytest.approx(0.2)
    healthy = replay(log(lambda s: 0.02 - s * 2e-5), 300, HealthConfig())  # ends at 0.71 × start
    assert healthy["fired"] == {} and healthy["rank last/first"] == pytest.approx(1.0)


def test_bench_channels_pooled_table_marks_the_primary_and_holm_adjusts_the_rest():
    from benchmarks.bench_channels import pooled_table

    n = 60
    rng = np.random.default_rng(1)

    def result(probe, labels, correct):
        counts = np.zeros((1, n, 2))
        counts[0, :, 0], counts[0, :, 1] = correct, 1
        return {"probe": probe, "labels": labels, "counts": counts.tolist(), "units": list(range(n))}

    runs = []
    for seed in range(3):
        frozen = rng.random(n) < 0.5
        spectral = frozen | (np.arange(n) < 30)  # right on the first 30 patches as well: a large gain
        rows = [{"name": "frozen backbone", "results": [result(p, f, frozen) for p, f in (("knn", 1.0), ("linear", 1.0), ("knn", 0.1))]}]
        rows.append({"name": f"+ adapters (x_spectral_s{seed})", "results": [result(p, f, spectral) for p, f in (("knn", 1.0), ("linear", 1.0), ("knn", 0.1))]})
        rows.append({"name": f"+ adapters (x_bottleneck_s{seed})", "results": [result(p, f, frozen) for p, f in (("knn", 1.0), ("linear", 1.0), ("knn", 0.1))]})
        runs += [{"seed": seed, "kind": k, "probe": {"rows": rows}} for k in ("bottleneck", "spectral")]
    lines = {line.split(" | ")[0].strip("| ") + " " + line.split(" | ")[1] + " " + line.split(" | ")[2]: line for line in pooled_table(runs, 1000).splitlines()[2:]}
    assert "(primary)" in lines["spectral − frozen knn 100%"] and "resolved gain" in lines["spectral − frozen knn 100%"]
    assert "(primary)" not in lines["spectral − frozen knn 10%"] and "resolved gain" in lines["spectral − frozen knn 10%"]
    assert "not resolved (Holm-adjusted)" in lines["bottleneck − frozen knn 100%"]  # identical to frozen: Δ 0
    assert len(lines) == 9  # 3 rows × (bottleneck − frozen, spectral − frozen, spectral − bottleneck)
