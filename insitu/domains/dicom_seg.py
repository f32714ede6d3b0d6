"""The documented import path of `insitu.domains.dicom.seg` (README): DICOM-SEG in and out."""

from insitu.domains.dicom.seg import read_seg, write_seg

__all__ = ["read_seg", "write_seg"]
