"""Table readers on project-made CSVs with the real files' quirks: empty label cells, a study
without coordinates, Title Case strings, an extra column, blank lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsdc.constants import PROB_COLUMNS, SEVERITIES, TARGETS
from lsdc.io.tables import (
    TableError,
    labels_to_long,
    long_to_wide,
    read_coordinates,
    read_series_descriptions,
    read_submission,
    read_train_labels,
)

STUDIES = (4003253, 4646740, 7143189)


def _train_rows() -> list[list[str]]:
    rows = []
    for i, sid in enumerate(STUDIES):
        cells = [SEVERITIES[(i + j) % 3] if (i + j) % 4 else SEVERITIES[0] for j in range(25)]
        rows.append([str(sid), *cells])
    rows[1][1 + TARGETS.index("left_subarticular_stenosis_l1_l2")] = ""  # empty: not scored
    rows[2][1 + TARGETS.index("spinal_canal_stenosis_l5_s1")] = ""
    rows[2][1 + TARGETS.index("right_subarticular_stenosis_l5_s1")] = ""
    return rows


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def write_train(tmp_path: Path, rows: list[list[str]] | None = None) -> Path:
    return write_csv(tmp_path / "train.csv", ["study_id", *TARGETS], rows or _train_rows())


COORD_HEADER = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]


def _coord_rows() -> list[list[str]]:
    # Study 7143189 has labels but no coordinates, as one real study does.
    return [
        ["4003253", "702807833", "8", "Spinal Canal Stenosis", "L1/L2", "322.83", "227.96"],
        ["4003253", "1054713880", "4", "Right Neural Foraminal Narrowing", "L4/L5", "187.9", "251"],
        ["4003253", "2448190387", "11", "Left Subarticular Stenosis", "L5/S1", "176.4", "283.1"],
        ["4646740", "3201256954", "20", "left_neural_foraminal_narrowing", "l3_l4", "145", "295"],
    ]


def assert_location(exc: TableError, path: Path, line: int | None, column: str | None) -> None:
    msg = str(exc)
    assert exc.path == path and str(path) in msg
    assert exc.line == line
    assert exc.column == column
    if line is not None:
        assert f"line {line}" in msg
    if column is not None:
        assert repr(column) in msg


# -- train.csv ---------------------------------------------------------------------------------


def test_train_labels_wide_keeps_empty_cells_missing(tmp_path):
    wide = read_train_labels(write_train(tmp_path))
    assert list(wide.columns) == ["study_id", *TARGETS]
    assert wide["study_id"].dtype == np.int64
    assert wide["study_id"].tolist() == list(STUDIES)
    assert int(wide[list(TARGETS)].isna().sum().sum()) == 3
    assert pd.isna(wide.loc[1, "left_subarticular_stenosis_l1_l2"])
    assert set(wide[list(TARGETS)].stack().dropna()) <= set(SEVERITIES)
    assert wide.loc[0, TARGETS[1]] == _train_rows()[0][2]


def test_extra_columns_are_ignored_and_blank_lines_skipped(tmp_path):
    rows = [[*r, str(k)] for k, r in enumerate(_train_rows())]
    path = tmp_path / "train.csv"
    header = ",".join(["study_id", *TARGETS, "fold_id"])
    path.write_text(header + "\n" + ",".join(rows[0]) + "\n\n" + ",".join(rows[1]) + "\n")
    wide = read_train_labels(path)
    assert list(wide.columns) == ["study_id", *TARGETS]
    assert len(wide) == 2


def test_labels_to_long_and_back(tmp_path):
    wide = read_train_labels(write_train(tmp_path))
    long = labels_to_long(wide)
    assert list(long.columns) == ["study_id", "condition", "level", "severity"]
    assert len(long) == 25 * len(STUDIES)
    assert str(long["severity"].dtype) == "Int64"
    assert int(long["severity"].isna().sum()) == 3
    first = long.iloc[0]
    assert (first["condition"], first["level"]) == ("spinal_canal_stenosis", "l1_l2")
    expected = wide.loc[0, TARGETS[7]]
    assert SEVERITIES[int(long.iloc[7]["severity"])] == expected
    row = long[(long.study_id == STUDIES[2]) & (long.condition == "spinal_canal_stenosis")]
    assert pd.isna(row[row.level == "l5_s1"]["severity"].iloc[0])
    pd.testing.assert_frame_equal(long_to_wide(long), wide)


def test_long_to_wide_rejects_duplicate_labels(tmp_path):
    long = labels_to_long(read_train_labels(write_train(tmp_path)))
    with pytest.raises(ValueError, match="duplicate"):
        long_to_wide(pd.concat([long, long.iloc[:1]]))


@pytest.mark.parametrize(
    ("mutate", "line", "column", "match"),
    [
        (lambda r: r[1].__setitem__(3, "Sever"), 3, TARGETS[2], "unknown severity 'Sever'"),
        (lambda r: r[2].__setitem__(0, "71x3189"), 4, "study_id", "non-numeric id"),
        (lambda r: r[0].__setitem__(0, ""), 2, "study_id", "empty id"),
        (lambda r: r.append(list(r[0])), 5, "study_id", "duplicate row .* line 2"),
        (lambda r: r[1].pop(), 3, None, "expected 26 fields, found 25"),
    ],
    ids=["unknown-severity", "non-numeric-id", "empty-id", "duplicate", "short-row"],
)
def test_train_labels_malformed(tmp_path, mutate, line, column, match):
    rows = _train_rows()
    mutate(rows)
    path = write_train(tmp_path, rows)
    with pytest.raises(TableError, match=match) as info:
        read_train_labels(path)
    assert_location(info.value, path, line, column)


def test_missing_column_names_header_line(tmp_path):
    rows = [r[:-1] for r in _train_rows()]
    path = write_csv(tmp_path / "train.csv", ["study_id", *TARGETS[:-1]], rows)
    with pytest.raises(TableError, match="missing column") as info:
        read_train_labels(path)
    assert_location(info.value, path, 1, TARGETS[-1])


def test_line_numbers_count_blank_lines(tmp_path):
    rows = _train_rows()
    rows[2][5] = "moderate"  # wrong case is an unknown severity
    path = tmp_path / "train.csv"
    lines = [",".join(["study_id", *TARGETS]), ",".join(rows[0]), "", ",".join(rows[1])]
    path.write_text("\n".join([*lines, ",".join(rows[2])]) + "\n")
    with pytest.raises(TableError) as info:
        read_train_labels(path)
    assert_location(info.value, path, 5, TARGETS[4])


def test_unreadable_files(tmp_path):
    with pytest.raises(TableError, match="cannot open") as info:
        read_train_labels(tmp_path / "absent.csv")
    assert_location(info.value, tmp_path / "absent.csv", None, None)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TableError, match="empty file") as info:
        read_train_labels(empty)
    assert_location(info.value, empty, 1, None)
    assert isinstance(info.value, ValueError)


# -- train_label_coordinates.csv ---------------------------------------------------------------


def test_coordinates_normalised_with_series_type(tmp_path):
    coords = read_coordinates(write_csv(tmp_path / "c.csv", COORD_HEADER, _coord_rows()))
    assert list(coords.columns) == [*COORD_HEADER, "series_type"]
    assert coords["condition"].tolist() == [
        "spinal_canal_stenosis",
        "right_neural_foraminal_narrowing",
        "left_subarticular_stenosis",
        "left_neural_foraminal_narrowing",
    ]
    assert coords["level"].tolist() == ["l1_l2", "l4_l5", "l5_s1", "l3_l4"]
    assert coords["series_type"].tolist() == [
        "Sagittal T2/STIR",
        "Sagittal T1",
        "Axial T2",
        "Sagittal T1",
    ]
    for col in ("study_id", "series_id", "instance_number"):
        assert coords[col].dtype == np.int64
    assert coords["x"].dtype == np.float64 and coords.loc[1, "y"] == 251.0
    assert 7143189 not in set(coords["study_id"])  # labelled study without coordinates


@pytest.mark.parametrize(
    ("row", "col", "value", "column", "match"),
    [
        (1, 5, "18x7", "x", "non-numeric value '18x7'"),
        (2, 6, "", "y", "empty cell"),
        (0, 6, "inf", "y", "non-numeric value 'inf'"),
        (3, 3, "Central Stenosis", "condition", "unknown condition"),
        (0, 4, "L6/S1", "level", "unknown level"),
        (2, 2, "eleven", "instance_number", "non-numeric id"),
    ],
)
def test_coordinates_malformed(tmp_path, row, col, value, column, match):
    rows = _coord_rows()
    rows[row][col] = value
    path = write_csv(tmp_path / "c.csv", COORD_HEADER, rows)
    with pytest.raises(TableError, match=match) as info:
        read_coordinates(path)
    assert_location(info.value, path, row + 2, column)


def test_coordinates_duplicate_row(tmp_path):
    rows = _coord_rows()
    dup = list(rows[0])
    dup[0:3] = ["4003253", "702807833", "9"]  # same series, condition and level, other slice
    dup[3] = "spinal_canal_stenosis"  # spelled differently, still the same target
    rows.append(dup)
    path = write_csv(tmp_path / "c.csv", COORD_HEADER, rows)
    with pytest.raises(TableError, match="duplicate row .* line 2") as info:
        read_coordinates(path)
    assert_location(info.value, path, 6, None)


# -- series descriptions -----------------------------------------------------------------------

DESC_HEADER = ["study_id", "series_id", "series_description"]
DESC_ROWS = [
    ["4003253", "702807833", "Sagittal T2/STIR"],
    ["4003253", "1054713880", "Sagittal T1"],
    ["4003253", "2448190387", "Axial T2"],
    ["4003253", "2448190388", "Axial T2"],  # a second axial series
]


def test_series_descriptions(tmp_path):
    desc = read_series_descriptions(write_csv(tmp_path / "d.csv", DESC_HEADER, DESC_ROWS))
    assert list(desc.columns) == DESC_HEADER
    assert desc["series_description"].tolist() == [r[2] for r in DESC_ROWS]
    assert desc["series_id"].dtype == np.int64


@pytest.mark.parametrize(
    ("rows", "line", "column", "match"),
    [
        ([*DESC_ROWS[:2], ["4003253", "1", "Coronal T1"]], 4, "series_description", "unknown"),
        ([*DESC_ROWS, DESC_ROWS[1]], 6, None, "duplicate row .* line 3"),
        ([["4003253", "7.02e8", "Axial T2"]], 2, "series_id", "non-numeric id"),
    ],
)
def test_series_descriptions_malformed(tmp_path, rows, line, column, match):
    path = write_csv(tmp_path / "d.csv", DESC_HEADER, rows)
    with pytest.raises(TableError, match=match) as info:
        read_series_descriptions(path)
    assert_location(info.value, path, line, column)


# -- submissions -------------------------------------------------------------------------------

SUB_HEADER = ["row_id", *PROB_COLUMNS]
SUB_ROWS = [
    ["4003253_spinal_canal_stenosis_l1_l2", "0.7", "0.2", "0.1"],
    ["4003253_spinal_canal_stenosis_l2_l3", "0.333333", "0.333333", "0.333334"],
    ["4003253_right_subarticular_stenosis_l5_s1", "1", "0", "0"],
]


def test_read_submission(tmp_path):
    sub = read_submission(write_csv(tmp_path / "s.csv", SUB_HEADER, SUB_ROWS))
    assert list(sub.columns) == SUB_HEADER
    assert sub["row_id"].tolist() == [r[0] for r in SUB_ROWS]
    assert sub["severe"].dtype == np.float64
    np.testing.assert_allclose(sub.loc[0, list(PROB_COLUMNS)].to_numpy(float), [0.7, 0.2, 0.1])


@pytest.mark.parametrize(
    ("row", "col", "value", "column", "match"),
    [
        (1, 0, "4003253_spinal_canal_stenosis_l6_s1", "row_id", "malformed row id"),
        (2, 2, "high", "moderate", "non-numeric value 'high'"),
        (0, 3, "nan", "severe", "non-numeric value 'nan'"),
        (2, 0, SUB_ROWS[0][0], "row_id", "duplicate row .* line 2"),
    ],
)
def test_read_submission_malformed(tmp_path, row, col, value, column, match):
    rows = [list(r) for r in SUB_ROWS]
    rows[row][col] = value
    path = write_csv(tmp_path / "s.csv", SUB_HEADER, rows)
    with pytest.raises(TableError, match=match) as info:
        read_submission(path)
    assert_location(info.value, path, row + 2, column)


def test_read_submission_unvalidated_keeps_strings_and_lines(tmp_path):
    rows = [[*r, "x"] for r in SUB_ROWS]
    rows[1][2] = "high"
    path = write_csv(tmp_path / "s.csv", [*SUB_HEADER, "note"], [*rows, rows[0]])
    raw = read_submission(path, validate=False)
    assert list(raw.columns) == [*SUB_HEADER, "note"]  # every column, as in the file
    assert raw.index.name == "line" and raw.index.tolist() == [2, 3, 4, 5]
    assert raw.loc[3, "moderate"] == "high"
