"""benchmarks/bench_base.py's Landsat retrieval is paired: every backbone sees the same crops for a view seed."""

import importlib.util
import random

import torch

from tests.conftest import REPO


def bench_base():
    spec = importlib.util.spec_from_file_location("bench_base", REPO / "benchmarks" / "bench_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(n=6):
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(3, 80 + 4 * i, 96, generator=gen) for i in range(n)]


def test_views_depend_on_the_seed_only():
    bench = bench_base()
    imgs = images()
    torch.manual_seed(0)
    random.seed(0)
    first = bench.retrieval_views(imgs, seed=1, size=16)
    torch.manual_seed(999)  # whatever the global generators do in between
    torch.rand(1000)
    random.seed(7)
    second = bench.retrieval_views(imgs, seed=1, size=16)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert first[0].shape == (6, 3, 16, 16)
    assert not torch.equal(first[0], first[1])  # the two views of an image differ
    other = bench.retrieval_views(imgs, seed=2, size=16)
    assert not torch.equal(first[0], other[0])  # another seed draws other crops


class Recorder:
    """A stand-in backbone that records the batches it embeds; ``forward_tokens`` consumes torch's global RNG."""

    def __init__(self):
        self.seen = []

    def forward_tokens(self, batch):
        self.seen.append(batch.clone())
        torch.rand(17)  # a real model's dropout or init would move the global state too
        flat = batch.flatten(1)
        return flat[:, :8], flat[:, None, 8:16], None


def test_every_backbone_sees_identical_crops():
    bench = bench_base()
    imgs = images()
    models = {"reference": Recorder(), "candidate": Recorder()}
    rows = bench.retrieval_rows(models, imgs, seeds=[0, 1])
    ref, cand = models["reference"].seen, models["candidate"].seen
    assert len(ref) == len(cand) == 4  # two seeds x two views, one batch each
    assert all(torch.equal(a, b) for a, b in zip(ref, cand, strict=True))
    assert rows["reference"] == rows["candidate"]  # same features on the same views: identical scores
    assert not torch.equal(ref[0], ref[2])  # the seeds draw different views


def test_a_file_reference_is_named_as_its_rows_are(capsys):
    bench = bench_base()
    bases = ["/runs/mip_control_s0/mip_control_s0.safetensors", "colour_vit_tiny"]
    names = [name for name, _ in bench.backbones(bases, [], 1)]
    assert names == ["mip_control_s0", "colour_vit_tiny"] and bench.base_name(bases[0]) == names[0]
    values = {"knn 100% accuracy": {"mip_control_s0": 0.80, "colour_vit_tiny": 0.85}}
    bench.print_seed_summary(values, bench.base_name(bases[0]), {"colour": ["colour_vit_tiny"]})  # a path here was a KeyError
    assert "+0.050" in capsys.readouterr().out
