"""Near-duplicate clusters and a seeded, stratified train/test split of a class-folder image set.

Sets such as BUSI (breast ultrasound, class subfolders benign/malignant/normal) ship no split and no
patient ids, and near-copies of one scan remain in them (re-crops, an annotation drawn on, the next
frame of the same sweep). A split that puts one copy in train and another in test leaks.

:func:`near_duplicate_clusters` links two images when either

* the Pearson correlation of their 32×32 grey thumbnails is at least ``MIN_CORRELATION`` = 0.95, or
* their perceptual hashes differ in at most ``MAX_HASH_DISTANCE`` = 10 of 63 bits (pHash: the same
  thumbnail, 2-D DCT, the 8×8 lowest frequencies without DC, each bit "above the median") and their
  correlation is at least ``MIN_HASH_CORRELATION`` = 0.90: two weaker signals that agree,

and takes connected components of those links (a copy of a copy joins the cluster). The rules are
computed for all pairs in row chunks, so 10k images cost one 10k×10k pass (seconds) and 10 MB of
thumbnails.

Thresholds, measured on BUSI (622 images; ``benchmarks/bench_near_duplicates.py``): 139 pairs have a
pixel correlation above 0.95 at 64 px; the rule puts all 139 in shared clusters (the hash alone at
distance ≤ 10 links 133). It links 159 pairs in all; the 20 at 64-px correlation 0.79-0.95 are (12
inspected by eye) the same scan re-cropped, with a marker drawn on, or the next frame of a sweep.
A correlation of 0.90 alone links different lesions (a benign/malignant pair at hash distance 20), and the hash alone does from distance 12 on BUSI and from
distance 6 on chest X-rays (all alike at 8×8 frequencies: hash ≤ 10 alone chains 24 different
radiographs of a 335-image set into one cluster), hence the combination. See docs/results/evaluation.md for
the clusters found.

Items are grouped by these clusters (:func:`group_near_duplicates`), so near-copies land on the same
side; the split is then drawn per class with `split_by_group`, so each class keeps its share on both
sides. The same seed always gives the same split. The probe uses the same grouping for
``probe.group_near_duplicates``; :func:`insitu.api.split_class_folders` offers the split to scripts;
``insitu scan`` writes the clusters to ``near_duplicates.csv`` (:func:`write_near_duplicates`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from insitu.domains import ManifestItem, create_domain, split_by_group, stable_id
from insitu.domains.base import Manifest
from insitu.errors import DataError

THUMBNAIL = 32  # px, both rules work on one grey thumbnail per file
MIN_CORRELATION = 0.95  # Pearson, 32×32 grey thumbnails: enough on its own
MAX_HASH_DISTANCE = 10  # of 63 pHash bits: enough together with MIN_HASH_CORRELATION
MIN_HASH_CORRELATION = 0.90
_CHUNK = 1024  # rows per block of the pairwise pass: two 1024×n float32 blocks


def thumbnail_hash(path: str | Path, size: int = 16) -> str:
    """Average hash (kept for callers of the earlier grouping): exact resaves share it; near-copies often do not."""
    stat = os.stat(path)
    return _thumbnail_hash(str(path), stat.st_mtime_ns, stat.st_size, size)


@lru_cache(maxsize=65536)
def _thumbnail_hash(path: str, mtime_ns: int, nbytes: int, size: int) -> str:
    # keyed on mtime and size too, so a changed file is hashed again
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    bits = (grey > grey.mean()).flatten()
    return stable_id(np.packbits(bits).tobytes().hex())


def grey_thumbnail(path: str | Path) -> np.ndarray:
    """The ``THUMBNAIL``² grey uint8 thumbnail both rules compare; cached per (path, mtime, size)."""
    try:
        stat = os.stat(path)
        return _grey_thumbnail(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it for near-duplicate grouping ({exc}); remove the file or fix it.") from exc


@lru_cache(maxsize=65536)
def _grey_thumbnail(path: str, mtime_ns: int, nbytes: int) -> np.ndarray:
    with Image.open(path) as img:
        img.draft("L", (2 * THUMBNAIL, 2 * THUMBNAIL))  # JPEG: decode at reduced scale
        thumb = np.asarray(img.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR), dtype=np.uint8)
    thumb.setflags(write=False)
    return thumb


def perceptual_hash(thumb: np.ndarray) -> np.ndarray:
    """63 bits: the 8×8 lowest DCT frequencies of a grey thumbnail without DC, each above their median."""
    low = dctn(thumb.astype(np.float64), norm="ortho")[:8, :8].flatten()[1:]
    return low > np.median(low)


def near_duplicate_clusters(
    paths: Sequence[str | Path],
    max_hash_distance: int = MAX_HASH_DISTANCE,
    min_correlation: float = MIN_CORRELATION,
    min_hash_correlation: float = MIN_HASH_CORRELATION,
    workers: int = 4,
) -> list[int]:
    """A cluster id per path (0, 1, ... in order of first appearance); near-duplicates share one."""
    if not paths:
        return []
    with ThreadPoolExecutor(workers) as pool:
        thumbs = np.stack(list(pool.map(grey_thumbnail, paths))).reshape(len(paths), -1).astype(np.float32)
    pixels = thumbs - thumbs.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(pixels, axis=1, keepdims=True)
    pixels /= np.where(norms > 0, norms, 1.0)  # a flat image correlates with nothing (its hash still links it)
    bits = np.stack([perceptual_hash(t.reshape(THUMBNAIL, THUMBNAIL)) for t in thumbs]).astype(np.float32) * 2 - 1
    rows, cols = _linked_pairs(pixels, bits, max_hash_distance, min_correlation, min_hash_correlation)
    n = len(paths)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first: dict[int, int] = {}
    return [first.setdefault(int(c), len(first)) for c in labels]


def _linked_pairs(
    pixels: np.ndarray, bits: np.ndarray, max_distance: int, min_correlation: float, min_hash_correlation: float
) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j for every linked pair (see the module docstring), a block of rows at a time."""
    n, nbits = bits.shape
    rows, cols = [], []
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        distance = (nbits - bits[start:stop] @ bits[start:].T) / 2  # ±1 codes: agreements minus disagreements
        correlation = pixels[start:stop] @ pixels[start:].T
        linked = (correlation >= min_correlation) | ((distance <= max_distance + 0.5) & (correlation >= min_hash_correlation))
        i, j = np.nonzero(np.triu(linked, k=1))  # column offset equals row offset, so this drops self and lower pairs
        rows.append(i + start)
        cols.append(j + start)
    return np.concatenate(rows), np.concatenate(cols)


