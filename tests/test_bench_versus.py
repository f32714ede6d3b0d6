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
