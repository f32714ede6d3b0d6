"""A seeded corpus of hostile inputs per parser, run in the fast tier under a time budget.

Each parser gets valid tiny files made by the fixtures, then seeded mutations of them (truncated,
bit-flipped, overwritten with garbage, emptied, a chunk repeated). Every case must end in a
result, a typed insitu error, or a quarantine entry: never another exception, never a hang
(each case runs under an alarm), and each format's corpus stays under a stated memory bound.
The whole corpus takes about a second once the libraries are imported, so it runs in this
process: the peak-memory counter is reset before each format (Linux /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insitu.config import load_config
from insitu.domains import create_domain
from insitu.errors import InsituError
from insitu.package_format import vet_package
from tests.conftest import tiny_config, write_shapes

SEED = 20261202
CASES_PER_FILE = 10
CASE_SECONDS = 20  # a case that takes longer is a hang
MEMORY_BOUND_MIB = 1500  # growth of the process's peak memory over one format's corpus


def mutations(data: bytes, rng: np.random.Generator, n: int = CASES_PER_FILE) -> Iterator[tuple[str, bytes]]:
    """Seeded hostile variants of ``data``."""
    yield "empty", b""
    yield "header only", data[: min(len(data), 16)]
    for i in range(n):
        kind = ("truncate", "flip", "garbage", "repeat")[i % 4]
        if kind == "truncate":
            cut = int(rng.integers(1, max(2, len(data))))
            yield f"truncate@{cut}", data[:cut]
        elif kind == "flip":
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 17))):
                buf[pos] ^= int(rng.integers(1, 256))
            yield "flip", bytes(buf)
        elif kind == "garbage":
            start = int(rng.integers(0, len(data)))
            yield f"garbage@{start}", data[:start] + rng.bytes(len(data) - start)
        else:
            a = int(rng.integers(0, len(data)))
            yield f"repeat@{a}", data[:a] + data[a : a + 256] * 8 + data[a:]


class Hang(Exception):
    pass


def contained(what: str, fn: Callable[[], object]) -> None:
    """Run ``fn``: a result or an InsituError is fine; anything else, or a hang, fails naming the case."""

    def alarm(*_: object) -> None:
        raise Hang(what)

    # pytest-timeout arms the same real-time timer for the whole test: re-arm what is left of it afterwards
    old = signal.signal(signal.SIGALRM, alarm)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    started = time.monotonic()
    try:
        fn()
    except InsituError:
        pass
    except Hang:
        pytest.fail(f"{what}: no answer within {CASE_SECONDS} s")
    except Exception as exc:  # noqa: BLE001 - the point: nothing but typed errors may escape
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.001))


def scan_and_load(domain_name: str, options: dict, root: Path, what: str) -> None:
    """Scan a folder of mutated files, then load every item the scan kept."""
    domain = create_domain(domain_name, options)

    def run() -> None:
        manifest = domain.scan(root)
        for item in manifest.items[:40]:
            contained(f"{what}: load {item.item_id}", lambda item=item: domain.load(item, manifest))

    contained(f"{what}: scan", run)


def corpus_folder(root: Path, good: dict[str, bytes], rng: np.random.Generator, keep_good: bool = True) -> Path:
    """One folder holding every mutation of every good file (plus the good files)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in good.items():
        stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
        for i, (_, variant) in enumerate(mutations(data, rng)):
            (root / f"{stem}_m{i}.{suffix}".rstrip(".")).write_bytes(variant)
        if keep_good:
            (root / name).write_bytes(data)
    return root


def image_corpus(tmp: Path) -> None:
    rng = np.random.default_rng(SEED)
    src = write_shapes(tmp / "src", n_per_class=1, size=32)
    good = {p.name: p.read_bytes() for p in sorted(src.rglob("*.png"))[:2]}
    img = np.random.default_rng(0).integers(0, 255, (24, 24), dtype=np.uint8)
    for fmt, ext in (("JPEG", "jpg"), ("TIFF", "tif"), ("BMP", "bmp")):
        Image.fromarray(img).save(tmp / f"g.{ext}", format=fmt)
        good[f"g.{ext}"] = (tmp / f"g.{ext}").read_bytes()
    scan_and_load("images", {}, corpus_folder(tmp / "images", good, rng), "images")
    npz = tmp / "m.npz"
    np.savez(npz, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.arange(4))
    for i, (kind, variant) in enumerate(mutations(npz.read_bytes(), rng)):
        bad = tmp / f"m{i}.npz"
        bad.write_bytes(variant)
        scan_and_load("images", {"split": "train"}, bad, f"npz {kind}")


def dicom_corpus(tmp: Path) -> None:
    from tests.data.dicom_fixtures import ct_volume, write_series

    rng = np.random.default_rng(SEED + 1)
    files = write_series(tmp / "src", ct_volume(shape=(3, 16, 16)))
    good = {f"s{i}.dcm": p.read_bytes() for i, p in enumerate(files)}
    opts = {"cache_dir": str(tmp / "cache"), "workers": 1, "pool": "thread"}
    scan_and_load("dicom", opts, corpus_folder(tmp / "dicom", good, rng, keep_good=False), "dicom")


def geotiff_corpus(tmp: Path) -> None:
    from tests.data.geotiff_fixtures import write_scene

    rng = np.random.default_rng(SEED + 2)
    good = {"scene.tif": write_scene(tmp / "src" / "scene.tif", bands=3, height=32, width=32).read_bytes()}
    folder = corpus_folder(tmp / "geotiff", good, rng, keep_good=False)
    for path in sorted(folder.iterdir()):  # one scene per folder: each must end in a result or a typed error
        sub = folder / f"{path.stem}_dir"
        sub.mkdir()
        path.rename(sub / path.name)
        scan_and_load("geotiff", {"tile_size": 16, "band_names": ["B1", "B2", "B3"]}, sub, f"geotiff {path.name}")


