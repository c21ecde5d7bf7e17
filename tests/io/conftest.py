"""Project-made DICOM series for the io tests, written with lsdc.io.dicomwrite.write_slice.

Tests reach the builders through the `dicomfx` fixture (the suite runs with
--import-mode=importlib, so test modules cannot import a helper module). Every builder returns
what a correct reader must produce, computed independently of the reader.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from lsdc.io.dicomwrite import write_slice

# ImageOrientationPatient of the usual planes (row cosines, column cosines).
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about a patient axis."""
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def oblique(base: tuple[float, ...], *rotations: tuple[str, float]) -> tuple[float, ...]:
    """`base` orientation rotated (e.g. a sagittal tilted 12 deg about z then 7 deg about x)."""
    row, col = np.array(base[:3]), np.array(base[3:])
    for axis, deg in rotations:
        r = rotation(axis, deg)
        row, col = r @ row, r @ col
    return tuple(float(v) for v in np.concatenate([row, col]))


def normal_of(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.array(orientation[:3]), np.array(orientation[3:]))


@dataclass
class WrittenSeries:
    """A series written to disk and what reading it must give (in spatial order)."""

    folder: Path
    stored: np.ndarray  # (S, H, W) stored pixel values, spatial order along the normal
    instance_numbers: np.ndarray  # (S,) instance numbers in spatial order
    positions: np.ndarray  # (S, 3) ImagePositionPatient in spatial order (as written, rounded)
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    step: float  # distance between slices along the normal, mm


def write_series(
    root: Path,
    *,
    study_id: int = 1,
    series_id: int = 10,
    n: int = 6,
    shape: tuple[int, int] = (24, 32),
    spacing: tuple[float, float] = (0.8, 0.6),
    step: float = 3.0,
    orientation: tuple[float, ...] = SAGITTAL,
    origin: tuple[float, float, float] = (-20.0, -30.0, 40.0),
    instance_numbers: list[int] | None = None,
    description: str | None = "Sagittal T1",
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] = (1.0, 0.0),
    transfer_syntax: str | None = None,
    seed: int = 0,
    fill: int | None = None,
) -> WrittenSeries:
    """Write `n` slices into root/<study_id>/<series_id>/<instance>.dcm.

    Slice k (spatial index along the normal) sits at origin + k*step*normal and carries instance
    number `instance_numbers[k]` (default k+1). Pixels are random, with slice k offset by 100*k
    so that any mis-ordering shows; `fill` makes every pixel that value instead (a blank series).
    """
    folder = root / str(study_id) / str(series_id)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inst = list(range(1, n + 1)) if instance_numbers is None else list(instance_numbers)
    normal = normal_of(orientation)
    stored = np.stack(
        [rng.integers(0, 1000, shape).astype(np.uint16) + np.uint16(100 * k) for k in range(n)]
    )
    if fill is not None:
        stored[:] = fill
    positions = []
    for k in range(n):
        pos = np.asarray(origin) + k * step * normal
        write_slice(
            folder / f"{inst[k]}.dcm",
            stored[k],
            study_id=study_id,
            series_id=series_id,
            instance_number=inst[k],
            position=pos,
            orientation=orientation,
            pixel_spacing=spacing,
            slice_thickness=step * 0.9,
            spacing_between_slices=step,
            series_description=description,
            rescale_slope=rescale[0],
            rescale_intercept=rescale[1],
            photometric=photometric,
            transfer_syntax=transfer_syntax,
        )
        # What the header holds after DS rounding: read it back rather than re-implement it.
        positions.append(
            [float(v) for v in _header(folder / f"{inst[k]}.dcm").ImagePositionPatient]
        )
    return WrittenSeries(
        folder=folder,
        stored=stored,
        instance_numbers=np.array(inst, dtype=np.int64),
        positions=np.array(positions),
        orientation=tuple(orientation),
        pixel_spacing=tuple(spacing),
        step=step,
    )


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def testdata(name: str) -> Path:
    """A file shipped by pydicom or pydicom-data, never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    return Path(path)


def copy_into_series(src: Path, folder: Path, instance: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{instance}.dcm"
    shutil.copyfile(src, dst)
    return dst


def gdcm_transcode(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode a file with GDCM (pydicom has no JPEG-LS / JPEG Lossless encoder here).

    `syntax`: "jpeg_ls" (JPEG-LS lossless) or "jpeg_lossless" (process 14, selection value 1).
    """
    import gdcm

    ts = {
        "jpeg_ls": gdcm.TransferSyntax.JPEGLSLossless,
        "jpeg_lossless": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }[syntax]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(ts))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm cannot transcode {src} to {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {dst}")
    return dst


def add_bad_files(folder: Path) -> dict[str, Path]:
    """Add a truncated copy of a good slice, a zero-byte file and a non-DICOM file."""
    good = sorted(folder.glob("*.dcm"))[0].read_bytes()
    bad = {
        "truncated": folder / "901.dcm",
        "zero": folder / "902.dcm",
        "text": folder / "notes.txt",
    }
    bad["truncated"].write_bytes(good[: len(good) - 300])
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("not a DICOM file\n")
    return bad


@pytest.fixture
def dicomfx() -> ModuleType:
    """This module: `dicomfx.write_series(...)`, `dicomfx.SAGITTAL`, ..."""
    return sys.modules[__name__]