def group_near_duplicates(items: list[ManifestItem]) -> list[ManifestItem]:
    """Items regrouped by near-duplicate cluster: the group is a stable id of the cluster's smallest path, so it
    does not depend on the items' order. Items read from an ``.npz`` keep their group.

    The items' own groups (``group_pattern`` case ids) are replaced, as before: items may come from several
    scans (the holdout groups pretraining and test items together), where equal group ids mean nothing."""
    files = [k for k, i in enumerate(items) if Path(i.path).suffix.lower() != ".npz"]
    clusters = near_duplicate_clusters([items[k].path for k in files])
    smallest: dict[int, str] = {}
    for k, c in zip(files, clusters, strict=True):
        smallest[c] = min(smallest.get(c, items[k].path), items[k].path)
    out = list(items)
    for k, c in zip(files, clusters, strict=True):
        out[k] = replace(items[k], group=stable_id("near-duplicates", smallest[c]))
    return out


@dataclass
class NearDuplicateSummary:
    clusters: int
    images: int
    spanning_classes: int

    def line(self) -> str:
        return (
            f"near-duplicates: {self.clusters} clusters, {self.images} images grouped, "
            f"{self.spanning_classes} clusters span two or more classes (see near_duplicates.csv)"
        )


def write_near_duplicates(manifest: Manifest, out_dir: Path) -> NearDuplicateSummary:
    """Write ``near_duplicates.csv`` (cluster, path as the manifest writes it, label, spans_classes) for every
    image in a cluster of two or more; a cluster filed under several classes is a labelling question to settle."""
    from insitu.io import write_csv
    from insitu.privacy import shareable_path

    items = [i for i in manifest.items if Path(i.path).suffix.lower() != ".npz"]
    clusters = near_duplicate_clusters([i.path for i in items])
    members: dict[int, list[ManifestItem]] = {}
    for item, c in zip(items, clusters, strict=True):
        members.setdefault(c, []).append(item)
    rows, spanning = [], 0
    for number, group in enumerate(g for g in members.values() if len(g) > 1):
        spans = len({i.label for i in group}) > 1
        spanning += spans
        for item in group:
            label = manifest.class_names[item.label] if item.label is not None and manifest.class_names else item.label
            rows.append({"cluster": number, "path": shareable_path(item.path, manifest.root, token_salt=manifest.path_salt), "label": label, "spans_classes": spans})
    write_csv(Path(out_dir) / "near_duplicates.csv", ["cluster", "path", "label", "spans_classes"], rows)
    n_clusters = len({r["cluster"] for r in rows})
    return NearDuplicateSummary(n_clusters, len(rows), spanning)


def stratified_split(items: list[ManifestItem], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[ManifestItem], list[ManifestItem]]:
    """(train, test): per class, whole near-duplicate clusters go to one side, near ``test_fraction`` of each class."""
    grouped = group_near_duplicates(items)
    train: list[ManifestItem] = []
    test: list[ManifestItem] = []
    for label in sorted({i.label for i in grouped}, key=str):
        parts = split_by_group([i for i in grouped if i.label == label], {"train": 1 - test_fraction, "test": test_fraction}, seed)
        train += [replace(i, split="train") for i in parts["train"]]
        test += [replace(i, split="test") for i in parts["test"]]
    # a cluster filed under two classes must not straddle the split: keep it in train only
    train_groups = {i.group for i in train}
    return train, [i for i in test if i.group not in train_groups]


def split_class_folders(
    root: str | Path, test_fraction: float = 0.3, seed: int = 0, channels: int = 1
) -> tuple[Manifest, list[ManifestItem], list[ManifestItem]]:
    """Scan class folders of images (``channels`` per image) and split them; returns (manifest, train, test)."""
    manifest = create_domain("images", {"channels": channels, "labels": "folders"}).scan(Path(root))
    train, test = stratified_split(manifest.items, test_fraction, seed)
    return manifest, train, test
