"""Image-text pairs: radiology images with reports, satellite tiles with captions.

Sources (``data.root``):

- a ``.csv``/``.jsonl`` manifest with an image column (a PNG/JPEG/TIFF path, a DICOM file or a
  DICOM series folder, relative to the manifest's folder) and a text column, optional label/group;
- a folder of images with sidecar ``.txt`` files (``x.png`` + ``x.txt``), optionally one subfolder
  per class;
- an image folder or a MedMNIST ``.npz`` plus ``label_text``: text written from each item's label
  (synthetic report-style text, for mechanics and first measurements only).

Text handling is section-aware: a report is split into sections by ``section_pattern`` (upper-case
headers such as ``FINDINGS:``), only the configured ``sections`` are kept (empty ones skipped), and
on each load one random sentence of them becomes the sample's ``text`` (``sampling: random``, as in
ConVIRT). Text without any header is a caption and is used whole. Report text never enters the
manifest (it may be identifying): the manifest stores where the text is, and it is read at load time.

A table can be narrowed and relabelled at scan time (clinical collections such as the COVID-19
image data collection need all three): ``keep`` keeps rows whose column value is listed (e.g.
``modality: [X-ray]``); ``label_map`` maps raw label values onto class names (``null``: the row
stays, unlabelled: pretraining uses it, label evaluation does not), and ``labelled_only`` drops the
unlabelled rows; ``holdout`` splits the groups (patients) once, stratified by label, into a
``train`` and a ``test`` side, so that a pretraining config and its evaluation config see disjoint
patients without a second manifest file.
"""

from __future__ import annotations

import csv
import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from insitu.domains.base import (
    DemoData,
    Domain,
    DomainOptions,
    Manifest,
    ManifestItem,
    QuarantineItem,
    Sample,
    stable_id,
)
from insitu.domains.images import IMAGE_SUFFIXES, ImageFolderDomain
from insitu.errors import DataError, EmptyDatasetError
from insitu.registry import DOMAINS

HEADER_PATTERN = r"(?m)(?:^|(?<=[.!?;]) )[ \t]*([A-Z][A-Z /&()-]{2,40}):"
DICOM_SUFFIXES = (".dcm", ".dicom")


class PairsError(DataError):
    """A pairs manifest or its text cannot be used; the message names the file, row and fix."""


class GroupHoldout(BaseModel):
    """A fixed split of a table's groups: ``side`` is the part this scan keeps."""

    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(0.3, gt=0, lt=1, description="share of the groups (per label stratum) on the test side")
    seed: int = 0
    side: Literal["train", "test"] = "train"


