"""DICOM-SEG in and out (highdicom): masks aligned to the slices of their source series, and a model's predictions written so."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch.nn.functional as F

from insitu.domains.base import Predictor
from insitu.domains.dicom.options import DicomError
from insitu.io import atomic_path

if TYPE_CHECKING:  # the domain calls this module (DicomDomain.write_predictions)
    from insitu.domains.dicom.domain import DicomDomain

log = logging.getLogger("insitu")


def read_seg(seg_path: str, source_files: Sequence[str], describe: Callable[[str], str] = str) -> np.ndarray:
    """The segmentation as a label map S×H×W (int64, 0 = background) in the order of ``source_files``.

    A SEG that references none of the files, or whose frames have another size, is a `DicomError`
    naming both files.
    """
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(seg_path)
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    uids = [str(h.SOPInstanceUID) for h in heads]
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    where = f"segmentation {describe(seg_path)} and series of {describe(source_files[0])}"
    if not referenced & set(uids):
        raise DicomError(f"{where}: the SEG references none of the series' instances. Point the SEG at the right series.")
    if (int(seg.Rows), int(seg.Columns)) != (int(heads[0].Rows), int(heads[0].Columns)):
        raise DicomError(f"{where}: frame size {seg.Rows}x{seg.Columns} != image size {heads[0].Rows}x{heads[0].Columns}.")
    labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    return np.asarray(labels, dtype=np.int64)


def write_seg(
    mask: np.ndarray,
    source_files: Sequence[str],
    out_path: Path,
    segment_names: Sequence[str] | None = None,
    algorithm: str = "insitu",
) -> Path:
    """Write a label map S×H×W (values 1..K are segments) as a DICOM-SEG referencing its source series."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in source_files]
    mask = np.asarray(mask)
    if mask.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise DicomError(
            f"mask shape {mask.shape} does not match the series of {len(sources)} slices of {sources[0].Rows}x{sources[0].Columns}."
        )
    n_segments = max(1, int(mask.max()))
    names = list(segment_names or [f"segment {i}" for i in range(1, n_segments + 1)])
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version="1", family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=names[i - 1],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.cid7166.ConnectiveTissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for i in range(1, n_segments + 1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8 if n_segments < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="insitu",
        manufacturer_model_name="insitu",
        software_versions="insitu",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    return out_path


def write_series_predictions(domain: DicomDomain, model: Predictor, inputs: Path, out_dir: Path) -> list[Path]:
    """Each CT/MR series under ``inputs``, slice by slice in its acquisition plane, to ``series_<n>_seg.dcm``.

    The masks are scaled to the source slices' size and referenced to the source instances; a series
    whose files do not map one-to-one to its slices (multi-frame sources) is skipped with a warning.
    """
    model.require_segmentation("DICOM-SEG export")
    domain = domain.with_options(plane="acquisition", sample="slice")
    manifest = domain.scan(inputs)
    by_unit: dict[str, list] = {}
    for item in manifest.items:
        by_unit.setdefault(item.extra["unit"], []).append(item)
    names = model.class_names[1:] or None
    written = []
    for n, (key, items) in enumerate(by_unit.items()):
        unit = domain.units[key]
        rows, cols = domain.volume(unit).array.shape[-2:]
        masks = []
        for item in sorted(items, key=lambda i: i.extra["index"]):
            scores = model.segment(domain.load(item, manifest)["image"])
            scores = F.interpolate(scores[None], size=(rows, cols), mode="bilinear", align_corners=False)[0]
            masks.append(scores.argmax(0).numpy())
        if len(masks) != len(unit.files):
            log.warning("series %d: %d slices for %d files (multi-frame source); skipped DICOM-SEG", n, len(masks), len(unit.files))
            continue
        written.append(write_seg(np.stack(masks), unit.files, out_dir / f"series_{n:03d}_seg.dcm", segment_names=names))
    return written
