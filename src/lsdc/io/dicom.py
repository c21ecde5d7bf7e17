"""DICOM series reading: files of one series folder -> a position-ordered `Series`.

`read_series` reads every file once (header and pixels in one `dcmread`), decodes compressed
transfer syntaxes through pydicom's pixel plugins (pylibjpeg, openjpeg, libjpeg, rle, gdcm),
applies RescaleSlope/Intercept, inverts MONOCHROME1, sorts slices by ImagePositionPatient
projected on the slice normal, and resamples slices whose matrix or pixel spacing differs from
the series majority onto the majority grid. Bad files are reported, not fatal, while the rest of
the series is coherent. `read_header` is the header-only counterpart used by the dataset index.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder

from lsdc import geometry

# Flags a Series (and the dataset index) may carry.
FLAG_RESAMPLED = "resampled"  # some slices had another matrix/pixel spacing; resampled
FLAG_SKIPPED_FILES = "skipped_files"  # unreadable files were left out (see skipped_files)
FLAG_MIXED_ORIENTATION = "mixed_orientation"  # slices lie on differently oriented planes
FLAG_DUPLICATE_POSITIONS = "duplicate_positions"  # two or more slices share a position
FLAG_UNEVEN_SPACING = "uneven_spacing"  # gaps between slices differ (missing slice, stacks)
# Header-level fact (index): slices differ in matrix/pixel spacing; read_series then resamples.
FLAG_MIXED_SIZES = "mixed_sizes"
FLAG_MIXED_SERIES_UID = "mixed_series_uid"  # files of several SeriesInstanceUIDs in one folder
# Two or more files carry one InstanceNumber: a label on that number cannot be placed.
FLAG_DUPLICATE_INSTANCES = "duplicate_instance_numbers"


class AmbiguousInstanceError(KeyError):
    """An instance number carried by several slices of a series (a label on it is ambiguous)."""


# Two planes count as one orientation when their normals differ by less than this.
_ORIENTATION_TOL_DEG = 0.5
# Relative deviation of a slice gap from the median gap that counts as uneven.
_SPACING_TOL = 0.1


class SeriesReadError(Exception):
    """A series folder that cannot be turned into a usable `Series`; names the folder."""

    def __init__(self, folder: Path | str, reason: str):
        self.folder = Path(folder)
        self.reason = reason
        super().__init__(f"{self.folder}: {reason}")


class SliceReadError(Exception):
    """One file of a series could not be used; names the file."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Series:
    """One DICOM series; slices sorted by position along the slice normal, never by instance number.

    `volume` is float32 (slices, rows, cols) with RescaleSlope/Intercept applied and MONOCHROME1
    inverted. Slices ascend along the normal (row x column cosines) of `orientation`, the
    orientation most slices share; equal positions keep instance-number order. Per-slice arrays
    are in the same (sorted) order as `volume`. Geometry (`positions`,
    `orientations`, `pixel_spacing`) describes the grid of `volume`; where a slice was resampled
    (flag "resampled") its original grid is kept in the `native_*` arrays so that coordinates
    given in the native image (the RSNA coordinate table) can be mapped with `native_to_volume`.
    """

    study_id: int
    series_id: int
    volume: np.ndarray  # (S, H, W) float32
    instance_numbers: np.ndarray  # (S,) int64, instance number of each sorted slice
    positions: np.ndarray  # (S, 3) float64, ImagePositionPatient (LPS mm) of each sorted slice
    orientation: np.ndarray  # (6,) float64, ImageOrientationPatient: row then column cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm, DICOM order
    slice_thickness: float
    spacing_between_slices: float  # measured from positions (median), mm
    orientation_label: str  # "sagittal" | "axial" | "coronal", from the slice normal
    series_type: str | None = None  # one of constants.SERIES_TYPES, or None when unknown
    description: str | None = None  # DICOM SeriesDescription tag, when present
    flags: list[str] = field(default_factory=list)  # e.g. "resampled", "skipped_files"
    skipped_files: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)
    # (S, 6) per-slice ImageOrientationPatient; differs from `orientation` only in multi-stack
    # series (flag "mixed_orientation"). None means every slice has `orientation`.
    orientations: np.ndarray | None = None
    # Native grid of each sorted slice as stored in its file (equal to the volume grid unless the
    # slice was resampled): (S, 2) rows, cols; (S, 2) row/col spacing; (S, 3) position.
    native_shapes: np.ndarray | None = None
    native_pixel_spacings: np.ndarray | None = None
    native_positions: np.ndarray | None = None
    files: list[Path] = field(default_factory=list)  # source file of each sorted slice

    @property
    def num_slices(self) -> int:
        return int(self.volume.shape[0])

    def slice_index(self, instance_number: int) -> int:
        """Sorted index of the slice with this instance number; KeyError if absent."""
        hits = np.flatnonzero(self.instance_numbers == int(instance_number))
        if hits.size == 0:
            raise KeyError(
                f"instance {instance_number} not in series {self.study_id}/{self.series_id}"
            )
        if hits.size > 1:
            # Never the first match: a label on a duplicated number could sit on either slice.
            raise AmbiguousInstanceError(
                f"instance {instance_number} is carried by {hits.size} slices of series "
                f"{self.study_id}/{self.series_id}"
            )
        return int(hits[0])

    def slice_orientation(self, index: int) -> np.ndarray:
        """ImageOrientationPatient (6,) of sorted slice `index`."""
        if self.orientations is None:
            return self.orientation
        return self.orientations[index]

    def native_to_volume(self, index: int, col: float, row: float) -> tuple[float, float]:
        """Map pixel (col, row) of slice `index` in its native file image to the volume grid.

        Identity for slices that were not resampled.
        """
        if self.native_shapes is None or self.native_positions is None:
            return float(col), float(row)
        assert self.native_pixel_spacings is not None
        o = self.slice_orientation(index)
        p = geometry.pixel_to_patient(
            col, row, self.native_positions[index], o, self.native_pixel_spacings[index]
        )
        cr, _ = geometry.patient_to_pixel(p, self.positions[index], o, self.pixel_spacing)
        return float(cr[0]), float(cr[1])


