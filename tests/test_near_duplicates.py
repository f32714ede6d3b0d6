"""Near-duplicate clusters: constructed near-copies join their original, distinct images stay apart,
the scan reports clusters spanning classes, splits keep a cluster on one side, and BUSI's measured pairs are linked."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from insitu.cli import main
from insitu.domains import ManifestItem, create_domain
from insitu.domains.near_duplicates import group_near_duplicates, near_duplicate_clusters, stratified_split
from tests.conftest import shared


def structure(seed: int, size: int = 164) -> np.ndarray:
    """A random grey scene with structure at several scales (blobs 2 to 16 px wide), 0-255."""
    rng = np.random.default_rng(seed)
    field = sum(gaussian_filter(rng.standard_normal((size, size)), sigma) * sigma for sigma in (2, 6, 16))
    return np.clip((field - field.mean()) / field.std() * 45 + 128, 0, 255).astype(np.uint8)


def write_variants(folder: Path, seed: int) -> dict[str, Path]:
    """An original and four near-copies: shifted by 2 px, rescaled, re-encoded as JPEG, brightened."""
    folder.mkdir(parents=True, exist_ok=True)
    big = structure(seed)
    original = big[2:162, 2:162]
    files = {
        "original": (original, "png"),
        "shifted": (big[2:162, 4:164], "png"),
        "rescaled": (np.asarray(Image.fromarray(original).resize((96, 96), Image.Resampling.BICUBIC)), "png"),
        "jpeg": (original, "jpg"),
        "brighter": (np.clip(original.astype(int) + 20, 0, 255).astype(np.uint8), "png"),
    }
    paths = {}
    for name, (pixels, suffix) in files.items():
        paths[name] = folder / f"{seed}_{name}.{suffix}"
        Image.fromarray(pixels).save(paths[name], **({"quality": 75} if suffix == "jpg" else {}))
    return paths


def test_near_copies_join_their_original_and_distinct_images_stay_apart(tmp_path: Path) -> None:
    first, second = write_variants(tmp_path / "a", seed=1), write_variants(tmp_path / "a", seed=2)
    paths = list(first.values()) + list(second.values())
    clusters = near_duplicate_clusters(paths)
    assert clusters[:5] == [0] * 5  # every near-copy of the first scene with its original
    assert clusters[5:] == [1] * 5
    # only the original of each scene: the two distinct scenes are not linked
    assert near_duplicate_clusters([first["original"], second["original"]]) == [0, 1]
    assert near_duplicate_clusters([]) == []


def test_grouping_follows_clusters_not_item_order(tmp_path: Path) -> None:
    first, second = write_variants(tmp_path, seed=3), write_variants(tmp_path, seed=4)
    items = [ManifestItem(str(k), str(p), "same") for k, p in enumerate([first["original"], first["jpeg"], second["original"], second["shifted"]])]
    items.append(ManifestItem("npz", str(tmp_path / "set.npz"), "npz-group"))
    grouped = [i.group for i in group_near_duplicates(items)]
    assert grouped[0] == grouped[1] != grouped[2] == grouped[3] and grouped[4] == "npz-group"
    assert [i.group for i in group_near_duplicates(items[3::-1])] == grouped[3::-1]


def test_scan_reports_clusters_spanning_classes(tmp_path: Path) -> None:
    root = tmp_path / "set"
    a, b = write_variants(root / "benign", seed=5), write_variants(root / "malignant", seed=6)
    (b["jpeg"]).unlink()
    Image.open(a["original"]).save(root / "malignant" / "relabelled.png")  # the same scan filed under a second class
    Image.fromarray(structure(7)).save(root / "malignant" / "alone.png")
    assert main(["scan", str(root), "--domain", "images", "--out", str(tmp_path / "scan")]) == 0
    with open(tmp_path / "scan" / "near_duplicates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_path = {r["path"]: r for r in rows}
    assert "malignant/alone.png" not in by_path and len(rows) == 10
    assert by_path["malignant/relabelled.png"]["cluster"] == by_path["benign/5_original.png"]["cluster"]
    assert by_path["benign/5_jpeg.jpg"]["spans_classes"] == "True" and by_path["malignant/6_shifted.png"]["spans_classes"] == "False"
    assert {r["label"] for r in rows} == {"benign", "malignant"}
    assert main(["scan", str(root), "--out", str(tmp_path / "plain"), "--no-near-duplicates"]) == 0
    assert not (tmp_path / "plain" / "near_duplicates.csv").exists()


def test_stratified_split_keeps_a_cluster_on_one_side(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for label, seeds in (("x", range(10, 16)), ("y", range(20, 26))):
        for seed in seeds:
            write_variants(root / label, seed)
    items = create_domain("images", {"channels": 1, "labels": "folders"}).scan(root).items
    for seed in range(4):
        train, test = stratified_split(items, 0.3, seed)
        assert train and test and len(train) + len(test) == len(items)
        sides = {Path(i.path).name.split("_")[0]: set() for i in items}
        for side, part in (("train", train), ("test", test)):
            for i in part:
                sides[Path(i.path).name.split("_")[0]].add(side)
        assert all(len(s) == 1 for s in sides.values())  # the five copies of a scene are never split


def test_busi_high_correlation_pairs_are_clustered() -> None:
    root = shared("medical", "busi")
    paths = sorted(str(p) for p in root.rglob("*.png"))
    # reference, computed independently: pairs whose grey 64×64 thumbnails correlate above 0.95
    x = np.stack([np.asarray(Image.open(p).convert("L").resize((64, 64), Image.Resampling.BILINEAR), np.float64).ravel() for p in paths])
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j = np.nonzero(np.triu(x @ x.T > 0.95, k=1))
    clusters = np.array(near_duplicate_clusters(paths))
    sizes = np.bincount(clusters)
    assert len(i) > 100  # measured: 139 pairs
    assert np.mean(clusters[i] == clusters[j]) >= 0.95  # measured: all 139
    assert sizes.max() <= 10 and (sizes > 1).sum() <= 150  # not merged wholesale (measured: largest 6, 101 clusters)
