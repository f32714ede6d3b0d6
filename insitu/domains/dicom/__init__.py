"""Medical images: DICOM folder trees (PACS exports, with or without DICOMDIR) and NIfTI volumes.

A scan reads every file once in a worker pool, fully decoding its pixels (a header read passes
truncated files), and caches one small JSON record per file keyed by path, size and mtime, so a
second scan of the same tree only opens new or changed files. Records are grouped into series by
SeriesInstanceUID; slices are ordered by their position along the slice normal. Items are 2-D
slices (in the acquisition plane or resliced axial/coronal/sagittal, optionally with neighbouring
slices as channels) or 3-D crops.

Privacy: item ids and groups are salted hashes (groups hash PatientID, else StudyInstanceUID), and
by default the ``path`` column of manifest.csv / quarantine.csv holds an opaque salted token, because PACS
export folders are often named after patients. The token -> real path map lives only in the private
cache folder (``cache_dir``), which is as sensitive as the source data and never leaves the machine.

Modules: ``records`` (one file -> a non-identifying record), ``series`` (records -> units),
``geometry`` (volumes, reslicing), ``pixels`` (decoding, intensity), ``cache`` (files, private
cache), ``nifti`` (NIfTI volumes, label maps, 3-D crops), ``seg`` (DICOM-SEG in and out), ``demo`` (CT
phantoms), ``domain`` (the `DicomDomain`).
"""

from __future__ import annotations

from insitu.domains.dicom.demo import write_ct_series
from insitu.domains.dicom.domain import DicomDomain
from insitu.domains.dicom.geometry import Volume
from insitu.domains.dicom.options import DicomError

__all__ = ["DicomDomain", "DicomError", "Volume", "write_ct_series"]
