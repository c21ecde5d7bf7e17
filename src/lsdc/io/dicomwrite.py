"""Writing single-frame MR DICOM slices with full geometry tags (phantom data and test fixtures)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from lsdc.fileio import atomic_write_bytes

# A fixed root so that generated UIDs are deterministic when derived from ids (byte-identical
# phantoms per seed); generate_uid with entropy sources hashes them.
_UID_ROOT = "1.2.826.0.1.3680043.10.1519."


def deterministic_uid(*parts: object) -> UID:
    """A valid UID derived from `parts` (same parts -> same UID)."""
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=[str(p) for p in parts])


# Elements `extra` may not set: they must agree with the file meta or the pixel data written here.
_RESERVED = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "SamplesPerPixel",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    }
)


def _ds_number(value: float) -> str:
    # DS values are limited to 16 characters.
    text = f"{float(value):.6g}"
    return text if len(text) <= 16 else f"{float(value):.8e}"[:16]


def write_slice(
    path: str | Path,
    pixels: np.ndarray,
    *,
    study_id: int,
    series_id: int,
    instance_number: int,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    spacing_between_slices: float | None = None,
    series_description: str | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one MR slice. `pixels` (rows, cols) integer array stored as-is (uint16 or int16).

    `position` is ImagePositionPatient (LPS mm of the centre of the first transmitted pixel),
    `orientation` ImageOrientationPatient (row cosines then column cosines), `pixel_spacing`
    (row spacing, column spacing) in DICOM order. `transfer_syntax` other than explicit little
    endian compresses with pydicom's encoders (e.g. RLE Lossless). `extra` adds or replaces
    header elements, DICOM keyword -> value (e.g. {"EchoTime": 12.0, "ImageType": [...]});
    the UIDs of the instance and the pixel module's elements cannot be set that way. Written
    atomically.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint16, np.int16):
        raise ValueError(f"pixels must be uint16 or int16, got {pixels.dtype}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported photometric interpretation {photometric!r}")
    extra = dict(extra or {})
    for keyword in extra:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"extra: {keyword!r} is not a DICOM keyword")
        if keyword in _RESERVED:
            raise ValueError(f"extra: {keyword} is set by write_slice itself")

    study_uid = study_uid or deterministic_uid("study", study_id)
    series_uid = series_uid or deterministic_uid("series", study_id, series_id)
    sop_uid = deterministic_uid("sop", study_id, series_id, instance_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid or deterministic_uid("for", study_id)
    ds.Modality = "MR"
    ds.PatientID = str(study_id)
    ds.StudyID = str(study_id)
    ds.SeriesNumber = int(series_id) % 2_147_483_647
    ds.InstanceNumber = int(instance_number)
    if series_description is not None:
        ds.SeriesDescription = series_description
    ds.ImagePositionPatient = [_ds_number(v) for v in position]
    ds.ImageOrientationPatient = [_ds_number(v) for v in orientation]
    ds.PixelSpacing = [_ds_number(v) for v in pixel_spacing]
    ds.SliceThickness = _ds_number(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = _ds_number(spacing_between_slices)
    if rescale_slope != 1.0 or rescale_intercept != 0.0:
        ds.RescaleSlope = _ds_number(rescale_slope)
        ds.RescaleIntercept = _ds_number(rescale_intercept)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)

    if transfer_syntax is not None and UID(transfer_syntax) != ExplicitVRLittleEndian:
        ds.compress(UID(transfer_syntax), pixels)

    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())
