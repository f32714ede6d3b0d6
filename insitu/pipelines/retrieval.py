"""Image-text retrieval evaluation of a ConVIRT/CLIP adapter package on held-out pairs.

Image→text and text→image Recall@k (a query hits when a correct item is among its k nearest; a
text identical to the query's own paired text also counts as correct, since it cannot be told
apart), with the chance level for the same pool, and zero-shot classification: each image takes the
class whose prompts' mean text embedding is nearest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from insitu.adapters.package import apply_package, load_package
from insitu.backbones import create_backbone
from insitu.config import DataConfig, RunConfig
from insitu.domains import split_by_group
from insitu.errors import ConfigError
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


def recall_at_k(sim: torch.Tensor, positives: torch.Tensor | None = None, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Fraction of query rows of ``sim`` whose top-k columns hold a positive (default: the diagonal)."""
    positives = torch.eye(*sim.shape, dtype=torch.bool) if positives is None else positives.bool()
    order = sim.argsort(dim=1, descending=True)
    hit_rank = positives.gather(1, order).float().argmax(1)  # first correct position in the ranking
    return {k: float((hit_rank < k).float().mean()) for k in ks}


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
    objective.eval()
    model.eval()
    vs, us, texts, labels = [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if not batch["item_id"]:
            continue
        vs.append(objective.embed_images(model, batch["image"]))
        us.append(objective.embed_texts(batch["text"]))
        texts += batch["text"]
        labels.append(batch["label"])
    return torch.cat(vs), torch.cat(us), texts, torch.cat(labels)


def held_out_pairs(cfg: RunConfig, sampling: str, pairs: DataConfig | None = None) -> tuple[ScannedData, list]:
    """``pairs`` if given, else ``probe.test`` when it holds pairs, else the test part of a group split of ``data``."""
    explicit = pairs or (cfg.probe.test if cfg.probe.test is not None and cfg.probe.test.domain == "pairs" else None)
    test_cfg: DataConfig = explicit or cfg.data
    if test_cfg.domain != "pairs":
        raise ConfigError(f"retrieval needs image-text pairs: data.domain is {test_cfg.domain!r}, not 'pairs'.")
    test_cfg = test_cfg.model_copy(update={"options": {**test_cfg.options, "sampling": sampling}})
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
    v, u, texts, labels = embed_pairs(objective, model, dataset, cfg.probe.batch_size)
    i2t, t2i, chance = retrieval_metrics(v, u, texts, ks)
    prompts = class_prompts or {}
    zero_shot = zero_shot_from_prompts(objective, v, labels, data.manifest.class_names, prompts) if prompts else None
    return RetrievalResult(i2t, t2i, chance, zero_shot, len(texts), prompts)


@torch.no_grad()
def zero_shot_from_prompts(
    objective: ConVIRTObjective, v: torch.Tensor, labels: torch.Tensor, class_names: list[str], prompts: dict[str, list[str]]
) -> float:
    """Zero-shot accuracy with prompts keyed by class name (or by class index as a string)."""
    keyed = {str(k): p for k, p in prompts.items()}
    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    missing = [n for i, n in enumerate(names) if n not in keyed and str(i) not in keyed]
    if missing:
        raise ConfigError(f"class prompts are missing for classes {missing}; give at least one prompt per class ({names}).")
    class_emb = torch.stack([objective.embed_texts(keyed.get(n, keyed.get(str(i), []))).mean(0) for i, n in enumerate(names)])
    keep = labels >= 0
    return zero_shot_accuracy(v[keep], class_emb, labels[keep])


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


def result_rows(result: RetrievalResult) -> list[list[str]]:
    """One row per k: image→text and text→image Recall@k and the chance level."""
    return [[str(k), f"{result.image_to_text[k]:.3f}", f"{result.text_to_image[k]:.3f}", f"{result.chance[k]:.3f}"] for k in result.chance]


def result_table(result: RetrievalResult) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) for a terminal or report table."""
    return ["k", "image→text R@k", "text→image R@k", "chance"], result_rows(result)


def write_retrieval(result: RetrievalResult, out_dir: Path) -> list[Path]:
    """``retrieval.csv`` (one line per k) and ``retrieval.json`` (everything) in ``out_dir``."""
    header = ["k", "image_to_text", "text_to_image", "chance"]
    rows = [[k, result.image_to_text[k], result.text_to_image[k], result.chance[k]] for k in result.chance]
    return [write_csv(Path(out_dir) / "retrieval.csv", header, rows), write_json(Path(out_dir) / "retrieval.json", asdict(result))]
