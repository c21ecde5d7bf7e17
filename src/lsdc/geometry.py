"""Pure geometry on DICOM image planes, in patient (LPS) millimetres.

Conventions (DICOM PS3.3 C.7.6.2):
- `position` is ImagePositionPatient: the patient-space centre of the first transmitted pixel,
  so pixel (col=0, row=0) lies exactly at `position`; integer pixel coordinates are pixel centres.
- `orientation` is ImageOrientationPatient: 3 row cosines (the direction in which the column index
  grows along a row) then 3 column cosines (the direction in which the row index grows).
- `pixel_spacing` is PixelSpacing in DICOM order: (row spacing, column spacing), i.e. the distance
  between adjacent rows (measured along the column cosines) then between adjacent columns.
- The slice normal is row cosines x column cosines; slices of a `Series` are sorted along it.

Everything here is a pure numpy function; the `Series`-level helpers read only the `positions`,
`orientations` and `pixel_spacing` of a series (the sorted, resampled grid of `Series.volume`).
Pixel coordinates are (col, row) = (x, y), the order of the RSNA coordinate table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lsdc.io.dicom import Series

ArrayLike = np.ndarray | Sequence[float] | float

ORIENTATION_LABELS: tuple[str, ...] = ("sagittal", "coronal", "axial")  # normal along x, y, z


def plane_axes(orientation: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Unit (row direction, column direction) (3,), (3,) of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=np.float64).reshape(6)
    row_dir, col_dir = o[:3], o[3:]
    nr, nc = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if nr < 1e-6 or nc < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {o.tolist()}")
    # Headers carry cosines rounded to a few digits; normalise so distances stay in mm.
    return row_dir / nr, col_dir / nc


def slice_normal(orientation: ArrayLike) -> np.ndarray:
    """Unit normal (3,) of the image plane: row cosines x column cosines."""
    (a1, a2, a3), (b1, b2, b3) = plane_axes(orientation)
    # Written out: np.cross costs ~20 us per call, which shows when sorting 1,000s of slices.
    n = np.array([a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"row and column cosines are parallel: {np.ravel(orientation).tolist()}")
    return n / norm


def orientation_label(orientation: ArrayLike) -> str:
    """'sagittal', 'coronal' or 'axial': the patient axis (x, y, z) nearest the slice normal."""
    n = slice_normal(orientation)
    return ORIENTATION_LABELS[int(np.argmax(np.abs(n)))]


def pixel_to_patient(
    col: ArrayLike,
    row: ArrayLike,
    position: ArrayLike,
    orientation: ArrayLike,
    pixel_spacing: ArrayLike,
) -> np.ndarray:
    """Patient coordinates (..., 3) mm of pixel (col, row) of one image plane.

    `col`, `row` may be arrays (broadcast together); fractional values are allowed.
    """
    row_dir, col_dir = plane_axes(orientation)
    row_spacing, col_spacing = (float(v) for v in np.asarray(pixel_spacing).reshape(2))
    c = np.asarray(col, dtype=np.float64)[..., None]
    r = np.asarray(row, dtype=np.float64)[..., None]
    origin = np.asarray(position, dtype=np.float64).reshape(3)
    return origin + c * col_spacing * row_dir + r * row_spacing * col_dir


def patient_to_pixel(
    point: ArrayLike,
    position: ArrayLike,
    orientation: ArrayLike,
    pixel_spacing: ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Project patient point(s) (..., 3) onto an image plane.

    Returns `(col_row, distance)`: `col_row` (..., 2) fractional pixel coordinates of the
    orthogonal projection, `distance` (...) signed mm from the plane along the slice normal.
    """
    row_dir, col_dir = plane_axes(orientation)
    row_spacing, col_spacing = (float(v) for v in np.asarray(pixel_spacing).reshape(2))
    d = np.asarray(point, dtype=np.float64) - np.asarray(position, dtype=np.float64).reshape(3)
    col = d @ row_dir / col_spacing
    row = d @ col_dir / row_spacing
    return np.stack([col, row], axis=-1), d @ slice_normal(orientation)


def distance_mm(a: ArrayLike, b: ArrayLike) -> np.ndarray | float:
    """Euclidean distance between patient points (..., 3), in mm."""
    d = np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), axis=-1)
    return float(d) if np.ndim(d) == 0 else d


def signed_distance_to_plane(
    point: ArrayLike, position: ArrayLike, orientation: ArrayLike
) -> np.ndarray | float:
    """Signed distance(s) in mm of patient point(s) (..., 3) from a plane, along its normal."""
    d = (np.asarray(point, dtype=np.float64) - np.asarray(position, dtype=np.float64)) @ (
        slice_normal(orientation)
    )
    return float(d) if np.ndim(d) == 0 else d


def positions_along_normal(positions: ArrayLike, orientation: ArrayLike) -> np.ndarray:
    """Coordinate (S,) in mm of each slice position (S, 3) along the slice normal."""
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3) @ slice_normal(orientation)


# --- Series-level helpers (pure: they read only the geometry arrays of a Series) -------------


def _slice_orientation(series: Series, index: int) -> np.ndarray:
    orientations = getattr(series, "orientations", None)
    if orientations is not None and len(orientations) == series.positions.shape[0]:
        return np.asarray(orientations[index], dtype=np.float64)
    return np.asarray(series.orientation, dtype=np.float64)


