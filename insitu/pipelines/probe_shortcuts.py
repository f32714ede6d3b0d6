"""A shortcut check for classification probes: can trivial statistics of the raw files predict the labels?

Real sets leak their labels through acquisition: on PolypGen's centre B every no-polyp frame is
384×216 and nearly every polyp frame 384×284–307, so after the square resize a model can read the
class from the stretched shapes alone. Here a standardised logistic regression on five numbers per
raw file (height, width, aspect, mean and std of the grey level) is scored on the probe's own folds
(`evaluation_plan`) and compared to the majority class of each fold's test items with a paired
bootstrap over test groups. When its CI lies above chance the probe gets a row for it and a warning
naming the strongest statistic: every model's accuracy should then be read against that row, and a
size or aspect cue removed with ``data.options.aspect: crop``. When not, nothing is added (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.preprocessing import StandardScaler

from insitu.config import RunConfig
from insitu.domains import ManifestItem
from insitu.domains.images import IMAGE_SUFFIXES, npz_arrays
from insitu.heads.probe import knn_predict, linear_probe_predict
from insitu.heads.stats import accuracy_from_counts, format_delta, mean_std, paired_bootstrap
from insitu.pipelines.probe_plan import ProbeResult, Split, classification_pool, evaluation_plan

log = logging.getLogger("insitu")

TRIVIAL = "trivial statistics (size, aspect, intensity)"
STATISTICS = ("height", "width", "aspect (w/h)", "mean intensity", "intensity std")
CHECKED_DOMAINS = ("images",)  # items are whole image files (or .npz rows); tiles and frames have no file of their own
THUMBNAIL = 64  # intensity statistics from a ~64 px subsample: cheap, and enough for a mean and a spread


@dataclass
class ShortcutCheck:
    """Trivial-statistics accuracy on the probe's full-label folds versus the majority class of each test fold."""

    accuracy: float
    std: float
    evaluations: int
    chance: float  # pooled accuracy of predicting each test fold's majority class
    delta: float  # accuracy − chance, pooled over evaluations
    ci_low: float  # paired bootstrap CI of delta over test groups (nan: no CI)
    ci_high: float
    n_train: int
    n_test: int
    strongest: str  # the single statistic that predicts best
    strongest_accuracy: float
    knn_accuracy: float = float("nan")  # kNN on the standardised statistics (reported beside the models' kNN; not the test)
    knn_std: float = 0.0

    @property
    def above_chance(self) -> bool:
        return bool(np.isfinite(self.ci_low) and self.ci_low > 0)


# ---------------------------------------------------------------- statistics


def trivial_statistics(items: Sequence[ManifestItem]) -> np.ndarray | None:
    """N × 5 (`STATISTICS`) from each raw file before any crop or resize, or None (logged) when one cannot be read here.

    Image files are opened with PIL (JPEGs decoded at reduced scale); ``.npz`` rows come from the array.
    """
    rows = []
    for item in items:
        path = Path(item.path)
        try:
            if "npz_key" in item.extra:
                rows.append(_array_stats(npz_arrays(item.path)[item.extra["npz_key"]][item.extra["index"]]))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append(_file_stats(path))
            else:
                log.info("Shortcut check skipped: %s files are not read without their domain.", path.suffix or "suffix-less")
                return None
        except (OSError, ValueError) as exc:  # a file changed since the scan: the probe itself reports such items
            log.info("Shortcut check skipped: an item could not be read for its statistics (%s).", type(exc).__name__)
            return None
    return np.array(rows, dtype=np.float64)