def video_corpus(tmp: Path) -> None:
    from tests.data.video_fixtures import counter_frames, write_video

    rng = np.random.default_rng(SEED + 3)
    good = {"v.mp4": write_video(tmp / "src" / "v.mp4", counter_frames(8, size=32)).read_bytes()}
    scan_and_load("video", {"fps": 5, "decode_size": 32}, corpus_folder(tmp / "video", good, rng), "video")


def package_corpus(tmp: Path) -> None:
    from insitu.adapters import create_adapters
    from insitu.adapters.package import apply_package, load_package, save_package
    from insitu.backbones import create_backbone
    from tests.conftest import TINY_BACKBONE

    rng = np.random.default_rng(SEED + 4)
    bb = create_backbone(TINY_BACKBONE)
    good = save_package(
        tmp / "good", bb, create_adapters(bb, {"blocks": "all", "bottleneck_dim": 4}), normalizer={"mean": [0.0] * 3, "std": [1.0] * 3}
    )
    meta, tensors = (good / "insitu.json").read_bytes(), (good / "adapter.safetensors").read_bytes()
    values = [None, -1, 0, 10**12, 1e308, "x" * 300, [], {}, [0, 99], "NaN", True, {"a": [1, {"b": None}]}]
    variants = [("json bytes " + k, v, tensors) for k, v in mutations(meta, rng)]
    variants += [("tensor bytes " + k, meta, v) for k, v in mutations(tensors, rng)]
    parsed = json.loads(meta)
    paths = [(a, b) for a, sect in parsed.items() if isinstance(sect, dict) for b in sect] + [(a, None) for a in parsed]
    for _ in range(24):
        a, b = paths[int(rng.integers(len(paths)))]
        edited = json.loads(meta)
        value = values[int(rng.integers(len(values)))]
        if b is None:
            edited[a] = value
        else:
            edited[a][b] = value
        variants.append((f"json {a}.{b}={str(value)[:20]}", json.dumps(edited).encode(), tensors))
    for i, (what, m, t) in enumerate(variants):
        pkg = tmp / f"p{i}"
        pkg.mkdir()
        (pkg / "insitu.json").write_bytes(m)
        (pkg / "adapter.safetensors").write_bytes(t)
        contained(f"package {what}", lambda pkg=pkg: vet_package(pkg))
        contained(f"package {what} (load + apply)", lambda pkg=pkg: apply_package(load_package(pkg), bb))


def config_corpus(tmp: Path) -> None:
    rng = np.random.default_rng(SEED + 5)
    root = write_shapes(tmp / "shapes", n_per_class=1, size=32)
    base = tiny_config(root, tmp / "runs")
    keys = [
        "name",
        "seed",
        "data.image_size",
        "data.max_items",
        "backbone.img_size",
        "backbone.kwargs",
        "backbone.patch_size",
        "adapter.blocks",
        "adapter.bottleneck_dim",
        "adapter.scale",
        "adapter.kind",
        "objective.name",
        "objective.options.out_dim",
        "objective.options.views.local_crops",
        "train.max_steps",
        "train.lr",
        "train.batch_size",
        "train.accumulate_grad_batches",
        "trainer.devices",
        "trainer.precision",
        "probe.knn_k",
        "nonexistent.key",
        "data",
        "train",
    ]
    values = [
        "-1",
        "0",
        "1e30",
        "true",
        "NaN",
        ".inf",
        "[]",
        "{}",
        "[0, 99]",
        "all-of-them",
        "'../x'",
        "!!python/object/apply:os.system ['true']",
        "[",
        "{a:",
        "\x00",
        "1" * 400,
        "{depthh: 2}",
        "null",
        "'x'",
        "- - -",
        "&a [*a]",
    ]
    for _ in range(60):
        override = f"{keys[int(rng.integers(len(keys)))]}={values[int(rng.integers(len(values)))]}"
        contained(f"--set {override!r}", lambda o=override: load_config(dict(base), [o]))
    for i, text in enumerate(
        ["a: [", "!!python/object:os.system {}", "\t- x", "data: 3", "x" * 1000, "---\n---\n", "data: {root: !!binary aGk=}"]
    ):
        path = tmp / f"c{i}.yaml"
        path.write_text(text)
        contained(f"yaml {text[:20]!r}", lambda p=path: load_config(p))


CORPORA = {
    "images": image_corpus,
    "dicom": dicom_corpus,
    "geotiff": geotiff_corpus,
    "video": video_corpus,
    "package": package_corpus,
    "config": config_corpus,
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def _reset_peak_memory() -> bool:
    """Reset this process's peak resident size (VmHWM) to its current size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# Pillow and pydicom warn about the corrupt files the corpus feeds them on purpose; the corpus checks what insitu does next
@pytest.mark.filterwarnings("ignore::UserWarning:PIL", "ignore::UserWarning:pydicom")
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_fuzz_corpus(name, tmp_path):
    measured = _reset_peak_memory()
    start = _status_kib("VmRSS:") if measured else 0
    CORPORA[name](tmp_path)
    if not measured:
        pytest.skip("every case ended in a result or a typed error; the memory bound needs a writable /proc/self/clear_refs")
    growth = (_status_kib("VmHWM:") - start) // 1024
    assert growth < MEMORY_BOUND_MIB, f"the {name} corpus grew the process by {growth} MiB"
