"""DICOM-SEG in and out (highdicom): masks aligned to the slices of their source series."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from insitu.io import atomic_path


def read_seg(seg_path: str, source_files: Sequence[str], describe: Callable[[str], str] = str) -> np.ndarray:
    """The segmentation as a label map S×H×W (int64, 0 = background) in the order of ``source_files``.

    A SEG that references none of the files, or whose frames have another size, is a `DicomError`
    naming both files.
    """
    import highdicom as hd
    import pydicom

    from insitu.domains.dicom import DicomError

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
        from insitu.domains.dicom import DicomError

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
