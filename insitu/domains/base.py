"""The seams every domain plugs into: Sample, Manifest, the Domain interface, group splits.

A Sample is a dict: ``image`` (float32 C×H×W, or T×C×H×W for clips), optional ``mask`` (int64 H×W,
``IGNORE_INDEX`` where unlabelled/nodata), optional ``label`` (int), optional ``text``, and ``meta``
(domain, a stable non-identifying ``item_id``, ``group`` for splitting, geometry, band names, ...).
No patient names or other identifying values ever enter ``meta`` or a manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from insitu.errors import ConfigError
from insitu.io import write_csv, write_json

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = 255
Sample = dict[str, Any]


@dataclass
class ManifestItem:
    """One usable item: where it is, a stable id, the group it belongs to (patient/scene/case/file)."""

    item_id: str
    path: str
    group: str
    label: int | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuarantineItem:
    """A file that could not be used, why, and what the reading library said."""

    path: str
    reason: str
    message: str = ""


@dataclass
class Manifest:
    """The result of scanning a root: usable items plus a quarantine list."""

    domain: str
    root: str
    items: list[ManifestItem]
    quarantine: list[QuarantineItem] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    skipped: list[QuarantineItem] = field(default_factory=list)
    # set (to the secret salt) when shareable files show paths as opaque salted tokens (images `manifest_paths: token`)
    path_salt: str | None = None

    def write(self, out_dir: Path) -> None:
        """Write ``manifest.csv``, ``quarantine.csv`` (and ``skipped.csv`` if any) and ``manifest.json``.

        These files are shareable: paths are written relative to the scanned root (or as opaque
        salted tokens when outside it), and the root's spelling is scrubbed from every message.
        """
        from insitu.privacy import shareable_extra, shareable_path

        out_dir.mkdir(parents=True, exist_ok=True)
        cols = ["item_id", "path", "group", "label", "split", "extra"]
        salt = self.path_salt
        rows = [
            asdict(item)
            | {"path": shareable_path(item.path, self.root, token_salt=salt), "extra": shareable_extra(item.extra, self.root, salt)}
            for item in self.items
        ]
        write_csv(out_dir / "manifest.csv", cols, rows)
        _write_rows(out_dir / "quarantine.csv", self.quarantine, self.root, salt)
        if self.skipped:
            _write_rows(out_dir / "skipped.csv", self.skipped, self.root, salt)
        summary = {"domain": self.domain, "class_names": self.class_names, **self.counts()}
        write_json(out_dir / "manifest.json", summary)

    @classmethod
    def read(cls, out_dir: Path, data_root: Path | None = None) -> Manifest:
        """Read a manifest folder written by `write`; ``data_root`` turns its relative paths back into files."""
        summary = json.loads((out_dir / "manifest.json").read_text())
        base = Path(data_root) if data_root is not None else None
        if base is not None and base.is_file():
            base = base.parent
        with open(out_dir / "manifest.csv", newline="") as f:
            items = [
                ManifestItem(
                    item_id=r["item_id"],
                    path=str(base / r["path"]) if base is not None else r["path"],
                    group=r["group"],
                    label=int(r["label"]) if r["label"] not in ("", None) else None,
                    split=r["split"] or None,
                    extra=json.loads(r["extra"] or "{}"),
                )
                for r in csv.DictReader(f)
            ]
        with open(out_dir / "quarantine.csv", newline="") as f:
            quarantine = [QuarantineItem(**r) for r in csv.DictReader(f)]
        root = str(data_root) if data_root is not None else str(out_dir)
        return cls(summary["domain"], root, items, quarantine, summary.get("class_names", []))

    def counts(self) -> dict[str, int]:
        return {
            "items": len(self.items),
            "groups": len({i.group for i in self.items}),
            "quarantined": len(self.quarantine),
            "skipped": len(self.skipped),
        }


def _write_rows(path: Path, rows: list[QuarantineItem], root: str, salt: str | None = None) -> None:
    from insitu.privacy import shareable_path, shareable_text

    shown = [
        [shareable_path(r.path, root, token_salt=salt), shareable_text(r.reason, root, r.path, salt), shareable_text(r.message, root, r.path, salt)]
        for r in rows
    ]
    write_csv(path, ["path", "reason", "message"], shown)


class DomainOptions(BaseModel):
    """Base of each domain's own options (``data.options`` in a config); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class DemoData:
    """What `Domain.make_demo` wrote: the data config to pretrain on and the labelled probe sets."""

    data: dict[str, Any]
    probe_train: dict[str, Any] | None = None
    probe_test: dict[str, Any] | None = None
    in_chans: int = 3
    description: str = ""
    # config keys this demo sets over the quickstart's defaults (nested, e.g. the objective's views for CT);
    # `--set` overrides still win
    recipe: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def split_folders(
        cls,
        out_dir: Path,
        domain: str,
        size: int,
        in_chans: int,
        description: str,
        options: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> DemoData:
        """A demo written as ``out_dir/train`` and ``out_dir/test``: pretrain and probe on train, test on test."""
        train = {"domain": domain, "root": str(Path(out_dir) / "train"), "image_size": size, "options": options or {}}
        test = {**train, "root": str(Path(out_dir) / "test")}
        return cls(data=train, probe_train=train, probe_test=test, in_chans=in_chans, description=description, recipe=recipe or {})


@dataclass
class Predictor:
    """A fine-tuned model as `Domain.write_predictions` runs it; `insitu.pipelines.predict` builds it.

    ``predict``: a batch of C×h×w tiles (the domain's physical units) -> a K×h×w (segmentation) or K
    (classification) probability tensor per tile, on the CPU. ``segment``: one C×H×W image -> K×H×W
    scores, blended from overlapping windows (``--option tile_size``; the whole image by default).
    ``batch_size``: tiles or images per forward pass.
    """

    task: str
    num_classes: int
    class_names: list[str]
    image_size: int
    batch_size: int
    predict: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    segment: Callable[[torch.Tensor], torch.Tensor]

    def classify(self, images: list[torch.Tensor]) -> list[tuple[int, str, float]]:
        """(class index, class name, probability) per image, ``batch_size`` images per pass."""
        names = self.class_names
        out = []
        for i in range(0, len(images), self.batch_size):
            for probs in self.predict(images[i : i + self.batch_size]):
                k = int(probs.argmax())
                out.append((k, names[k] if k < len(names) else str(k), round(float(probs[k]), 4)))
        return out

    def require_segmentation(self, what: str) -> None:
        if self.task != "segmentation":
            raise ConfigError(f"{what} needs a segmentation model; this one was trained for {self.task}.")


class Domain(ABC):
    """One data domain: scan a root into a Manifest, load an item into a Sample, write a demo, write predictions."""

    name: ClassVar[str]
    Options: ClassVar[type[DomainOptions]] = DomainOptions

    def __init__(self, options: dict[str, Any] | DomainOptions | None = None) -> None:
        if isinstance(options, DomainOptions):
            self.options = options
        else:
            self.options = self.Options.model_validate(options or {})

    @classmethod
    def yields(cls, options: DomainOptions) -> tuple[str, int]:
        """What one item is, for an objective's ``Needs``: (``images``, 1), (``pairs``, 1) or (``clips``, frames)."""
        return "images", 1

    @abstractmethod
    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        """Find every usable item under ``root``; quarantine the rest with reasons."""

    @abstractmethod
    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        """Decode one item into a Sample (``image`` float32 C×H×W in the domain's physical scale)."""

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Write a small seeded dataset of this domain in its real file format."""
        raise NotImplementedError(f"domain {cls.name!r} has no embedded demo yet")

    def with_options(self, **changes: Any) -> Domain:
        """A new domain of this kind: the options this one was given, with ``changes`` over them."""
        return type(self)({**self.options.model_dump(exclude_unset=True), **changes})

    def write_predictions(self, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
        """Run ``model`` over the file or folder ``inputs`` and write its predictions into ``out_dir`` in this
        domain's own format (the folder `insitu predict` claimed); returns the files written."""
        raise ConfigError(
            f"The {self.name!r} domain has no prediction output format. Predict with --domain naming a domain that "
            "has one (images: PNG masks and overlays or predictions.csv; video: overlay MP4 + per-frame CSV; "
            "dicom: DICOM-SEG; geotiff: georeferenced class maps)."
        )


def stable_id(*parts: str, salt: str = "") -> str:
    """A short stable non-identifying id: sha256 over the parts (and an optional salt)."""
    h = hashlib.sha256(salt.encode())
    for part in parts:
        h.update(b"\x00" + part.encode())
    return h.hexdigest()[:16]


def split_by_group(items: list[ManifestItem], fractions: dict[str, float], seed: int = 0) -> dict[str, list[ManifestItem]]:
    """Assign whole groups to splits so that no group (patient, scene, case) crosses splits.

    Groups are ordered by a seeded hash and filled greedily up to each split's item share, so the
    result is deterministic for a seed and independent of the order of ``items``.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    groups: dict[str, list[ManifestItem]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    order = sorted(groups, key=lambda g: stable_id(g, salt=str(seed)))
    names = list(fractions)
    targets = {n: fractions[n] * len(items) for n in names}
    out: dict[str, list[ManifestItem]] = {n: [] for n in names}
    for g in order:
        # the split furthest below its target takes the next group
        name = max(names, key=lambda n: targets[n] - len(out[n]))
        out[name].extend(groups[g])
    return out
