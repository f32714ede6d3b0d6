"""Near-duplicate clusters on a class-folder image set (default: BUSI), against a 64-px pixel-correlation reference.

    python benchmarks/bench_near_duplicates.py [ROOT] [--reference 0.95]

Prints the clusters found, images grouped, the cluster-size distribution, clusters spanning class
folders (by relative path), how many reference pairs (grey 64×64 thumbnails, Pearson correlation above
``--reference``) the pHash rule alone and the combined rule link, the previous rule's pair count, and
the time the clustering takes (thumbnails read cold, then warm from the per-file cache).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from insitu.domains import create_domain
from insitu.domains.near_duplicates import MAX_HASH_DISTANCE, near_duplicate_clusters, thumbnail_hash


def reference_pairs(paths: list[str], threshold: float) -> set[tuple[int, int]]:
    """Pairs whose grey 64×64 thumbnails correlate above ``threshold`` (computed independently of the module)."""
    x = np.stack([np.asarray(Image.open(p).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float64).ravel() for p in paths])
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    i, j = np.nonzero(np.triu(x @ x.T > threshold, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def linked_share(clusters: list[int], pairs: set[tuple[int, int]]) -> str:
    hit = sum(clusters[i] == clusters[j] for i, j in pairs)
    return f"{hit}/{len(pairs)} ({hit / max(len(pairs), 1):.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path("../shared/data/medical/busi"))
    parser.add_argument("--reference", type=float, default=0.95, help="64-px correlation above which a pair counts as a near-duplicate")
    args = parser.parse_args()
    manifest = create_domain("images", {"channels": 1, "labels": "auto"}).scan(args.root)
    paths = [i.path for i in manifest.items]
    rel = [Path(p).relative_to(args.root).as_posix() for p in paths]
    start = time.perf_counter()
    clusters = near_duplicate_clusters(paths)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    near_duplicate_clusters(paths)
    warm = time.perf_counter() - start
    sizes = Counter(Counter(clusters).values())
    grouped = {c for c, n in Counter(clusters).items() if n > 1}
    print(f"{len(paths)} images under {args.root}; clustering {cold:.2f} s cold, {warm:.2f} s warm (thumbnails cached)")
    print(f"clusters of 2+: {len(grouped)}; images grouped: {sum(n * k for n, k in sizes.items() if n > 1)}")
    print("size distribution (size: clusters):", {n: k for n, k in sorted(sizes.items()) if n > 1}, "largest:", max(sizes))
    pairs = reference_pairs(paths, args.reference)
    hash_only = near_duplicate_clusters(paths, min_correlation=2.0, min_hash_correlation=-2.0)
    print(f"reference pairs (64-px correlation > {args.reference}) linked: combined rule {linked_share(clusters, pairs)}, ", end="")
    print(f"pHash distance <= {MAX_HASH_DISTANCE} alone {linked_share(hash_only, pairs)}")
    old = Counter(thumbnail_hash(p) for p in paths)
    print(f"previous rule (equal 16x16 average hash): {sum(n * (n - 1) // 2 for n in old.values())} pairs")
    labels = [i.label for i in manifest.items]
    spanning = [c for c in grouped if len({labels[k] for k, x in enumerate(clusters) if x == c}) > 1]
    print(f"clusters spanning classes: {len(spanning)}")
    for c in spanning:
        print("  ", ", ".join(r for r, x in zip(rel, clusters, strict=True) if x == c))


if __name__ == "__main__":
    main()
