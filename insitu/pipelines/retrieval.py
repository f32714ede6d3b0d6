"""Image-text retrieval evaluation of a ConVIRT/CLIP adapter package on held-out pairs.

Image→text and text→image Recall@k (a query hits when a correct item is among its k nearest; a
text identical to the query's own paired text also counts as correct, since it cannot be told
apart), with the chance level for the same pool, and zero-shot classification: each image takes the
class whose prompts' mean text embedding is nearest (unlabelled held-out pairs count for retrieval,
not for zero-shot).

Intervals are over groups (patients): a percentile bootstrap that resamples held-out patients with
replacement and recomputes each metric from the per-query hits (`insitu.heads.stats`, the probe's
bootstrap; the ranking pool stays fixed). Several training seeds scored on the same held-out
patients combine through `seed_pooled_interval`, the evidence protocol's two-way bootstrap (patients
and seeds), and `paired_seed_delta` gives method − baseline with the same resampling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import DataConfig, RunConfig
from insitu.domains import split_by_group
from insitu.errors import ConfigError
from insitu.heads.stats import accuracy_from_counts, bootstrap_differences, percentile_interval, two_way_bootstrap
from insitu.io import write_csv, write_json
from insitu.objectives import create_objective
from insitu.objectives.convirt import ConVIRTObjective, text_groups
from insitu.pipelines.data import SampleDataset, ScannedData, collate
from insitu.pipelines.preprocess import resolve_preprocessing
from insitu.sharing.signing import trust_of

KS = (1, 5, 10)


@dataclass
class RetrievalResult:
    """Recall@k in both directions, their chance level, and zero-shot accuracy (None without prompts)."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    chance: dict[int, float]
    zero_shot_acc: float | None
    n_pairs: int
    class_prompts: dict[str, list[str]] = field(default_factory=dict)
    n_groups: int = 0
    intervals: dict[str, list[float]] = field(default_factory=dict)  # "image_to_text@5" -> [low, high] over patients
    zero_shot_interval: list[float] | None = None
    n_zero_shot: int = 0
    n_zero_shot_groups: int = 0
    hits: dict[str, list[int]] = field(default_factory=dict)  # per query: "image_to_text@5", "zero_shot" (-1: unlabelled)
    groups: list[str] = field(default_factory=list)  # per query: its group, numbered g0, g1, ... in pool order


