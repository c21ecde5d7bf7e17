"""Header-only dataset index: rows, flags, problems, parallel equality, CSV and CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lsdc.cli import app
from lsdc.constants import AXIAL_T2, SAGITTAL_T1
from lsdc.io.dicomwrite import write_slice
from lsdc.io.index import build_index, index_series, write_index


@pytest.fixture
def dataset(tmp_path, dicomfx):
    images = tmp_path / "train_images"
    # Study 1: a clean sagittal (oblique) and an axial series with a zero-byte and a text file.
    dicomfx.write_series(
        images,
        study_id=1,
        series_id=11,
        n=5,
        step=3.5,
        orientation=dicomfx.oblique(dicomfx.SAGITTAL, ("z", 8.0)),
    )
    ax = dicomfx.write_series(
        images, study_id=1, series_id=12, n=4, orientation=dicomfx.AXIAL, description="Axial T2"
    )
    (ax.folder / "99.dcm").write_bytes(b"")
    (ax.folder / "readme.txt").write_text("hello")
    ax.folder.joinpath("98.dcm").write_bytes(b"")  # 3 bad of 7: still usable
    # Study 2: a series with one slice of another matrix, and an unusable series.
    mixed = dicomfx.write_series(images, study_id=2, series_id=21, n=4)
    write_slice(
        mixed.folder / "9.dcm",
        np.zeros((48, 64), np.uint16),
        study_id=2,
        series_id=21,
        instance_number=9,
        position=mixed.positions[-1] + np.array([-3.0, 0, 0]),
        orientation=dicomfx.SAGITTAL,
        pixel_spacing=(0.4, 0.3),
        slice_thickness=3.0,
    )
    broken = images / "2" / "22"
    broken.mkdir()
    (broken / "1.dcm").write_bytes(b"")
    (images / "2" / "junk").mkdir()
    (tmp_path / "train_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n"
        "1,11,Sagittal T1\n1,12,Axial T2\n2,22,Axial T2\n3,31,Axial T2\n"
    )
    return tmp_path


def _by_id(rows):
    return {(r.study_id, r.series_id): r for r in rows}


def test_index_rows(dataset):
    result = build_index(dataset, workers=1, progress=False)
    rows = _by_id(result.rows)
    assert sorted(rows) == [(1, 11), (1, 12), (2, 21), (2, 22)]

    sag = rows[(1, 11)]
    assert (sag.series_type, sag.orientation_label) == (SAGITTAL_T1, "sagittal")
    assert (sag.n_files, sag.n_slices, sag.rows, sag.cols) == (5, 5, 24, 32)
    assert (sag.row_spacing, sag.col_spacing) == pytest.approx((0.8, 0.6))
    assert sag.spacing_between_slices == pytest.approx(3.5, abs=1e-3)
    assert sag.slice_thickness == pytest.approx(3.15)
    assert sag.flags == "" and sag.error is None

    ax = rows[(1, 12)]
    assert (ax.series_type, ax.orientation_label) == (AXIAL_T2, "axial")
    assert (ax.n_files, ax.n_slices, ax.bad_files) == (7, 4, 3)
    assert "skipped_files" in ax.flags.split(";")

    mixed = rows[(2, 21)]
    assert mixed.series_type == SAGITTAL_T1  # not in the table: from the DICOM tag
    assert mixed.table_description is None
    assert "mixed_sizes" in mixed.flags.split(";")
    assert (mixed.rows, mixed.cols) == (24, 32)  # the majority grid

    broken = rows[(2, 22)]
    assert broken.error is not None and "no readable slice" in broken.error
    assert broken.n_slices == 0 and broken.rows is None

    reasons = {(p.path.split("train_images")[-1], p.reason) for p in result.problems}
    paths = {p for p, _ in reasons}
    assert {"/1/12/98.dcm", "/1/12/99.dcm", "/1/12/readme.txt", "/2/junk", "/3/31"} <= paths
    assert any(p == "/2/22" and r.startswith("unusable series") for p, r in reasons)
    assert result.counts["series"] == 4 and result.counts["bad_files"] == 4
    assert result.counts["unusable_series"] == 1


def test_two_workers_give_the_same_index(dataset):
    one = build_index(dataset, workers=1, progress=False)
    two = build_index(dataset, workers=2, progress=False)
    assert one.rows == two.rows
    assert one.problems == two.problems


def test_index_series_detects_truncated_file_from_headers(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=3)
    bad = dicomfx.add_bad_files(w.folder)
    row, problems = index_series(w.folder, 1, 10, None)
    assert (row.n_files, row.n_slices, row.bad_files) == (6, 3, 3)
    assert {p.path for p in problems} == {str(p) for p in bad.values()}
    assert any("truncated" in p.reason for p in problems)


def test_write_index_csv(dataset, tmp_path):
    result = build_index(dataset, progress=False)
    out, problems_out = write_index(result, tmp_path / "out" / "index.csv")
    frame = pd.read_csv(out)
    assert len(frame) == 4
    assert list(frame.columns[:3]) == ["study_id", "series_id", "series_type"]
    assert frame.loc[frame.series_id == 12, "bad_files"].item() == 3
    problems = pd.read_csv(problems_out)
    assert len(problems) == len(result.problems)


def test_cli_index(dataset, tmp_path):
    out = tmp_path / "idx.csv"
    res = CliRunner().invoke(
        app, ["index", str(dataset), "--out", str(out), "--workers", "1"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    assert "2 studies, 4 series" in res.output and "unusable series: 1" in res.output
    assert len(pd.read_csv(out)) == 4
    res = CliRunner().invoke(app, ["index", str(tmp_path / "nope")])
    assert res.exit_code == 2