def _file_stats(path: Path) -> list[float]:
    with Image.open(path) as im:
        width, height = im.size  # the header's size, before any decoding
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            grey = np.asarray(im, dtype=np.float32)
        else:
            im.draft("L", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at 1/2–1/8 scale
            grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    step = max(1, max(grey.shape) // THUMBNAIL)
    sub = grey[::step, ::step]
    return [height, width, width / height, float(sub.mean()), float(sub.std())]


def _array_stats(arr: np.ndarray) -> list[float]:
    height, width = arr.shape[:2]
    grey = arr.astype(np.float32).mean(-1) if arr.ndim == 3 else arr.astype(np.float32)
    grey = grey / 255.0 if arr.dtype == np.uint8 else grey
    return [height, width, width / height, float(grey.mean()), float(grey.std())]


# ---------------------------------------------------------------- the check


def _knn(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int) -> np.ndarray:
    """kNN on the statistics standardised on the training items (raw sizes would swamp the intensities)."""
    scaler = StandardScaler().fit(x_train)
    return knn_predict(scaler.transform(x_train), y_train, scaler.transform(x_test), k)


def _fold_counts(
    stats: np.ndarray, labels: np.ndarray, plan: list[Split], columns: list[int], knn_k: int | None = None
) -> tuple[np.ndarray, list[float]]:
    """Per-repeat, per-item (correct, seen) counts (R × N × 2) of the logistic regression (or kNN with ``knn_k``),
    and each evaluation's accuracy."""
    counts = np.zeros((max(s.repeat for s in plan) + 1, len(labels), 2))
    scores = []
    predict = linear_probe_predict if knn_k is None else lambda a, b, c: _knn(a, b, c, knn_k)
    for s in plan:
        correct = predict(stats[s.train][:, columns], labels[s.train], stats[s.test][:, columns]) == labels[s.test]
        counts[s.repeat, s.test, 0] += correct
        counts[s.repeat, s.test, 1] += 1
        scores.append(float(correct.mean()))
    return counts, scores


def _majority_counts(labels: np.ndarray, plan: list[Split]) -> np.ndarray:
    """Counts of predicting each test fold's own majority class: the best any constant predictor can do there."""
    counts = np.zeros((max(s.repeat for s in plan) + 1, len(labels), 2))
    for s in plan:
        values, n = np.unique(labels[s.test], return_counts=True)
        counts[s.repeat, s.test, 0] += labels[s.test] == values[np.argmax(n)]
        counts[s.repeat, s.test, 1] += 1
    return counts


def shortcut_check(
    stats: np.ndarray,
    labels: np.ndarray,
    plan: list[Split],
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    knn_k: int = 20,
) -> ShortcutCheck:
    """Score the trivial statistics on ``plan``'s full-label splits against chance, with a bootstrap CI over ``groups``."""
    full = max(s.fraction for s in plan)
    plan = [s for s in plan if s.fraction == full]
    trivial, scores = _fold_counts(stats, labels, plan, list(range(stats.shape[1])))
    majority = _majority_counts(labels, plan)
    seen = trivial[..., 1].sum(0) > 0
    units = None if groups is None else np.asarray(groups)[seen]
    delta, lo, hi = paired_bootstrap(
        trivial[:, seen], majority[:, seen], accuracy_from_counts, units, n_boot, seed, level, classes=labels[seen]
    )
    single = [float(accuracy_from_counts(_fold_counts(stats, labels, plan, [j])[0][:, seen].sum((0, 1)))) for j in range(stats.shape[1])]
    best = int(np.argmax(single))
    mean, std = mean_std(scores)
    knn_mean, knn_std = mean_std(_fold_counts(stats, labels, plan, list(range(stats.shape[1])), knn_k)[1])
    return ShortcutCheck(
        accuracy=mean,
        std=std,
        evaluations=len(scores),
        chance=float(accuracy_from_counts(majority[:, seen].sum((0, 1)))),
        delta=delta,
        ci_low=lo,
        ci_high=hi,
        n_train=round(float(np.mean([len(s.train) for s in plan]))),
        n_test=int(seen.sum()),
        strongest=STATISTICS[best],
        strongest_accuracy=single[best],
        knn_accuracy=knn_mean,
        knn_std=knn_std,
    )


def shortcut_result(cfg: RunConfig) -> tuple[list[ProbeResult], ShortcutCheck] | None:
    """The check on the probe's own pool and folds (rebuilt as `classification_results` builds them); a row only when above chance.

    The folds match the models' whenever every item loads (an item that fails to load leaves the models' pool).
    """
    pool = classification_pool(cfg)
    domain = pool.sides[0][0].domain.name
    if domain not in CHECKED_DOMAINS:
        log.info("Shortcut check skipped: the %s domain's items are not whole image files.", domain)
        return None
    items = pool.items
    stats = trivial_statistics(items)
    if stats is None:
        return None
    labels = np.array([i.label for i in items])
    groups = np.array([f"{side}:{i.group}" for side, (_, its) in enumerate(pool.sides) for i in its])
    full = max(cfg.probe.label_fractions)
    plan = evaluation_plan(labels, groups, cfg.probe, cfg.seed, pool.fixed, fractions=[full])
    check = shortcut_check(stats, labels, plan, groups, cfg.probe.bootstrap, cfg.seed, cfg.probe.confidence, cfg.probe.knn_k)
    versus = f"{check.accuracy:.3f} vs majority class {check.chance:.3f}, Δ {format_delta(check.delta, check.ci_low, check.ci_high)}"
    if not check.above_chance:
        log.info(
            "Shortcut check: trivial statistics of the raw files (%s) are not above chance (%s); no row added.",
            ", ".join(STATISTICS),
            versus,
        )
        return None
    log.warning(
        "Shortcut: trivial statistics of the raw files (%s) predict the probe labels above chance (%s); the strongest alone is %s "
        "(%.3f). A model can score this without looking at the content: read every model against the '%s' row, and where size "
        "or aspect is the cue set data.options.aspect: crop (images domain) so that it does not reach the model.",
        ", ".join(STATISTICS), versus, check.strongest, check.strongest_accuracy, TRIVIAL,
    )  # fmt: skip
    verdict = f"shortcut: above chance {check.chance:.3f} by {format_delta(check.delta, check.ci_low, check.ci_high)}; strongest: {check.strongest}"
    size = (check.evaluations, check.n_train, check.n_test)
    rows = [
        ProbeResult(TRIVIAL, "linear", full, "accuracy", check.accuracy, check.std, *size, verdict=verdict),
        ProbeResult(TRIVIAL, "knn", full, "accuracy", check.knn_accuracy, check.knn_std, *size),
    ]
    return rows, check
