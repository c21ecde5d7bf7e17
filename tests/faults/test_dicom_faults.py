"""DICOM faults: each damages files of one train study; the reader skips what it cannot use,
names it, and every study is still cached (the damaged one flagged in warnings.jsonl)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import RLELossless

from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


def _not_dicom(p: Path) -> None:
    p.write_text("this is a note someone saved with a .dcm name\n")


def _no_pixel_data(p: Path) -> None:
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)


ONE_FILE = {
    "truncated": (_truncate, ""),
    "zero_bytes": (_zero_bytes, ""),
    "not_dicom": (_not_dicom, ""),
    "no_pixel_data": (_no_pixel_data, "pixel"),
}


@pytest.mark.parametrize("kind", sorted(ONE_FILE))
def test_one_bad_file_is_skipped_named_and_the_study_still_cached(
    fx: ModuleType, data: Path, tmp_path: Path, kind: str
) -> None:
    damage, reason = ONE_FILE[kind]
    study = fx.studies(data)[0]
    bad = fx.dcm_files(fx.series_dir(data, study, SAGITTAL_T2))[2]
    damage(bad)

    found = fx.problems_about(fx.index(data), str(bad))
    assert len(found) == 1 and reason in found[0].lower(), found

    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    assert any(bad.name in w and "skipped" in w for w in rep.warnings[study]), rep.warnings
    assert not any(bad.name in w for s, ws in rep.warnings.items() if s != study for w in ws)
    logged = [json.loads(line) for line in (tmp_path / "cache" / "warnings.jsonl").open()]
    assert study in {e["study_id"] for e in logged}
    fx.no_partial_files(tmp_path)


@pytest.mark.parametrize("tag", ["ImageOrientationPatient", "PixelSpacing", "ImagePositionPatient"])
def test_a_series_without_geometry_is_unusable_named_and_counted(
    fx: ModuleType, data: Path, tmp_path: Path, tag: str
) -> None:
    study = fx.studies(data)[1]
    folder = fx.series_dir(data, study, SAGITTAL_T1)
    for p in fx.dcm_files(folder):
        ds = pydicom.dcmread(p)
        delattr(ds, tag)
        ds.save_as(p)

    result = fx.index(data)
    found = fx.problems_about(result, f"{folder}: unusable series")
    assert found and f"missing {tag}" in found[0], found
    assert result.counts["skip: series without orientation/position/spacing"] == 1
    from lsdc.io.index import format_summary

    assert "series without orientation/position/spacing 1" in format_summary(result)

    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    text = " ".join(rep.warnings[study])
    assert f"series {folder.name}" in text and f"missing {tag}" in text
    assert f"no readable {SAGITTAL_T1} series" in text
    fx.no_partial_files(tmp_path)


def test_duplicate_instance_number_is_flagged_and_its_label_masked(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    row = coords[coords.condition == "Left Subarticular Stenosis"].iloc[0]
    study, series, inst = int(row.study_id), int(row.series_id), int(row.instance_number)
    folder = data / "train_images" / str(study) / str(series)
    other = next(p for p in fx.dcm_files(folder) if int(p.stem) != inst)
    ds = pydicom.dcmread(other)
    ds.InstanceNumber = inst
    ds.save_as(other)

    found = fx.problems_about(fx.index(data), f"{folder}: duplicate InstanceNumber")
    assert found and str(inst) in found[0]

    rep = fx.run_multitask(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    assert any(
        f"instance {inst} is ambiguous" in w and "left_subarticular_stenosis" in w
        for w in rep.warnings[study]
    ), rep.warnings[study]
    fx.no_partial_files(tmp_path)


def test_mixed_sizes_in_a_series_are_flagged_and_resampled(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    study = fx.studies(data)[0]
    folder = fx.series_dir(data, study, SAGITTAL_T2)
    p = fx.dcm_files(folder)[1]
    ds = pydicom.dcmread(p)
    small = ds.pixel_array[::2, ::2].copy()  # decoded before Rows/Columns change
    ds.Rows, ds.Columns = small.shape
    ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
    ds.PixelData = small.tobytes()
    ds.save_as(p)

    rows = [r for r in fx.index(data).rows if r.series_id == int(folder.name)]
    assert "mixed_sizes" in rows[0].flags.split(";")
    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    fx.no_partial_files(tmp_path)


def _monochrome1(files: list[Path]) -> None:
    # Stored as (series max + series min) - value: the reader reflects MONOCHROME1 within the
    # series' range, so it must give back the very values.
    pixels = [pydicom.dcmread(p).pixel_array for p in files]
    top = int(max(px.max() for px in pixels)) + int(min(px.min() for px in pixels))
    for p, px in zip(files, pixels, strict=True):
        ds = pydicom.dcmread(p)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = (top - px.astype(np.int64)).astype(px.dtype).tobytes()
        ds.save_as(p)


def _rle(files: list[Path]) -> None:
    for p in files:
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(p)


ENCODINGS: dict[str, Callable[[list[Path]], None]] = {"monochrome1": _monochrome1, "rle": _rle}


@pytest.mark.parametrize("kind", sorted(ENCODINGS))
def test_other_encodings_give_the_same_cache(
    fx: ModuleType, phantom: Path, data: Path, tmp_path: Path, kind: str
) -> None:
    from lsdc.fileio import load_npz

    study = fx.studies(data)[0]
    ENCODINGS[kind](fx.dcm_files(fx.series_dir(data, study, AXIAL_T2)))
    clean = fx.run_sequence(phantom, tmp_path / "clean")
    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == clean.written
    assert rep.warnings.get(study) == clean.warnings.get(study)
    got = load_npz(tmp_path / "cache" / f"{study}.npz")[0]["images"].astype(int)
    ref = load_npz(tmp_path / "clean" / f"{study}.npz")[0]["images"].astype(int)
    np.testing.assert_array_equal(got, ref)
    fx.no_partial_files(tmp_path)


def test_series_of_one_slice_one_position_or_blank_are_named(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    """Issue 20, weak: predict was silent about a series of one slice, a series whose slices
    share one position and an all-zero series. A blank series is not used (nothing to read)."""
    a, b, _ = fx.studies(data)
    one = fx.series_dir(data, a, SAGITTAL_T1)
    for p in fx.dcm_files(one)[1:]:
        p.unlink()
    stacked = fx.series_dir(data, a, SAGITTAL_T2)
    first = pydicom.dcmread(fx.dcm_files(stacked)[0]).ImagePositionPatient
    for p in fx.dcm_files(stacked):
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = first
        ds.save_as(p)
    blank = fx.series_dir(data, b, AXIAL_T2)
    for p in fx.dcm_files(blank):
        ds = pydicom.dcmread(p)
        ds.PixelData = bytes(len(ds.PixelData))
        ds.save_as(p)
    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {}
    warned = "\n".join(rep.warnings[a])
    assert f"series {one.name}: a single slice" in warned
    assert f"series {stacked.name}: all " in warned and "share one position" in warned
    n = len(fx.dcm_files(blank))
    assert f"series {blank.name}: every pixel of its {n} slices is 0" in "\n".join(rep.warnings[b])
    assert f"no readable {AXIAL_T2} series" in rep.warnings[b]