class PairsOptions(DomainOptions):
    channels: Literal[1, 3] = 3
    image_column: str = "image"
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = "group"
    sections: list[str] = Field(default_factory=lambda: ["findings", "impression"])
    section_pattern: str = HEADER_PATTERN
    sampling: Literal["random", "first", "full"] = "random"
    min_sentence_chars: int = Field(3, ge=1)
    label_text: dict[int, list[str]] | None = None
    class_names: list[str] | None = None
    split: str = "train"
    dicom: dict[str, Any] = Field(default_factory=dict)
    keep: dict[str, list[str]] = Field(default_factory=dict, description="column -> values: rows with another value are skipped")
    label_map: dict[str, str | None] | None = Field(None, description="raw label value -> class name (null: unlabelled)")
    labelled_only: bool = False
    holdout: GroupHoldout | None = None

    @field_validator("section_pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:  # a user's pattern: a config error naming the key, never a traceback
            raise ValueError(f"section_pattern is not a valid regular expression ({exc})") from None
        if compiled.groups < 1:
            raise ValueError("section_pattern needs one capture group: the section name")
        return value

    @field_validator("label_text")
    @classmethod
    def _non_empty(cls, value: dict[int, list[str]] | None) -> dict[int, list[str]] | None:
        for label, texts in (value or {}).items():
            if not texts:
                raise ValueError(f"label_text[{label}] is empty; give at least one text per label")
        return value


def split_sections(text: str, pattern: str = HEADER_PATTERN) -> dict[str, str] | None:
    """Section name (lower case) -> body; ``None`` when the text has no header at all (a caption)."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    out: dict[str, str] = {}
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip()
        name = m.group(1).strip().lower()
        out[name] = f"{out.get(name, '')} {body}".strip()
    return out


def split_sentences(text: str, min_chars: int = 3) -> list[str]:
    """Sentences of a section: split after . ! ? and at line breaks; fragments without letters dropped."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if len(p.strip()) >= min_chars and re.search(r"[A-Za-z]", p)]


def report_sentences(text: str, sections: list[str], pattern: str = HEADER_PATTERN, min_chars: int = 3) -> list[str]:
    """The sentences of the chosen sections (in the given order, empty ones skipped), or of a caption."""
    parts = split_sections(text, pattern)
    if parts is None:
        bodies = [text]
    else:
        bodies = [parts[s.lower()] for s in sections if parts.get(s.lower())]
    return [s for body in bodies for s in split_sentences(body, min_chars)]


@DOMAINS.register("pairs")
class PairsDomain(Domain):
    """Images paired with report text or captions (see the module docstring for the sources).

    Options: ``channels``; manifest columns ``image_column``, ``text_column``, ``label_column``,
    ``group_column``; ``sections`` and ``section_pattern`` (which report sections to sample from);
    ``sampling`` (random sentence | first sentence | full text); ``min_sentence_chars``;
    ``label_text`` (label -> texts, for synthetic pairs); ``class_names``; ``split`` (.npz arrays);
    ``dicom`` (options of the DICOM domain for DICOM references).
    """

    name = "pairs"
    Options = PairsOptions

    @classmethod
    def yields(cls, options: DomainOptions) -> tuple[str, int]:
        return "pairs", 1

    def __init__(self, options: dict[str, Any] | DomainOptions | None = None) -> None:
        super().__init__(options)
        self.options: PairsOptions
        self.images = ImageFolderDomain({"channels": self.options.channels, "split": self.options.split})
        self._dicom: dict[str, tuple[Any, Manifest]] = {}

    # -- scanning ------------------------------------------------------------------------------

    def scan(self, root: Path, max_items: int | None = None) -> Manifest:
        root = Path(root)
        if root.is_file() and root.suffix.lower() in (".csv", ".jsonl"):
            manifest = self._scan_table(root)
        elif root.is_dir() or (root.is_file() and root.suffix == ".npz"):
            manifest = self._scan_images(root, max_items)
        else:
            raise PairsError(f"{root} is not a .csv/.jsonl pairs manifest, an image folder or an .npz. Point data.root at one.")
        if max_items and len(manifest.items) > max_items:
            idx = np.linspace(0, len(manifest.items) - 1, max_items).round().astype(int)
            manifest.items = [manifest.items[i] for i in idx]
        if not manifest.items:
            raise EmptyDatasetError(f"No usable image-text pair under {root} ({len(manifest.quarantine)} quarantined; see quarantine.csv).")
        return manifest

    def _scan_table(self, path: Path) -> Manifest:
        rows = read_table(path)
        o = self.options
        if rows and o.image_column not in rows[0]:
            raise PairsError(f"{path} has no column {o.image_column!r} (columns: {list(rows[0])}); set data.options.image_column.")
        if rows and o.text_column not in rows[0] and not o.label_text:
            raise PairsError(f"{path} has no column {o.text_column!r} (columns: {list(rows[0])}); set data.options.text_column.")
        self._check_keep_columns(path, rows)
        names = self._label_names(rows)
        items, quarantine = [], []
        for i, row in enumerate(rows):
            if any(str(row.get(col) or "").strip() not in values for col, values in o.keep.items()):
                continue
            value = self._class_of(row)
            ref = str(row.get(o.image_column) or "").strip()
            image = (path.parent / ref) if ref else path
            where = f"{path.name} row {i + 1}"
            problem = self._image_problem(image) if ref else ("no image", f"empty {o.image_column!r} column")
            label = names.index(value) if value in names else None
            text_problem = self._text_problem(str(row.get(o.text_column) or ""), label)
            if value and label is None:
                text_problem = ("unknown label", f"label {value!r} is not in data.options.class_names {names}")
            raw = str(row.get(o.label_column) or "").strip()
            if o.label_map is not None and raw and raw not in o.label_map:
                text_problem = ("unmapped label", f"label {raw!r} has no entry in data.options.label_map; map it to a class or to null")
            if problem or text_problem:
                reason, message = problem or text_problem
                quarantine.append(QuarantineItem(f"{image} ({where})", reason, message))
                continue
            item_id = stable_id(path.name, str(i), ref)
            group = stable_id(str(row[o.group_column])) if str(row.get(o.group_column) or "").strip() else item_id
            extra = {"table": str(path), "row": i, "dicom": _is_dicom(image)}
            items.append(ManifestItem(item_id, str(image), group, label, None, extra))
        if o.holdout is not None:
            test_groups = holdout_groups(items, o.holdout.fraction, o.holdout.seed)
            items = [i for i in items if (i.group in test_groups) == (o.holdout.side == "test")]
        if o.labelled_only:  # after the holdout, so that the split is the same with and without it
            items = [i for i in items if i.label is not None]
        return Manifest(self.name, str(path), items, quarantine, names)

    def _class_of(self, row: dict[str, Any]) -> str:
        """The row's class name: its label value, through ``label_map`` when given ('' = unlabelled)."""
        raw = str(row.get(self.options.label_column) or "").strip()
        if self.options.label_map is None or raw not in self.options.label_map:
            return raw
        return str(self.options.label_map[raw] or "")

    def _check_keep_columns(self, path: Path, rows: tuple[dict[str, Any], ...]) -> None:
        missing = [col for col in self.options.keep if rows and col not in rows[0]]
        if missing:
            raise PairsError(f"{path} has no column(s) {missing} named in data.options.keep (columns: {list(rows[0])}); fix the keys.")

    def _scan_images(self, root: Path, max_items: int | None) -> Manifest:
        if root.suffix == ".npz" and not self.options.label_text:
            raise PairsError(f"{root} holds images and labels but no text; set data.options.label_text (label -> texts).")
        base = self.images.scan(root, max_items)
        names = self.options.class_names or base.class_names
        items, quarantine = [], list(base.quarantine)
        for item in base.items:
            sidecar = Path(item.path).with_suffix(".txt") if "npz_key" not in item.extra else None
            has_sidecar = sidecar is not None and sidecar.is_file()
            if not has_sidecar and not self.options.label_text:
                quarantine.append(
                    QuarantineItem(item.path, "no text", f"no sidecar {Path(item.path).stem}.txt and no data.options.label_text")
                )
                continue
            text = sidecar.read_text(errors="replace") if has_sidecar else ""
            problem = self._text_problem(text, item.label)
            if problem:
                quarantine.append(QuarantineItem(item.path, *problem))
                continue
            item.extra = {**item.extra, **({"sidecar": str(sidecar)} if has_sidecar else {})}
            items.append(item)
        return Manifest(self.name, str(root), items, quarantine, list(names))

    def _label_names(self, rows: list[dict[str, Any]]) -> list[str]:
        """Class names: the option, else the sorted distinct label values (integers sort numerically)."""
        if self.options.class_names:
            return list(self.options.class_names)
        if self.options.label_map is not None:
            return sorted({v for v in self.options.label_map.values() if v})
        values = {str(r.get(self.options.label_column, "")).strip() for r in rows} - {""}
        return sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))

    def _image_problem(self, path: Path) -> tuple[str, str] | None:
        if not path.exists():
            return "missing image", f"{path} does not exist"
        if _is_dicom(path):
            try:
                self._dicom_manifest(str(path))
            except Exception as exc:  # noqa: BLE001 - any DICOM failure is a quarantine reason
                return "cannot read DICOM", f"{type(exc).__name__}: {exc}"
            return None
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - every decoder failure is a quarantine reason
            return "cannot decode image", f"{type(exc).__name__}: {exc}"
        return None

    def _text_problem(self, text: str, label: int | None) -> tuple[str, str] | None:
        if self.options.label_text and not text.strip():
            if label is None or label not in self.options.label_text:
                return "no text", f"no text and label {label} has no entry in data.options.label_text"
            return None
        if not text.strip():
            return "empty text", "the text is empty"
        if not self.sentences(text):
            wanted = ", ".join(self.options.sections)
            return (
                "no usable text",
                f"no sentence in sections [{wanted}] (found: {sorted(split_sections(text, self.options.section_pattern) or {})})",
            )
        return None

    # -- loading -------------------------------------------------------------------------------

    def load(self, item: ManifestItem, manifest: Manifest) -> Sample:
        if item.extra.get("dicom"):
            inner, sub = self._dicom_manifest(item.path)
            image = inner.load(sub.items[len(sub.items) // 2], sub)["image"]  # the series' middle slice
            image = _channels(image, self.options.channels)
        else:
            image = self.images.load(item, manifest)["image"]
        sample: Sample = {
            "image": image,
            "text": self.sample_text(self.report(item)),
            "meta": {"domain": self.name, "item_id": item.item_id, "group": item.group},
        }
        if item.label is not None:
            sample["label"] = item.label
        return sample

    def report(self, item: ManifestItem) -> str:
        """The full text paired with an item (read at load time, never stored in the manifest)."""
        if "table" in item.extra:
            text = str(read_table(Path(item.extra["table"]))[item.extra["row"]].get(self.options.text_column) or "")
            if text.strip():
                return text
        if "sidecar" in item.extra:
            return Path(item.extra["sidecar"]).read_text(errors="replace")
        if self.options.label_text and item.label in self.options.label_text:
            texts = self.options.label_text[item.label]
            return texts[int(item.item_id, 16) % len(texts)]  # a fixed report per item, from its label
        raise PairsError(f"item {item.item_id} ({item.path}) has no text; it was not scanned by this configuration.")

    def sentences(self, text: str) -> list[str]:
        o = self.options
        return report_sentences(text, o.sections, o.section_pattern, o.min_sentence_chars)

    def sample_text(self, text: str) -> str:
        """One random sentence of the chosen sections (or the first, or all of them joined)."""
        sentences = self.sentences(text)
        if not sentences:
            raise PairsError("the report has no sentence in the configured sections; rescan with the current options.")
        if self.options.sampling == "full":
            return " ".join(sentences)
        return sentences[0] if self.options.sampling == "first" else sentences[int(torch.randint(len(sentences), ()))]

    def _dicom_manifest(self, path: str) -> tuple[Any, Manifest]:
        """A DICOM reference scanned by the DICOM domain once per process."""
        if path not in self._dicom:
            from insitu.domains.dicom import DicomDomain

            inner = DicomDomain(self.options.dicom)
            self._dicom[path] = (inner, inner.scan(Path(path)))
        return self._dicom[path]

    # -- demo ----------------------------------------------------------------------------------

    @classmethod
    def make_demo(cls, out_dir: Path, seed: int = 0, n_per_class: int = 40, size: int = 64) -> DemoData:
        """Textured shapes as PNG class folders, each with a sidecar report written from its class."""
        from insitu.domains.synthetic import SHAPES, write_shape_folders

        write_shape_folders(out_dir, seed, n_per_class, size, sidecar=_demo_report)
        return DemoData.split_folders(
            out_dir,
            "pairs",
            size,
            in_chans=3,
            description=f"{len(SHAPES)} classes of textured shapes, {size}px PNG, each with a synthetic sidecar report",
        )


def holdout_groups(items: list[ManifestItem], fraction: float, seed: int) -> set[str]:
    """The groups on the test side: per stratum (a group's most frequent label; all-unlabelled is a stratum), round(fraction · n)
    groups, at least one when the stratum has two or more, chosen by a seeded hash (independent of row order)."""
    labels: dict[str, dict[int, int]] = {}
    for item in items:
        counts = labels.setdefault(item.group, {})
        key = -1 if item.label is None else int(item.label)
        counts[key] = counts.get(key, 0) + 1
    strata: dict[int, list[str]] = {}
    for group, counts in labels.items():
        labelled = {k: n for k, n in counts.items() if k >= 0} or counts
        strata.setdefault(max(sorted(labelled), key=lambda k: labelled[k]), []).append(group)
    test: set[str] = set()
    for groups in strata.values():
        ordered = sorted(groups, key=lambda g: stable_id(g, salt=f"holdout{seed}"))
        n = round(fraction * len(ordered))
        test.update(ordered[: max(n, 1) if len(ordered) >= 2 else n])
    return test


def _demo_report(shape: str, rng: np.random.Generator) -> str:
    place = rng.choice(["upper left", "upper right", "lower left", "lower right", "centre"])
    return (
        f"FINDINGS: A single textured {shape} is seen. It lies near the {place}. The background is textured.\n"
        f"IMPRESSION: {shape.capitalize()}."
    )


@cache
def _read_table_cached(path: str, mtime_ns: int) -> tuple[dict[str, Any], ...]:
    p = Path(path)
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8-sig") as f:
            return tuple(csv.DictReader(f))
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PairsError(f"{p} line {n} is not valid JSON ({exc}); fix that line (one JSON object per line).") from exc
        if not isinstance(row, dict):
            raise PairsError(f'{p} line {n} is not a JSON object; write one {{"image": ..., "text": ...}} per line.')
        rows.append(row)
    return tuple(rows)


def read_table(path: Path) -> tuple[dict[str, Any], ...]:
    """Rows of a .csv or .jsonl pairs manifest, read once per process (and again if the file changes)."""
    return _read_table_cached(str(path), path.stat().st_mtime_ns)


def _is_dicom(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in DICOM_SUFFIXES or (path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES)


def _channels(image: Any, channels: int) -> Any:
    """A DICOM slice (1 or 3 channels) to the configured channel count."""
    if image.shape[0] == channels:
        return image
    return image[:1].expand(channels, -1, -1).clone() if channels == 3 else image.mean(0, keepdim=True)