def hit_ranks(sim: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Per query row of ``sim``: the 0-based position of its first positive column in the ranking."""
    positives = torch.eye(*sim.shape, dtype=torch.bool) if positives is None else positives.bool()
    order = sim.argsort(dim=1, descending=True)
    return positives.gather(1, order).float().argmax(1)


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor | None = None, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Fraction of query rows of ``sim`` whose top-k columns hold a positive (default: the diagonal)."""
    hit_rank = hit_ranks(sim, positives)
    return {k: float((hit_rank < k).float().mean()) for k in ks}


def query_hits(v: torch.Tensor, u: torch.Tensor, texts: list[str], ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """Per query, 1 where Recall@k hits: keys ``image_to_text@k`` and ``text_to_image@k`` (query i is pair i both ways)."""
    sim = F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T
    groups = text_groups(texts)
    positives = groups[:, None] == groups[None, :]
    out = {}
    for name, ranks in (("image_to_text", hit_ranks(sim, positives)), ("text_to_image", hit_ranks(sim.T, positives.T))):
        out.update({f"{name}@{k}": (ranks < k).numpy().astype(int) for k in ks})
    return out


def _counts(hits: np.ndarray) -> np.ndarray:
    """0/1 hits (-1: not scored) -> (correct, seen) counts per query, as `insitu.heads.stats` expects."""
    hits = np.asarray(hits)
    return np.stack([(hits == 1).astype(float), (hits >= 0).astype(float)], axis=-1)


def _zero(counts: np.ndarray) -> np.ndarray:
    """Counts whose accuracy is 0 (one miss per query): the reference that turns a bootstrap of differences into one of values."""
    out = np.zeros_like(counts)
    out[..., 1] = 1.0
    return out


def group_interval(hits: np.ndarray, groups: list[str], n_boot: int = 2000, seed: int = 0) -> list[float]:
    """[low, high]: a 95% percentile bootstrap of the hit rate over groups (patients); [nan, nan] under MIN_UNITS groups."""
    counts = _counts(hits)
    keep = counts[:, 1] > 0
    _, diffs = bootstrap_differences(counts[keep], _zero(counts[keep]), accuracy_from_counts, list(np.asarray(groups)[keep]), n_boot, seed)
    return list(percentile_interval(diffs))


def seed_pooled_interval(hits: np.ndarray, groups: list[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(pooled rate, low, high) for S seeds × N queries of 0/1 hits on the same held-out queries: the two-way bootstrap
    (patients and seeds) of `insitu.heads.stats`."""
    counts = _counts(hits)
    return two_way_bootstrap(counts, _zero(counts), accuracy_from_counts, groups, n_boot, seed)


def paired_seed_delta(
    method: np.ndarray, baseline: np.ndarray, groups: list[str], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(rate(method) − rate(baseline), low, high), both S × N hits on the same queries (seed s of each paired), two-way bootstrap."""
    return two_way_bootstrap(_counts(method), _counts(baseline), accuracy_from_counts, groups, n_boot, seed)


def chance_recall(positives: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Expected Recall@k of a random ranking: 1 - C(n-p, k) / C(n, k), averaged over queries."""
    n = positives.shape[1]
    out = {}
    for k in ks:
        miss = []
        for p in positives.sum(1).tolist():
            prob = 1.0
            for j in range(min(k, n)):
                prob *= max(0.0, (n - p - j) / (n - j))
            miss.append(prob)
        out[k] = 1.0 - sum(miss) / len(miss)
    return out


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of assigning each image the class whose (prompt-averaged) embedding is most similar."""
    sim = F.normalize(image_emb, dim=-1) @ F.normalize(class_emb, dim=-1).T
    return float((sim.argmax(1) == labels).float().mean())


def retrieval_metrics(
    v: torch.Tensor, u: torch.Tensor, texts: list[str], ks: tuple[int, ...] = KS
) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """(image→text, text→image, chance) Recall@k for paired rows of image and text embeddings."""
    sim = F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T
    groups = text_groups(texts)
    positives = groups[:, None] == groups[None, :]
    return recall_at_k(sim, positives, ks), recall_at_k(sim.T, positives.T, ks), chance_recall(positives, ks)


@torch.no_grad()
def embed_pairs(
    objective: ConVIRTObjective, model: torch.nn.Module, dataset: SampleDataset, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """Projected image and text embeddings, the texts and the labels of every pair in ``dataset``."""
    v, u, texts, labels, _ = embed_pairs_ids(objective, model, dataset, batch_size)
    return v, u, texts, labels


@torch.no_grad()
def embed_pairs_ids(
    objective: ConVIRTObjective, model: torch.nn.Module, dataset: SampleDataset, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, list[str]]:
    """`embed_pairs` plus the item id of each row (items that fail to load are dropped, so rows need their ids)."""
    objective.eval()
    model.eval()
    vs, us, texts, labels, ids = [], [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if not batch["item_id"]:
            continue
        vs.append(objective.embed_images(model, batch["image"]))
        us.append(objective.embed_texts(batch["text"]))
        texts += batch["text"]
        labels.append(batch["label"])
        ids += batch["item_id"]
    return torch.cat(vs), torch.cat(us), texts, torch.cat(labels), ids


def held_out_pairs(cfg: RunConfig, sampling: str, pairs: DataConfig | None = None) -> tuple[ScannedData, list]:
    """``pairs`` if given, else ``probe.test`` when it holds pairs, else the test part of a group split of ``data``."""
    explicit = pairs or (cfg.probe.test if cfg.probe.test is not None and cfg.probe.test.domain == "pairs" else None)
    test_cfg: DataConfig = explicit or cfg.data
    if test_cfg.domain != "pairs":
        raise ConfigError(f"retrieval needs image-text pairs: data.domain is {test_cfg.domain!r}, not 'pairs'.")
    # retrieval needs no label: the held-out side's unlabelled pairs count too (zero-shot skips them)
    test_cfg = test_cfg.model_copy(update={"options": {**test_cfg.options, "sampling": sampling, "labelled_only": False}})
    data = ScannedData.scan(test_cfg)
    if explicit is not None:
        return data, data.manifest.items
    fractions = {"train": 1 - cfg.probe.test_fraction, "test": cfg.probe.test_fraction}
    return data, split_by_group(data.manifest.items, fractions, seed=cfg.seed)["test"]


def evaluate_retrieval(
    cfg: RunConfig,
    adapter: Path,
    class_prompts: dict[str, list[str]] | None = None,
    pairs: DataConfig | None = None,
    sampling: str = "full",
    ks: tuple[int, ...] = KS,
) -> RetrievalResult:
    """Recall@k both ways and zero-shot accuracy of an adapter package trained with ``convirt``/``clip``.

    ``sampling`` is the pairs domain's text sampling for evaluation (``full``: all sentences of the
    chosen sections, deterministic). ``class_prompts`` maps class names (or indices) to prompts.
    """
    L.seed_everything(cfg.seed, verbose=False)
    pkg = load_package(adapter, trust_of(cfg))
    name = pkg.meta.objective.get("name", cfg.objective.name)
    if name not in ("convirt", "clip"):
        raise ConfigError(f"{adapter} was trained with {name!r}; retrieval needs a convirt or clip adapter package.")
    model = apply_package(pkg, create_backbone(cfg.backbone))
    options = pkg.meta.objective.get("options") or cfg.objective.options
    objective = create_objective(name, model.embed_dim, model.patch_size, cfg.data.image_size, options, 1)
    objective.load_head_state(pkg.head_state())
    data, items = held_out_pairs(cfg, sampling, pairs)
    # the package's normaliser, else one fitted on the pairs evaluated (as before; only a federated package has none)
    dataset = resolve_preprocessing(pkg, data, items, cfg.data.image_size, cfg.backbone).dataset(data, items)
    v, u, texts, labels, ids = embed_pairs_ids(objective, model, dataset, cfg.probe.batch_size)
    group_of = {i.item_id: i.group for i in items}
    numbered: dict[str, str] = {}  # groups written out as g0, g1, ... in pool order: no identifier (even hashed) leaves the run
    groups = [numbered.setdefault(group_of[i], f"g{len(numbered)}") for i in ids]
    i2t, t2i, chance = retrieval_metrics(v, u, texts, ks)
    hits = query_hits(v, u, texts, ks)
    prompts = class_prompts or {}
    result = RetrievalResult(i2t, t2i, chance, None, len(texts), prompts, n_groups=len(set(groups)), groups=groups)
    result.hits = {k: h.tolist() for k, h in hits.items()}
    result.intervals = {k: group_interval(h, groups, seed=cfg.seed) for k, h in hits.items()}
    if prompts:
        correct = zero_shot_hits(objective, v, labels, data.manifest.class_names, prompts)
        result.hits["zero_shot"] = correct.tolist()
        scored = correct >= 0
        result.zero_shot_acc = float(correct[scored].mean()) if scored.any() else float("nan")
        result.n_zero_shot = int(scored.sum())
        result.zero_shot_interval = group_interval(correct, groups, seed=cfg.seed)
        result.n_zero_shot_groups = len({g for g, c in zip(groups, correct, strict=True) if c >= 0})
    return result


@torch.no_grad()
def zero_shot_from_prompts(
    objective: ConVIRTObjective, v: torch.Tensor, labels: torch.Tensor, class_names: list[str], prompts: dict[str, list[str]]
) -> float:
    """Zero-shot accuracy with prompts keyed by class name (or by class index as a string)."""
    correct = zero_shot_hits(objective, v, labels, class_names, prompts)
    return float(correct[correct >= 0].mean())


@torch.no_grad()
def zero_shot_hits(
    objective: ConVIRTObjective, v: torch.Tensor, labels: torch.Tensor, class_names: list[str], prompts: dict[str, list[str]]
) -> np.ndarray:
    """Per image: 1 when its nearest class prompt embedding is its class, 0 when not, -1 when it has no label."""
    keyed = {str(k): p for k, p in prompts.items()}
    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    missing = [n for i, n in enumerate(names) if n not in keyed and str(i) not in keyed]
    if missing:
        raise ConfigError(f"class prompts are missing for classes {missing}; give at least one prompt per class ({names}).")
    class_emb = torch.stack([objective.embed_texts(keyed.get(n, keyed.get(str(i), []))).mean(0) for i, n in enumerate(names)])
    predicted = (F.normalize(v, dim=-1) @ F.normalize(class_emb, dim=-1).T).argmax(1)
    return np.where(labels.numpy() >= 0, (predicted == labels).numpy().astype(int), -1)


def load_prompts(path: Path) -> dict[str, list[str]]:
    """Class prompts from a YAML/JSON file: each class name (or index) maps to a prompt or a list of prompts."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--prompts {path} cannot be read as YAML/JSON ({exc}); pass a mapping of class name to prompts.") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--prompts {path} holds no mapping; write one line per class, e.g. `normal: [The lungs are clear.]`.")
    prompts = {str(k): [v] if isinstance(v, str) else v for k, v in raw.items()}
    bad = [k for k, v in prompts.items() if not isinstance(v, list) or not v or not all(isinstance(p, str) for p in v)]
    if bad:
        raise ConfigError(f"--prompts {path}: classes {bad} need a prompt or a non-empty list of prompts.")
    return prompts


def with_interval(value: float, interval: list[float] | None) -> str:
    """'0.412 [0.300, 0.520]', or '0.412' where there is no interval."""
    if not interval or any(np.isnan(x) for x in interval):
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def result_rows(result: RetrievalResult) -> list[list[str]]:
    """One row per k: image→text and text→image Recall@k (95% CI over patients/groups) and the chance level."""
    return [
        [
            str(k),
            with_interval(result.image_to_text[k], result.intervals.get(f"image_to_text@{k}")),
            with_interval(result.text_to_image[k], result.intervals.get(f"text_to_image@{k}")),
            f"{result.chance[k]:.3f}",
        ]
        for k in result.chance
    ]


def result_table(result: RetrievalResult) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) for a terminal or report table."""
    return ["k", "image→text R@k [95% CI]", "text→image R@k [95% CI]", "chance"], result_rows(result)


def zero_shot_line(result: RetrievalResult) -> str | None:
    """The zero-shot accuracy with its interval and what it rests on (None without prompts)."""
    if result.zero_shot_acc is None:
        return None
    return (
        f"zero-shot accuracy from class prompts: {with_interval(result.zero_shot_acc, result.zero_shot_interval)} "
        f"({result.n_zero_shot} labelled held-out images; 95% CI over their {result.n_zero_shot_groups} groups)"
    )


def write_retrieval(result: RetrievalResult, out_dir: Path) -> list[Path]:
    """``retrieval.csv`` (one line per k) and ``retrieval.json`` (everything) in ``out_dir``."""
    header = ["k", "image_to_text", "i2t_low", "i2t_high", "text_to_image", "t2i_low", "t2i_high", "chance"]
    rows = [
        [k, result.image_to_text[k], *result.intervals.get(f"image_to_text@{k}", [None, None]), result.text_to_image[k]]
        + [*result.intervals.get(f"text_to_image@{k}", [None, None]), result.chance[k]]
        for k in result.chance
    ]
    return [write_csv(Path(out_dir) / "retrieval.csv", header, rows), write_json(Path(out_dir) / "retrieval.json", asdict(result))]