@dataclass
class SliceHeader:
    """The header facts of one single-frame image file that reading and indexing need."""

    path: Path
    instance_number: int
    position: np.ndarray  # (3,)
    orientation: np.ndarray  # (6,)
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    slice_thickness: float
    spacing_between_slices: float
    rescale_slope: float
    rescale_intercept: float
    photometric: str
    description: str | None
    series_uid: str | None
    transfer_syntax: str


# Tags read straight from the raw (unconverted) elements: pydicom's keyword lookup and value
# conversion cost more than decoding the pixels of a 256x256 slice, so headers are parsed here.
_T_FRAMES = 0x00280008
_T_SAMPLES = 0x00280002
_T_PHOTOMETRIC = 0x00280004
_T_ROWS = 0x00280010
_T_COLS = 0x00280011
_T_SPACING = 0x00280030
_T_BITS_ALLOCATED = 0x00280100
_T_PIXEL_REPRESENTATION = 0x00280103
_T_POSITION = 0x00200032
_T_ORIENTATION = 0x00200037
_T_INSTANCE = 0x00200013
_T_THICKNESS = 0x00180050
_T_SPACING_BETWEEN = 0x00180088
_T_SLOPE = 0x00281053
_T_INTERCEPT = 0x00281052
_T_SERIES_UID = 0x0020000E
_T_DESCRIPTION = 0x0008103E
_T_PIXEL_DATA = 0x7FE00010
_T_TRANSFER_SYNTAX = 0x00020010

# Uncompressed little-endian syntaxes whose pixels are a plain array (decoded without pydicom's
# generic decoder pipeline; identical result since pydicom leaves unused high bits as stored).
_NATIVE_LE = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR Little Endian
)


def raw_text(ds: pydicom.Dataset, tag: int) -> str | None:
    """The value of a string element as text (multi-values joined by backslash), or None."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        text = value.decode("latin-1")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple) or hasattr(value, "__iter__"):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    return text or None


def raw_ushort(ds: pydicom.Dataset, tag: int, little_endian: bool) -> int | None:
    """An US element (Rows, Columns, ...) without pydicom's conversion."""
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if isinstance(value, bytes | bytearray):
        if len(value) < 2:
            return None
        return int.from_bytes(value[:2], "little" if little_endian else "big")
    return int(value)