def series_pixel_to_patient(
    series: Series, col: ArrayLike, row: ArrayLike, slice_index: ArrayLike
) -> np.ndarray:
    """Patient mm (..., 3) of volume pixel (col, row, slice) of `series`.

    A fractional `slice_index` interpolates linearly between the two neighbouring slices'
    positions (their planes may differ in orientation in multi-stack axial series).
    """
    col_a, row_a, s_a = np.broadcast_arrays(
        np.asarray(col, dtype=np.float64),
        np.asarray(row, dtype=np.float64),
        np.asarray(slice_index, dtype=np.float64),
    )
    n = series.positions.shape[0]
    if np.any(s_a < -1e-9) or np.any(s_a > n - 1 + 1e-9):
        raise IndexError(f"slice index outside 0..{n - 1} in series {series.series_id}")
    lo = np.clip(np.floor(s_a).astype(np.int64), 0, max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    w = (s_a - lo)[..., None]

    def on_slice(idx: np.ndarray) -> np.ndarray:
        # Each slice has its own plane; evaluate every point on the plane of its slice `idx`.
        out = np.empty(col_a.shape + (3,), dtype=np.float64)
        for i in np.unique(idx):
            sel = idx == i
            out[sel] = pixel_to_patient(
                col_a[sel],
                row_a[sel],
                series.positions[i],
                _slice_orientation(series, int(i)),
                series.pixel_spacing,
            )
        return out

    return (1.0 - w) * on_slice(lo) + w * on_slice(hi)


@dataclass(frozen=True)
class SliceHit:
    """Where a patient point falls in a series: the nearest slice and the in-plane pixel."""

    slice_index: int  # sorted index into Series.volume
    instance_number: int
    col: float  # fractional pixel coordinates of the orthogonal projection on that slice
    row: float
    distance_mm: float  # unsigned distance from the point to that slice's plane
    inside: bool  # projection falls within the image (pixel centres 0..cols-1, 0..rows-1)


def nearest_slice(series: Series, point: ArrayLike) -> SliceHit:
    """The slice of `series` whose plane is closest to patient `point` (3,), and the pixel there.

    Distances are measured to each slice's own plane, so multi-stack series (several obliquities)
    are handled. Ties prefer a slice where the projection falls inside the image.
    """
    p = np.asarray(point, dtype=np.float64).reshape(3)
    rows, cols = series.volume.shape[-2:]
    best: tuple[float, int, int, np.ndarray] | None = None
    for i in range(series.positions.shape[0]):
        o = _slice_orientation(series, i)
        cr, dist = patient_to_pixel(p, series.positions[i], o, series.pixel_spacing)
        inside = bool(-0.5 <= cr[0] <= cols - 0.5 and -0.5 <= cr[1] <= rows - 0.5)
        key = (round(abs(float(dist)), 6), 0 if inside else 1)
        if best is None or key < best[:2]:
            best = (key[0], key[1], i, cr)
    if best is None:
        raise ValueError(f"series {series.study_id}/{series.series_id} has no slices")
    dist, outside, i, cr = best
    return SliceHit(
        slice_index=i,
        instance_number=int(series.instance_numbers[i]),
        col=float(cr[0]),
        row=float(cr[1]),
        distance_mm=float(dist),
        inside=not outside,
    )


def project_point(
    source: Series, slice_index: int, col: float, row: float, target: Series
) -> SliceHit:
    """Project pixel (col, row) of slice `slice_index` of `source` (e.g. a sagittal point) onto
    `target` (e.g. an axial series): the nearest target slice and the pixel there."""
    p = series_pixel_to_patient(source, col, row, slice_index)
    return nearest_slice(target, p)


def series_patient_to_pixel(series: Series, point: ArrayLike) -> np.ndarray:
    """Fractional volume pixel (col, row, slice) (3,) of patient `point` (3,) in `series`.

    (col, row) come from the projection on the nearest slice's plane; the slice coordinate is the
    point's position along the series normal interpolated between slice positions (linear
    extrapolation beyond the first/last slice, so points outside the stack stay detectable).
    Inverse of `series_pixel_to_patient` for points on or between slices.
    """
    p = np.asarray(point, dtype=np.float64).reshape(3)
    hit = nearest_slice(series, p)
    n = slice_normal(series.orientation)
    z = series.positions @ n
    zp = float(p @ n)
    if z.size == 1:
        s = 0.0
    else:
        idx = np.arange(z.size, dtype=np.float64)
        if z[-1] < z[0]:  # np.interp needs increasing coordinates
            z, idx = z[::-1], idx[::-1]
        if zp < z[0]:
            gap = z[1] - z[0]  # zero only for duplicated positions: no extrapolation then
            s = idx[0] + ((zp - z[0]) * (idx[1] - idx[0]) / gap if gap > 0 else 0.0)
        elif zp > z[-1]:
            gap = z[-1] - z[-2]
            s = idx[-1] + ((zp - z[-1]) * (idx[-1] - idx[-2]) / gap if gap > 0 else 0.0)
        else:
            s = float(np.interp(zp, z, idx))
    return np.array([hit.col, hit.row, s], dtype=np.float64)
