"""LVM-Med graph matching: crop correspondence, affinities vs slow references, IMLE sign, zero loss, config."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insitu.adapters import AdaptedBackbone, create_adapters
from insitu.backbones import create_backbone
from insitu.config import load_config
from insitu.objectives import create_objective
from insitu.objectives.graph_matching import (
    GCN,
    BoxedCropPair,
    GraphMatchingOptions,
    IMLEMatching,
    PairViewOptions,
    SolverClock,
    crop_view,
    edge_affinity,
    graph_chunks,
    gumbel_like,
    hamming_to_identity,
    knn_adjacency,
    local_similarity,
    match_costs,
    normalise_edges,
    patch_centres,
    patch_correspondence,
    standardise,
    vertex_affinity,
)
from insitu.objectives.qap import solve_lap, solve_qap
from insitu.pipelines.pretrain import pretrain
from insitu.pipelines.probe import run_probe
from tests.conftest import REPO, TINY_BACKBONE, TINY_PNEUMONIA, shared


def meta_row(top: int, left: int, h: int, w: int, size: int = 64, flipped: bool = False) -> list[float]:
    return [top, left, h, w, size, size, float(flipped)]


# ---------------------------------------------------------------- crop geometry


def test_correspondence_for_known_crops():
    grid = (4, 4)
    full = torch.tensor([meta_row(0, 0, 64, 64)])  # view s: the whole 64×64 image, 16-px patches
    quarter = torch.tensor([meta_row(0, 32, 32, 32)])  # view t: the top-right quadrant, 8-px patches
    index, valid = patch_correspondence(quarter, full, grid)
    for r in range(4):
        for c in range(4):  # t patch (r, c) covers original rows 8r.., cols 32+8c..: s patch (r//2, 2 + c//2)
            assert valid[0, 0, r * 4 + c]
            assert index[0, 0, r * 4 + c] == (r // 2) * 4 + 2 + c // 2
    index, valid = patch_correspondence(full, quarter, grid)
    inside = {(r, c) for r in (0, 1) for c in (2, 3)}
    for r in range(4):
        for c in range(4):  # s patch centre (16r+8, 16c+8) lands in the quadrant only for r<2, c>=2
            assert bool(valid[0, 0, r * 4 + c]) == ((r, c) in inside)
            if (r, c) in inside:
                assert index[0, 0, r * 4 + c] == ((16 * r + 8) // 8) * 4 + (16 * c + 8 - 32) // 8
    # a crop whose patch borders avoid the s centres, plain and mirrored: same rows, mirrored columns
    index, valid = patch_correspondence(full, torch.tensor([meta_row(0, 36, 32, 24)]), grid)
    index_f, valid_f = patch_correspondence(full, torch.tensor([meta_row(0, 36, 32, 24, flipped=True)]), grid)
    assert torch.equal(valid_f, valid) and valid.sum() == 4
    for p in torch.nonzero(valid[0, 0])[:, 0].tolist():
        assert index_f[0, 0, p] // 4 == index[0, 0, p] // 4
        assert index_f[0, 0, p] % 4 == 3 - index[0, 0, p] % 4


def ramp_image(size: int = 64) -> torch.Tensor:
    """Two channels holding each pixel's row and column: a patch's mean names its place."""
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(size, size)
    cols = torch.arange(size, dtype=torch.float32)[None, :].expand(size, size)
    return torch.stack([rows, cols])


def test_view_meta_from_the_transform_locates_every_patch():
    torch.manual_seed(0)
    torch.manual_seed(0)
    image = ramp_image()
    views = BoxedCropPair(32, PairViewOptions(scale=(0.2, 0.8), blur_prob=0.0, intensity=0.0))
    flips = set()
    for _ in range(6):
        pair, meta = views(image)
        assert meta.shape == (2, 7)
        for view, m in zip(pair, meta, strict=True):
            flips.add(bool(m[6]))
            means = F.avg_pool2d(view[None], 8)[0].flatten(1)  # 2×16 patch means
            row, col = patch_centres(m[None], (4, 4))
            # the patch mean of a linear ramp is its value at the patch centre (pixel-centre coordinates)
            assert torch.allclose(means[0], row[0] * 64 - 0.5, atol=0.75)
            assert torch.allclose(means[1], col[0] * 64 - 0.5, atol=0.75)
    assert flips == {True, False}


def test_crop_view_is_the_crop_resized_and_mirrored():
    image = ramp_image(16)
    x = crop_view(image, (4, 2, 8, 8), 8, flip=True)
    assert torch.equal(x, image[:, 4:12, 2:10].flip(-1))


# ---------------------------------------------------------------- affinities against slow references


def slow_local(ps, pt, index, valid, topk):
    m, n = ps.shape[0], ps.shape[1]
    out = torch.zeros(m, m)
    for i in range(m):
        for a in range(m):
            sim = torch.stack([torch.stack([F.cosine_similarity(ps[i, p], pt[a, q], dim=0) for q in range(n)]) for p in range(n)])
            nearest = sorted(sim.max(1).values.tolist(), reverse=True)[: max(1, round(topk * n))]
            nn_term = sum(nearest) / len(nearest)
            corr = [float(sim[p, index[i, a, p]]) for p in range(n) if valid[i, a, p]]
            out[i, a] = 0.5 * (sum(corr) / len(corr) + nn_term) if corr else nn_term
    return out


def test_vertex_affinity_matches_a_slow_reference():
    torch.manual_seed(0)
    m, n, d, grid = 3, 4, 5, (2, 2)
    zs, zt, ps, pt = torch.randn(m, 6), torch.randn(m, 6), torch.randn(m, n, d), torch.randn(m, n, d)
    meta_s = torch.tensor([meta_row(0, 0, 64, 64), meta_row(10, 5, 30, 40), meta_row(0, 0, 20, 20)])
    meta_t = torch.tensor([meta_row(0, 32, 32, 32, flipped=True), meta_row(40, 40, 20, 20), meta_row(0, 0, 64, 64)])
    fast = vertex_affinity(zs, zt, ps, pt, meta_s, meta_t, grid, 0.8, 0.5)
    st = slow_local(ps, pt, *patch_correspondence(meta_s, meta_t, grid), 0.5)
    ts = slow_local(pt, ps, *patch_correspondence(meta_t, meta_s, grid), 0.5)
    for i in range(m):
        for a in range(m):
            ref = 0.8 * F.cosine_similarity(zs[i], zt[a], dim=0) + 0.2 * (st[i, a] + ts[a, i])
            assert fast[i, a] == pytest.approx(float(ref), abs=1e-5)
    _, valid = patch_correspondence(meta_s, meta_t, grid)
    assert valid.any() and not valid.all()  # both branches of the local term were exercised


def test_edge_affinity_matches_a_slow_reference():
    torch.manual_seed(1)
    m = 5
    zs, zt = torch.randn(m, 4), torch.randn(m, 4)
    adj_s, adj_t = knn_adjacency(zs, 2), knn_adjacency(zt, 2)
    assert torch.equal(adj_s, adj_s.T) and not adj_s.diagonal().any() and (adj_s.sum(1) >= 2).all()
    k = edge_affinity(zs, zt, adj_s, adj_t)
    for i in range(m):
        for a in range(m):
            for j in range(m):
                for b in range(m):
                    ref = F.cosine_similarity(zs[i] - zs[j], zt[a] - zt[b], dim=0) if adj_s[i, j] and adj_t[a, b] else 0.0
                    assert k[i * m + a, j * m + b] == pytest.approx(float(ref), abs=1e-5)


def test_local_similarity_without_any_correspondence_is_the_nearest_neighbour_term():
    sim = torch.rand(2, 2, 4, 4)
    valid = torch.zeros(2, 2, 4, dtype=torch.bool)
    out = local_similarity(sim, torch.zeros(2, 2, 4, dtype=torch.long), valid, 1.0)
    assert torch.allclose(out, sim.max(-1).values.mean(-1))


# ---------------------------------------------------------------- IMLE through the solver


def lap_solver(c, k):
    return solve_lap(c) if k is None else solve_qap(c, k)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_edges", [False, True])
def test_a_step_along_the_imle_gradient_moves_the_matching_towards_identity(with_edges: bool, seed: int):
    torch.manual_seed(seed)
    n, zero = 8, torch.zeros(8, 8, dtype=torch.float64)
    c = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    k = (0.1 * torch.randn(n * n, n * n, dtype=torch.float64)).requires_grad_(with_edges)
    edges = k if with_edges else torch.zeros(0, dtype=torch.float64)
    clock = SolverClock()

    def identity_frac(cost: torch.Tensor, pair: torch.Tensor) -> float:
        return float(IMLEMatching.apply(cost, pair, zero, 80.0, lap_solver, clock).diagonal().mean())

    y = IMLEMatching.apply(c, edges, zero, 80.0, lap_solver, clock)
    assert y.diagonal().mean() < 0.5
    hamming_to_identity(y).backward()
    # the gradient raises the identity entries the matching missed and lowers the wrong ones it took
    assert (c.grad.diagonal() <= 0).all() and (c.grad.diagonal() < 0).any()
    assert (c.grad[y.detach().bool()] >= 0).all()
    before = identity_frac(c.detach(), edges.detach())
    stepped_edges = edges.detach() - k.grad if with_edges else edges.detach()
    assert identity_frac(c.detach() - c.grad, stepped_edges) > before
    assert clock.take() > 0 and clock.seconds == 0


def test_graph_chunks_cover_the_batch():
    assert [len(c) for c in graph_chunks(32, 16)] == [16, 16]
    assert [len(c) for c in graph_chunks(17, 16)] == [17]
    assert [len(c) for c in graph_chunks(20, 16)] == [16, 4]
    assert torch.equal(torch.cat(graph_chunks(20, 16)), torch.arange(20))


# ---------------------------------------------------------------- the objective on a tiny ViT


def tiny_student(in_chans: int = 1) -> AdaptedBackbone:
    torch.manual_seed(0)
    backbone = create_backbone({**TINY_BACKBONE, "in_chans": in_chans})
    return AdaptedBackbone(backbone, create_adapters(backbone, {"kind": "bottleneck", "blocks": "all", "bottleneck_dim": 8}))


def objective(**options):
    opts = {"graph_size": 4, "knn": 2, "proj_dim": 16, "proj_hidden_dim": 16, "gcn_dim": 16, **options}
    return create_objective("graph_matching", 48, 8, 32, opts, max_steps=10)


def test_loss_is_zero_when_both_views_are_identical():
    student = tiny_student()
    images = torch.randn(8, 1, 32, 32)
    meta = torch.tensor([meta_row(4, 4, 40, 40), meta_row(4, 4, 40, 40)]).expand(8, 2, 7)
    for edge_term in (True, False):
        obj = objective(edge_term=edge_term).eval()
        out = obj({"views": [images, images.clone()], "view_meta": meta, "item_id": list("abcdefgh")}, student)
        assert out["loss"] == 0 and out["identity_fraction"] == 1
    # training mode without noise or margin: still zero
    batch = {"views": [images, images.clone()], "view_meta": meta}
    out = objective(target="identity", noise_scale=0.0, margin=0.0).train()(batch, student)
    assert out["loss"] == 0
    # vertex costs alone: a margin above the largest gap standardised costs allow (n/sqrt(n-1), 2.31
    # for n = 4) is never met
    out = objective(target="identity", noise_scale=0.0, margin=2.5, edge_term=False).train()(batch, student)
    assert out["loss"] > 0 and out["identity_fraction"] == 1


def test_training_step_reaches_adapters_and_heads():
    torch.manual_seed(3)
    student = tiny_student()
    obj = objective(noise_scale=0.5).train()
    views, metas = BoxedCropPair(32, PairViewOptions()), []
    pairs = []
    for _ in range(8):
        v, m = views(torch.randn(1, 48, 48))
        pairs.append(v)
        metas.append(m)
    batch = {"views": [torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])], "view_meta": torch.stack(metas)}
    out = obj(batch, student)
    assert out["loss"] > 0 and 0 <= out["identity_fraction"] < 1 and out["solver_s"] > 0
    out["loss"].backward()
    adapter_grads = [p.grad for p in student.adapters.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    assert obj.gcn.lin1.weight.grad.abs().sum() > 0 and obj.node_head[0].weight.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in student.backbone.parameters())
    assert set(obj.head_state()) >= {"gm_gcn.lin1.weight", "gm_node_head.0.weight"}


# ---------------------------------------------------------------- scale, edges, margin: the matching signal


def lap_only(c, k):
    return solve_lap(c)


def test_standardised_costs_make_the_matching_and_its_noise_scale_free():
    torch.manual_seed(0)
    # a narrow spread, as on a frozen ViT, with the identity ahead by 3 noise stds
    c = 0.01 * (torch.randn(12, 12, dtype=torch.float64) + 3 * torch.eye(12, dtype=torch.float64))
    z = standardise(c)
    assert float(z.mean()) == pytest.approx(0, abs=1e-9) and float(z.std(unbiased=False)) == pytest.approx(1, abs=1e-3)
    opts = GraphMatchingOptions(target="identity", noise_scale=0.3, margin=0.5)
    empty = torch.zeros(0, dtype=torch.float64)
    results = []
    for scaled in (c, 1000 * c, c + 7.0, 1000 * (c - 3.0)):
        torch.manual_seed(1)  # the same Gumbel draws each time
        noisy = [match_costs(scaled, empty, opts, lap_only, SolverClock(), training=True) for _ in range(5)]
        results.append([(float(loss), clean) for loss, clean in noisy])
        assert torch.allclose(standardise(scaled), z, atol=1e-3)
    for other in results[1:]:
        for (loss_a, clean_a), (loss_b, clean_b) in zip(results[0], other, strict=True):
            assert loss_a == loss_b and torch.equal(clean_a, clean_b)
    assert all(torch.equal(clean, torch.eye(12, dtype=clean.dtype)) for _, clean in results[0])
    # the noise acts relative to the spread: at 0.3 std it flips only a few matches, where Gumbel
    # noise of scale 0.3 on the raw costs (the old meaning of noise_scale) leaves chance
    assert 0 < np.mean([loss for loss, _ in results[0]]) < 0.5 * 2 * 12
    raw = [solve_lap((c + gumbel_like(c, 0.3)).numpy()) for _ in range(5)]
    assert np.mean([(perm == np.arange(12)).mean() for perm in raw]) < 0.4


def test_a_graph_without_edges_gives_finite_outputs():
    torch.manual_seed(0)
    n = 6
    zs, zt = torch.randn(n, 4, requires_grad=True), torch.randn(n, 4)
    none = torch.zeros(n, n, dtype=torch.bool)
    k = normalise_edges(edge_affinity(zs, zt, none, none), none, none)
    assert torch.isfinite(k).all() and not k.any()
    c = F.normalize(zs, dim=-1) @ F.normalize(zt, dim=-1).T
    loss, clean = match_costs(c, k, GraphMatchingOptions(), lambda c, k: solve_lap(c), SolverClock(), training=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all() and clean.sum() == n
    # with edges: the identity's normalised edge score is a sum of n per-node cosines
    adj = knn_adjacency(zs, 2)
    k = normalise_edges(edge_affinity(zs.detach(), zs.detach(), adj, adj), adj, adj)
    eye = torch.eye(n).reshape(-1)
    assert float(eye @ k @ eye) == pytest.approx(n, rel=1e-5)


def test_edges_between_identical_nodes_have_a_bounded_gradient():
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    z[1] = z[0]  # twins joined by an edge: a zero-length edge
    adj = knn_adjacency(z, 2)
    assert adj[0, 1]
    norms = {}
    for softness in (0.0, 0.1):
        zs = z.clone().requires_grad_(True)
        k = edge_affinity(zs, z + 0.1 * torch.randn(6, 4), adj, adj, softness)
        (k * torch.randn_like(k)).sum().backward()
        assert torch.isfinite(zs.grad).all()
        norms[softness] = float(zs.grad.norm())
    assert norms[0.0] > 1e6 and norms[0.1] < 1e3


def test_gcn_tells_twin_nodes_apart():
    torch.manual_seed(0)
    z = torch.randn(4, 3)
    adj = torch.ones(4, 4, dtype=torch.bool).fill_diagonal_(False)  # every node has the same neighbourhood
    gcn = GCN(3, 8)
    h = gcn(z, adj)
    assert (h[0] - h[1]).abs().max() > 1e-3
    with torch.no_grad():
        gcn.skip.weight.zero_()
    assert torch.allclose(gcn(z, adj)[0], gcn(z, adj)[1], atol=1e-6)  # the plain GCN cannot


def toy_run(margin: float, steps: int = 60) -> tuple[list[float], list[float], list[float]]:
    """A linear map learns to match two noisy views of fixed random features through the IMLE loss.

    Each view is 8 signal features plus 24 fresh nuisance features twice as large, so a random map
    matches at chance; it must learn to ignore the nuisance. Two graphs of 16 per step, LAP solver.
    Returns the clean identity fraction, the loss and the map's gradient norm per step.
    """
    torch.manual_seed(0)
    n, signal, nuisance = 16, 8, 24
    x = torch.randn(2, n, signal)
    lin = torch.nn.Linear(signal + nuisance, 16, bias=False)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    opts = GraphMatchingOptions(target="identity", margin=margin, noise_scale=0.1)
    identity, losses, norms = [], [], []
    for _ in range(steps):
        loss, frac = torch.zeros(()), 0.0
        for g in range(2):
            vs, vt = (torch.cat([x[g] + 0.05 * torch.randn(n, signal), 2 * torch.randn(n, nuisance)], 1) for _ in range(2))
            c = F.normalize(lin(vs), dim=-1) @ F.normalize(lin(vt), dim=-1).T
            hamming, clean = match_costs(c, torch.zeros(0), opts, lap_only, SolverClock(), training=True)
            loss, frac = loss + hamming / 2, frac + float(clean.diagonal().mean()) / 2
        opt.zero_grad()
        loss.backward()
        norms.append(float(lin.weight.grad.norm()))
        opt.step()
        identity.append(frac)
        losses.append(float(loss.detach()))
    return identity, losses, norms


def test_toy_matching_learns_the_identity_and_the_margin_keeps_the_gradient():
    identity, losses, norms = toy_run(margin=1.0)
    assert np.mean(identity[:3]) < 0.3  # near chance (1/16) at the start
    found = next(i for i, f in enumerate(identity) if f >= 0.9)
    assert found <= 40 and min(identity[found:]) >= 0.8
    assert all(np.isfinite(norms)) and max(norms) < 500
    # after the identity is found the margin still asks for more: non-zero loss and gradient every step
    assert min(losses[found:]) > 0 and min(norms[found:]) > 0
    # without the margin the Hamming loss and its gradient vanish once the identity wins
    identity0, losses0, norms0 = toy_run(margin=0.0)
    found0 = next(i for i, f in enumerate(identity0) if f >= 0.9)
    assert any(loss == 0 and norm == 0 for loss, norm in zip(losses0[found0:], norms0[found0:], strict=True))


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown_knob"):
        objective(unknown_knob=1)


TINY = [
    "backbone.img_size=32",
    "backbone.kwargs={depth: 2, embed_dim: 48, num_heads: 2}",
    "train.max_steps=1",
    "train.batch_size=8",
    "objective.options.graph_size=4",
    "objective.options.knn=2",
    "objective.options.proj_dim=16",
    "objective.options.gcn_dim=16",
    *TINY_PNEUMONIA,
]


def test_pneumoniamnist_graph_matching_config_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shared("medical", "pneumoniamnist")
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / "medical" / "pneumoniamnist_graph_matching.yaml"
    cfg = load_config(path, [*TINY, f"out_dir={tmp_path}"])
    assert cfg.objective.name == "graph_matching" and cfg.objective.options["edge_term"]
    result = pretrain(cfg, quiet=True)
    assert result.steps == 1 and result.final_loss is not None and np.isfinite(result.final_loss)
    rows = run_probe(cfg, [result.adapter_dir])
    assert len(rows) == 3 and all(r.n_test == 20 for r in rows)  # frozen, adapted, frozen + PCA whitening