def _numbers(path: Path, name: str, text: str | None, n: int) -> np.ndarray:
    if text is None:
        raise SliceReadError(path, f"missing {name}")
    try:
        arr = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError as exc:
        raise SliceReadError(path, f"non-numeric {name} {text!r}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SliceReadError(path, f"{name} must hold {n} finite numbers, got {text!r}")
    return arr


def _number(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        return float(text.split("\\")[0])
    except ValueError:
        return default


def raw_free_text(ds: pydicom.Dataset, tag: int) -> str | None:
    """A free-text element (e.g. SeriesDescription). Plain ASCII is decoded directly (identical
    in every DICOM character set); anything else goes through pydicom's charset handling."""
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return None
    raw = elem.value
    if isinstance(raw, bytes | bytearray) and raw.isascii() and b"\x1b" not in raw:
        text = raw.decode("ascii")
    else:
        text = str(ds[tag].value)
    text = text.strip(" \x00")
    return text or None


def _orientation_problem(o: np.ndarray) -> str | None:
    """Why ImageOrientationPatient cannot define a plane, or None (plain floats: this runs per
    file, where numpy's small-array overhead shows)."""
    a1, a2, a3, b1, b2, b3 = (float(v) for v in o)
    if math.hypot(a1, a2, a3) < 1e-6 or math.hypot(b1, b2, b3) < 1e-6:
        return f"degenerate ImageOrientationPatient {o.tolist()}"
    if math.hypot(a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1) < 1e-6:
        return f"row and column cosines are parallel: {o.tolist()}"
    return None


def is_little_endian(ds: pydicom.Dataset) -> bool:
    encoding = getattr(ds, "original_encoding", None)
    if encoding is not None and encoding[1] is not None:
        return bool(encoding[1])
    return True


def header_from_dataset(ds: pydicom.Dataset, path: Path) -> SliceHeader:
    """Extract and check the geometry/intensity header of one image; SliceReadError if unusable."""
    little = is_little_endian(ds)
    frames = raw_text(ds, _T_FRAMES)
    if frames is not None and frames not in ("1",):
        raise SliceReadError(path, f"multi-frame file ({frames} frames) is not supported")
    samples = raw_ushort(ds, _T_SAMPLES, little)
    photometric = (raw_text(ds, _T_PHOTOMETRIC) or "MONOCHROME2").upper()
    if (samples or 1) != 1:
        raise SliceReadError(path, f"colour image ({photometric}, {samples} samples per pixel)")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SliceReadError(path, f"unsupported PhotometricInterpretation {photometric}")
    rows, cols = raw_ushort(ds, _T_ROWS, little), raw_ushort(ds, _T_COLS, little)
    if not rows or not cols:
        raise SliceReadError(path, "missing Rows/Columns")
    position = _numbers(path, "ImagePositionPatient", raw_text(ds, _T_POSITION), 3)
    orientation = _numbers(path, "ImageOrientationPatient", raw_text(ds, _T_ORIENTATION), 6)
    problem = _orientation_problem(orientation)
    if problem is not None:
        raise SliceReadError(path, problem)
    spacing = _numbers(path, "PixelSpacing", raw_text(ds, _T_SPACING), 2)
    if np.any(spacing <= 0):
        raise SliceReadError(path, f"non-positive PixelSpacing {spacing.tolist()}")
    instance = raw_text(ds, _T_INSTANCE)
    try:
        instance_number = int(float(instance)) if instance is not None else None
    except ValueError:
        instance_number = None
    if instance_number is None:
        # RSNA file names are the instance number; fall back to the stem when the tag is absent.
        if not path.stem.isdigit():
            raise SliceReadError(path, f"missing or non-integer InstanceNumber {instance!r}")
        instance_number = int(path.stem)
    description = raw_free_text(ds, _T_DESCRIPTION)
    meta = getattr(ds, "file_meta", None)
    ts = (raw_text(meta, _T_TRANSFER_SYNTAX) or "") if meta is not None else ""
    return SliceHeader(
        path=path,
        instance_number=instance_number,
        position=position,
        orientation=orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(rows),
        cols=int(cols),
        slice_thickness=_number(raw_text(ds, _T_THICKNESS), math.nan),
        spacing_between_slices=_number(raw_text(ds, _T_SPACING_BETWEEN), math.nan),
        rescale_slope=_number(raw_text(ds, _T_SLOPE), 1.0),
        rescale_intercept=_number(raw_text(ds, _T_INTERCEPT), 0.0),
        photometric=photometric,
        description=description,
        series_uid=raw_text(ds, _T_SERIES_UID),
        transfer_syntax=ts,
    )


def _pixel_data_truncated(ds: pydicom.Dataset, path: Path) -> str | None:
    """For a dataset read with a deferred PixelData: reason text if the file ends inside it."""
    elem = ds.get_item(_T_PIXEL_DATA, keep_deferred=True)
    if elem is None:
        return "no PixelData element"
    tell = getattr(elem, "value_tell", None)
    length = getattr(elem, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return None  # encapsulated (undefined length): only decoding can tell
    size = path.stat().st_size
    if tell + length > size:
        return f"truncated: PixelData needs {length} bytes, file has {max(size - tell, 0)}"
    return None


def open_dicom(path: Path, **kwargs: Any) -> pydicom.Dataset:
    """`pydicom.dcmread`, with every failure turned into a SliceReadError naming the file."""
    try:
        if path.stat().st_size == 0:
            raise SliceReadError(path, "zero-byte file")
        return pydicom.dcmread(path, **kwargs)
    except SliceReadError:
        raise
    except InvalidDicomError as exc:
        bare = _bare_dataset(path, **kwargs)
        if bare is None:
            raise SliceReadError(path, f"not a DICOM file ({exc})") from exc
        return bare
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise SliceReadError(path, f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc


_T_SOP_INSTANCE_UID = 0x00080018


def _bare_dataset(path: Path, **kwargs: Any) -> pydicom.Dataset | None:
    """A dataset written without the Part 10 preamble and file meta (older PACS and scanner
    exports do this), or None when `path` is not one: it must name its SOP instance. Its
    transfer syntax is the uncompressed little-endian encoding pydicom found, recorded in a
    file meta of its own so that decoding needs nothing else."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True, **kwargs)
        if raw_text(ds, _T_SOP_INSTANCE_UID) is None:
            return None
        implicit, little = getattr(ds, "original_encoding", (None, None))
    except Exception:  # noqa: BLE001 - whatever it is, it is not a bare dataset we can read
        return None
    if little is False:
        return None  # big-endian without a file meta: retired, and not worth guessing at
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def read_header(path: str | Path) -> SliceHeader:
    """Header-only read of one file (pixel bytes are not loaded, but truncation is detected).

    Raises SliceReadError naming the file for empty, non-DICOM, truncated or geometry-less files.
    """
    path = Path(path)
    # defer_size keeps PixelData unread but records where it starts, so truncation shows.
    ds = open_dicom(path, defer_size=256)
    header = header_from_dataset(ds, path)
    reason = _pixel_data_truncated(ds, path)
    if reason is not None:
        raise SliceReadError(path, reason)
    return header


def _native_pixels(ds: pydicom.Dataset, header: SliceHeader, little: bool) -> np.ndarray | None:
    """Stored pixels of an uncompressed little-endian slice as a view on the file bytes, or None
    when pydicom's decoder pipeline is needed (compressed, big-endian, odd bit depths)."""
    if header.transfer_syntax not in _NATIVE_LE or not little:
        return None
    bits = raw_ushort(ds, _T_BITS_ALLOCATED, little)
    signed = raw_ushort(ds, _T_PIXEL_REPRESENTATION, little) == 1
    if bits not in (8, 16, 32):
        return None
    elem = ds.get_item(_T_PIXEL_DATA)
    data = elem.value if elem is not None else None
    count = header.rows * header.cols
    if not isinstance(data, bytes | bytearray) or len(data) < count * (bits // 8):
        return None  # let pydicom produce its specific error (e.g. truncated pixel data)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(header.rows, header.cols)


@functools.cache
def _decoder(transfer_syntax: str) -> Decoder:
    """pydicom's pixel decoder for a transfer syntax (NotImplementedError when unsupported)."""
    return get_decoder(pydicom.uid.UID(transfer_syntax))


def _read_slice(path: Path) -> tuple[SliceHeader, np.ndarray]:
    """Header and stored pixel values (rows, cols) of one file, read once; SliceReadError if bad."""
    ds = open_dicom(path)
    header = header_from_dataset(ds, path)
    if _T_PIXEL_DATA not in ds:
        raise SliceReadError(path, "no PixelData element (truncated file?)")
    pixels = _native_pixels(ds, header, is_little_endian(ds))
    if pixels is None:
        try:
            # What `ds.pixel_array` runs, minus its caching bookkeeping (pixel-id hashing twice
            # per file), which costs ~15% of an RLE slice's decode.
            pixels = _decoder(header.transfer_syntax).as_array(ds)[0]
        except Exception as exc:  # noqa: BLE001 - decoder errors vary by plugin
            raise SliceReadError(
                path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})"
            ) from exc
    if pixels.shape != (header.rows, header.cols):
        raise SliceReadError(path, f"pixel array {pixels.shape} != Rows x Columns")
    return header, pixels


def read_image(path: str | Path) -> tuple[SliceHeader, np.ndarray]:
    """One image file on its own, for showing it: its header and float32 pixels (rows, cols)
    with RescaleSlope/Intercept applied and MONOCHROME1 inverted. With no series around it, the
    inversion reflects within the image's own range (`read_series` uses the series' range).
    SliceReadError naming the file when it cannot be read."""
    header, stored = _read_slice(Path(path))
    pixels = stored.astype(np.float32)
    if header.rescale_slope != 1.0:
        pixels *= np.float32(header.rescale_slope)
    if header.rescale_intercept != 0.0:
        pixels += np.float32(header.rescale_intercept)
    if header.photometric == "MONOCHROME1":
        pixels = np.float32(pixels.min() + pixels.max()) - pixels
    return header, pixels


def _file_order(p: Path) -> tuple[int, str, str]:
    # Numeric stems (RSNA "<instance>.dcm") in numeric order, then anything else by name.
    return (len(p.stem), p.stem, p.name) if p.stem.isdigit() else (1 << 30, p.stem, p.name)


def series_files(folder: Path) -> list[Path]:
    """The candidate image files of a series folder: regular, non-hidden files, by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=_file_order,
    )


def _ids_from_folder(folder: Path, study_id: int | None, series_id: int | None) -> tuple[int, int]:
    try:
        sid = int(folder.parent.name) if study_id is None else int(study_id)
        ser = int(folder.name) if series_id is None else int(series_id)
    except ValueError as exc:
        raise SeriesReadError(
            folder, "study_id/series_id not given and folder names are not integers"
        ) from exc
    return sid, ser


def _angle_deg(n1: np.ndarray, n2: np.ndarray) -> float:
    # Planes, not directions: a flipped normal is the same plane orientation.
    return math.degrees(math.acos(min(1.0, abs(float(n1 @ n2)))))


def _majority(keys: list[tuple]) -> tuple:
    counts = Counter(keys)
    # Most slices wins; ties go to the finer grid (more pixels), then a fixed order.
    return max(counts, key=lambda k: (counts[k], k[0] * k[1], k))


def _grid_key(h: SliceHeader) -> tuple[int, int, float, float]:
    return (h.rows, h.cols, round(h.pixel_spacing[0], 4), round(h.pixel_spacing[1], 4))


def _resample_slice(
    image: np.ndarray,
    header: SliceHeader,
    target_origin: np.ndarray,
    shape: tuple[int, int],
    spacing: tuple[float, float],
) -> np.ndarray:
    """Resample one slice (same plane) onto a grid of `shape`/`spacing` starting at target_origin.

    The planes coincide, so the map is a per-axis scale plus offset; bilinear, with a Gaussian
    pre-filter when shrinking (avoids aliasing), zero outside the native field of view.
    """
    from scipy import ndimage

    row_dir, col_dir = geometry.plane_axes(header.orientation)
    d = target_origin - header.position
    scale = np.array(
        [spacing[0] / header.pixel_spacing[0], spacing[1] / header.pixel_spacing[1]]
    )  # native pixels per target pixel, (row, col)
    offset = np.array(
        [d @ col_dir / header.pixel_spacing[0], d @ row_dir / header.pixel_spacing[1]]
    )
    src = image.astype(np.float32, copy=False)
    sigma = np.maximum(scale - 1.0, 0.0) / 2.0
    if np.any(sigma > 0):
        src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
    return ndimage.affine_transform(
        src, scale, offset=offset, output_shape=shape, order=1, mode="constant", cval=0.0
    ).astype(np.float32, copy=False)


@dataclass
class StackLayout:
    """How the usable slices of one series stack up; shared by `read_series` and the index."""

    order: np.ndarray  # (S,) indices into the header list, sorted along the reference normal
    orientation: np.ndarray  # (6,) reference (majority) ImageOrientationPatient
    along_normal: np.ndarray  # (S,) sorted slice coordinates along the reference normal, mm
    grid: tuple[int, int, float, float]  # majority (rows, cols, row spacing, col spacing)
    spacing_between_slices: float  # median gap along the normal, mm
    slice_thickness: float  # median SliceThickness tag (NaN when absent)
    flags: list[str]  # FLAG_* facts about the stack


def check_usable(folder: Path, n_files: int, skipped: list[tuple[Path, str]]) -> None:
    """SeriesReadError when a folder has no files, no usable slice, or fewer than half usable
    (then the folder is more likely broken than the odd file)."""
    if n_files == 0:
        raise SeriesReadError(folder, "no files")
    good = n_files - len(skipped)
    if good == 0:
        reason = f"no readable slice among {n_files} files: {skipped[0][1]}"
        raise SeriesReadError(folder, reason)
    if good * 2 < n_files:
        raise SeriesReadError(
            folder,
            f"only {good} of {n_files} files readable (e.g. {skipped[0][0].name}: {skipped[0][1]})",
        )


def layout_stack(headers: list[SliceHeader]) -> StackLayout:
    """Sort slices by ImagePositionPatient projected on the slice normal (instance number only
    breaks exact ties) and measure the stack: majority grid, spacing, orientation, flags."""
    # Reference orientation: the one most slices share (rounded cosines); sort along its normal.
    orient_keys = [tuple(np.round(h.orientation, 3)) for h in headers]
    ref_key = Counter(orient_keys).most_common(1)[0][0]
    ref_orientation = headers[orient_keys.index(ref_key)].orientation
    ref_normal = geometry.slice_normal(ref_orientation)
    flags: list[str] = []
    if any(
        _angle_deg(geometry.slice_normal(h.orientation), ref_normal) > _ORIENTATION_TOL_DEG
        for h in headers
    ):
        flags.append(FLAG_MIXED_ORIENTATION)

    if len({h.series_uid for h in headers if h.series_uid}) > 1:
        flags.append(FLAG_MIXED_SERIES_UID)

    z = np.array([h.position @ ref_normal for h in headers])
    inst = np.array([h.instance_number for h in headers], dtype=np.int64)
    if len(np.unique(inst)) < len(inst):
        flags.append(FLAG_DUPLICATE_INSTANCES)
    order = np.lexsort((inst, z))
    z = z[order]

    keys = [_grid_key(h) for h in headers]
    grid = _majority(keys)
    if any(k != grid for k in keys):
        flags.append(FLAG_MIXED_SIZES)

    if len(headers) >= 2:
        gaps = np.abs(np.diff(z))
        spacing = float(np.median(gaps))
        if np.any(gaps < 1e-3):
            flags.append(FLAG_DUPLICATE_POSITIONS)
        nonzero = gaps[gaps >= 1e-3]
        if nonzero.size and np.any(np.abs(nonzero - spacing) > _SPACING_TOL * max(spacing, 1e-6)):
            flags.append(FLAG_UNEVEN_SPACING)
    else:
        # One slice: nothing to measure, so the header's own value (or the thickness) stands in.
        h = headers[0]
        spacing = (
            h.slice_thickness
            if math.isnan(h.spacing_between_slices)
            else (h.spacing_between_slices)
        )

    thickness = np.array([h.slice_thickness for h in headers])
    finite = thickness[np.isfinite(thickness)]
    return StackLayout(
        order=order,
        orientation=np.asarray(ref_orientation, dtype=np.float64),
        along_normal=z,
        grid=grid,
        spacing_between_slices=spacing,
        slice_thickness=float(np.median(finite)) if finite.size else math.nan,
        flags=flags,
    )


def read_series(
    folder: str | Path,
    *,
    study_id: int | None = None,
    series_id: int | None = None,
    series_type: str | None = None,
) -> Series:
    """Read one series folder into a `Series` (see module docstring for what is normalised).

    `study_id`/`series_id` default to the folder names (`<study_id>/<series_id>/`). Unreadable
    files are listed in `skipped_files` (flag "skipped_files"); SeriesReadError when the folder is
    missing or empty, or when fewer than half of its files (or none) are usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesReadError(folder, "not a directory")
    sid, ser = _ids_from_folder(folder, study_id, series_id)
    paths = series_files(folder)

    headers: list[SliceHeader] = []
    images: list[np.ndarray] = []
    skipped: list[tuple[Path, str]] = []
    for p in paths:
        try:
            h, px = _read_slice(p)
        except SliceReadError as exc:
            skipped.append((p, exc.reason))
            continue
        headers.append(h)
        images.append(px)
    check_usable(folder, len(paths), skipped)

    layout = layout_stack(headers)
    headers = [headers[i] for i in layout.order]
    images = [images[i] for i in layout.order]
    flags = [f for f in layout.flags if f != FLAG_MIXED_SIZES]
    if skipped:
        flags.insert(0, FLAG_SKIPPED_FILES)

    # Majority grid (matrix + pixel spacing); other slices are resampled onto it.
    rows, cols = layout.grid[0], layout.grid[1]
    keys = [_grid_key(h) for h in headers]
    major_idx = [i for i, k in enumerate(keys) if k == layout.grid]
    spacing = headers[major_idx[0]].pixel_spacing

    n = len(headers)
    volume = np.empty((n, rows, cols), dtype=np.float32)
    positions = np.array([h.position for h in headers], dtype=np.float64)
    native_positions = positions.copy()
    for i, (h, px) in enumerate(zip(headers, images, strict=True)):
        out = volume[i]
        if keys[i] == layout.grid:
            np.copyto(out, px, casting="unsafe")
        else:
            target = _resample_target_origin(i, headers, major_idx, rows, cols, spacing)
            out[:] = _resample_slice(px, h, target, (rows, cols), spacing)
            positions[i] = target
        # Rescale in place on float32: one pass, no float64 temporaries.
        if h.rescale_slope != 1.0:
            out *= np.float32(h.rescale_slope)
        if h.rescale_intercept != 0.0:
            out += np.float32(h.rescale_intercept)
    if FLAG_MIXED_SIZES in layout.flags:
        flags.append(FLAG_RESAMPLED)

    mono1 = np.array([h.photometric == "MONOCHROME1" for h in headers])
    if mono1.any():
        # MONOCHROME1 shows low values bright. Reflect within the series' own value range of those
        # slices (not per slice) so relative intensities across slices are kept.
        lo = float(volume[mono1].min())
        hi = float(volume[mono1].max())
        volume[mono1] = np.float32(lo + hi) - volume[mono1]

    descriptions = [h.description for h in headers if h.description]
    mixed = FLAG_MIXED_ORIENTATION in flags
    return Series(
        study_id=sid,
        series_id=ser,
        volume=volume,
        instance_numbers=np.array([h.instance_number for h in headers], dtype=np.int64),
        positions=positions,
        orientation=layout.orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_thickness=layout.slice_thickness,
        spacing_between_slices=layout.spacing_between_slices,
        orientation_label=geometry.orientation_label(layout.orientation),
        series_type=series_type,
        description=Counter(descriptions).most_common(1)[0][0] if descriptions else None,
        flags=flags,
        skipped_files=skipped,
        orientations=np.array([h.orientation for h in headers]) if mixed else None,
        native_shapes=np.array([(h.rows, h.cols) for h in headers], dtype=np.int64),
        native_pixel_spacings=np.array([h.pixel_spacing for h in headers], dtype=np.float64),
        native_positions=native_positions,
        files=[h.path for h in headers],
    )


def _resample_target_origin(
    i: int,
    headers: list[SliceHeader],
    major_idx: list[int],
    rows: int,
    cols: int,
    spacing: tuple[float, float],
) -> np.ndarray:
    """Origin of the majority grid on slice i's plane.

    When a majority slice shares slice i's orientation, the grid is registered to it (same
    in-plane origin, shifted along the normal), so the volume stays one 3-D grid. Otherwise the
    grid is centred on slice i's own field of view.
    """
    h = headers[i]
    normal = geometry.slice_normal(h.orientation)
    same = [
        j
        for j in major_idx
        if _angle_deg(geometry.slice_normal(headers[j].orientation), normal) <= _ORIENTATION_TOL_DEG
    ]
    if same:
        j = min(same, key=lambda k: abs(k - i))
        pj = headers[j].position
        return pj + normal * float((h.position - pj) @ normal)
    row_dir, col_dir = geometry.plane_axes(h.orientation)
    centre = geometry.pixel_to_patient(
        (h.cols - 1) / 2, (h.rows - 1) / 2, h.position, h.orientation, h.pixel_spacing
    )
    return (
        centre - ((cols - 1) / 2 * spacing[1]) * row_dir - ((rows - 1) / 2 * spacing[0]) * col_dir
    )
