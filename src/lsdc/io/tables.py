"""Readers for the five RSNA CSV tables, with schema validation, and wide <-> long label tables.

Input: paths of `train.csv`, `train_label_coordinates.csv`, `{train,test}_series_descriptions.csv`,
`sample_submission.csv` or a submission. Output: tidy DataFrames with fixed dtypes (documented per
reader). Every malformed cell raises `TableError`, which names the file, the line as a text editor
shows it (header = line 1) and the column, so a user can jump straight to the problem.

Files are read with the `csv` module rather than `pandas.read_csv` because pandas silently pads
short rows and skips blank lines, which would hide broken rows and shift line numbers.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.constants import (
    CONDITION_SERIES,
    CONDITIONS,
    LEVELS,
    PROB_COLUMNS,
    SERIES_TYPES,
    SEVERITIES,
    SEVERITY_INDEX,
    TARGETS,
    condition_from_title,
    level_from_title,
    parse_row_id,
)

__all__ = [
    "COORDINATE_COLUMNS",
    "SERIES_DESCRIPTION_COLUMNS",
    "SUBMISSION_COLUMNS",
    "TableError",
    "labels_to_long",
    "long_to_wide",
    "read_coordinates",
    "read_series_descriptions",
    "read_submission",
    "read_train_labels",
]

COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id",
    "series_id",
    "instance_number",
    "condition",
    "level",
    "x",
    "y",
)
SERIES_DESCRIPTION_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", *PROB_COLUMNS)

_INT_PATTERN = r"[0-9]+"  # ASCII digits only: str.isdigit() would accept "²"


class TableError(ValueError):
    """A malformed CSV table: names the file, the line (header = line 1) and the column."""

    def __init__(self, path: str | Path, line: int | None, column: str | None, message: str):
        self.path = Path(path)
        self.line = line
        self.column = column
        self.message = message
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


@dataclass
class _RawTable:
    """Every cell as a stripped string, plus the file line of each data row."""

    path: Path
    frame: pd.DataFrame  # object columns of str, one per requested column
    lines: np.ndarray  # (n_rows,) int: line in the file where each row starts

    def error(self, row: int, column: str | None, message: str) -> TableError:
        return TableError(self.path, int(self.lines[row]), column, message)


def _read_raw(path: str | Path, required: Sequence[str]) -> _RawTable:
    """Read `path` with the csv module; check the header has `required` and every row's width.

    Extra columns are allowed and dropped (e.g. a `fold_id` column added by a user). Blank lines
    are skipped but still counted, so reported line numbers match the file.
    """
    path = Path(path)
    try:
        fh = path.open(newline="", encoding="utf-8-sig")  # -sig: tolerate an Excel BOM
    except OSError as exc:
        raise TableError(path, None, None, f"cannot open: {exc.strerror or exc}") from exc
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise TableError(path, 1, None, "empty file, expected a header line")
            header = [h.strip() for h in header]
            seen: set[str] = set()
            for name in header:
                if name in seen:
                    raise TableError(path, 1, name, "duplicate column in header")
                seen.add(name)
            for name in required:
                if name not in seen:
                    shown = ", ".join(header[:6]) + (", ..." if len(header) > 6 else "")
                    raise TableError(
                        path,
                        1,
                        name,
                        f"missing column (header has {len(header)} columns: {shown})",
                    )
            keep = [header.index(name) for name in required]
            rows: list[list[str]] = []
            lines: list[int] = []
            start = reader.line_num + 1
            for record in reader:
                if not record or all(not cell.strip() for cell in record):
                    start = reader.line_num + 1
                    continue
                if len(record) != len(header):
                    raise TableError(
                        path,
                        start,
                        None,
                        f"expected {len(header)} fields, found {len(record)}",
                    )
                rows.append([record[i].strip() for i in keep])
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise TableError(path, reader.line_num, None, f"CSV syntax error: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise TableError(path, None, None, f"not UTF-8 text: {exc}") from exc
    frame = pd.DataFrame(rows, columns=list(required), dtype=object)
    return _RawTable(path, frame, np.asarray(lines, dtype=np.int64))


def _int_column(raw: _RawTable, column: str) -> np.ndarray:
    """A non-negative integer id column (int64); empty or non-numeric cells raise."""
    values = raw.frame[column]
    ok = values.astype(str).str.fullmatch(_INT_PATTERN).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        cell = values.iloc[row]
        what = "empty id" if cell == "" else f"non-numeric id {cell!r}"
        raise raw.error(row, column, f"{what}, expected a non-negative integer")
    return values.astype(np.int64).to_numpy()


def _float_column(raw: _RawTable, column: str) -> np.ndarray:
    """A finite float column; empty, non-numeric, NaN or infinite cells raise."""
    cells = raw.frame[column]
    values = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = cells.iloc[row]
        what = "empty cell" if cell == "" else f"non-numeric value {cell!r}"
        raise raw.error(row, column, f"{what}, expected a finite number")
    return values


def _check_unique(raw: _RawTable, key: Sequence[str], keys: pd.DataFrame) -> None:
    """Raise on the first row whose `key` repeats an earlier row's, naming both lines."""
    dup = keys.duplicated(keep=False).to_numpy()
    if not dup.any():
        return
    later = keys.duplicated(keep="first").to_numpy()
    row = int(np.flatnonzero(later)[0])
    match = (keys == keys.iloc[row]).all(axis=1).to_numpy()
    first = int(np.flatnonzero(match)[0])
    shown = ", ".join(f"{k}={keys.iloc[row][k]}" for k in key)
    raise raw.error(
        row,
        key[0] if len(key) == 1 else None,
        f"duplicate row ({shown}) already on line {int(raw.lines[first])}",
    )


def read_train_labels(path: str | Path) -> pd.DataFrame:
    """`train.csv` -> wide frame: `study_id` (int64) + the 25 TARGETS in file order.

    Target cells are severity strings (`Normal/Mild`, `Moderate`, `Severe`) in a nullable
    `string` column; empty cells (not scored by the metric) stay missing (`<NA>`).
    """
    raw = _read_raw(path, ("study_id", *TARGETS))
    study_ids = _int_column(raw, "study_id")
    out = {"study_id": study_ids}
    allowed = set(SEVERITIES)
    for target in TARGETS:
        cells = raw.frame[target]
        bad = ~cells.isin(allowed | {""}).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise raw.error(
                row,
                target,
                f"unknown severity {cells.iloc[row]!r}, expected one of "
                f"{', '.join(SEVERITIES)} or an empty cell",
            )
        out[target] = pd.array(cells.where(cells != "", None).tolist(), dtype="string")
    wide = pd.DataFrame(out)
    _check_unique(raw, ("study_id",), wide[["study_id"]])
    return wide


def labels_to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide labels -> long: `study_id`, `condition`, `level`, `severity` (nullable Int64 0/1/2).

    One row per study and target (25 per study, study order kept, targets in file order);
    empty cells are kept as `<NA>` so callers can still predict them.
    """
    missing = [c for c in ("study_id", *TARGETS) if c not in wide.columns]
    if missing:
        raise ValueError(f"wide label table lacks columns: {', '.join(missing)}")
    n = len(wide)
    codes = np.full((n, len(TARGETS)), -1, dtype=np.int64)
    for j, target in enumerate(TARGETS):
        col = wide[target]
        present = col.notna().to_numpy()
        values = col[present].astype(str)
        unknown = sorted(set(values) - set(SEVERITIES))
        if unknown:
            raise ValueError(f"column {target!r}: unknown severities {unknown}")
        codes[present, j] = values.map(SEVERITY_INDEX).to_numpy(dtype=np.int64)
    conditions = [t_cond for t_cond in CONDITIONS for _ in LEVELS]
    levels = [lv for _ in CONDITIONS for lv in LEVELS]
    flat = codes.reshape(-1)
    severity = pd.arrays.IntegerArray(np.where(flat < 0, 0, flat), flat < 0)
    return pd.DataFrame(
        {
            "study_id": np.repeat(wide["study_id"].to_numpy(dtype=np.int64), len(TARGETS)),
            "condition": np.tile(np.asarray(conditions, dtype=object), n),
            "level": np.tile(np.asarray(levels, dtype=object), n),
            "severity": severity,
        }
    )


def long_to_wide(long: pd.DataFrame) -> pd.DataFrame:
    """Inverse of `labels_to_long`: one row per study (first-seen order), severity strings.

    Targets absent from `long` or with a missing severity become `<NA>`. A repeated
    (study_id, condition, level) raises, since it would make the label ambiguous.
    """
    missing = [c for c in ("study_id", "condition", "level", "severity") if c not in long.columns]
    if missing:
        raise ValueError(f"long label table lacks columns: {', '.join(missing)}")
    key = long[["study_id", "condition", "level"]]
    if key.duplicated().any():
        first = key[key.duplicated()].iloc[0]
        raise ValueError(f"duplicate label for {first.to_dict()}")
    bad_cond = set(long["condition"]) - set(CONDITIONS)
    bad_level = set(long["level"]) - set(LEVELS)
    if bad_cond or bad_level:
        raise ValueError(f"unknown conditions {sorted(bad_cond)} / levels {sorted(bad_level)}")
    sev = pd.array(long["severity"], dtype="Int64")
    if ((sev < 0) | (sev >= len(SEVERITIES))).fillna(False).any():
        raise ValueError("severity codes must be 0, 1 or 2")
    studies = pd.unique(long["study_id"].to_numpy(dtype=np.int64))
    row_of = {s: i for i, s in enumerate(studies)}
    col_of = {t: j for j, t in enumerate(TARGETS)}
    cells = np.full((len(studies), len(TARGETS)), None, dtype=object)
    for sid, cond, lv, code in zip(
        long["study_id"], long["condition"], long["level"], sev, strict=True
    ):
        if code is not pd.NA:
            cells[row_of[int(sid)], col_of[f"{cond}_{lv}"]] = SEVERITIES[int(code)]
    out = {"study_id": studies}
    for j, target in enumerate(TARGETS):
        out[target] = pd.array(cells[:, j].tolist(), dtype="string")
    return pd.DataFrame(out)


def read_coordinates(path: str | Path) -> pd.DataFrame:
    """`train_label_coordinates.csv` -> `study_id`, `series_id`, `instance_number` (int64),
    `condition`, `level` (snake case, e.g. `left_neural_foraminal_narrowing`, `l4_l5`), `x`, `y`
    (float64 pixel coordinates in the native image), `series_type` (the series type the
    condition is labelled on).

    Title Case (the official spelling) and snake case are both accepted. Studies may be absent
    (some have no coordinates at all). A repeated (study, series, condition, level) raises.
    """
    raw = _read_raw(path, COORDINATE_COLUMNS)
    ints = {c: _int_column(raw, c) for c in ("study_id", "series_id", "instance_number")}
    # Map each distinct spelling once: the file has ~50k rows but only a handful of strings.
    conditions = _normalise_names(raw, "condition", condition_from_title, "condition")
    levels = _normalise_names(raw, "level", level_from_title, "level")
    out = pd.DataFrame(
        {
            **ints,
            "condition": conditions,
            "level": levels,
            "x": _float_column(raw, "x"),
            "y": _float_column(raw, "y"),
            "series_type": [CONDITION_SERIES[c] for c in conditions],
        }
    )
    key = ("study_id", "series_id", "condition", "level")
    _check_unique(raw, key, out[list(key)])
    return out


def _normalise_names(
    raw: _RawTable, column: str, normalise: Callable[[str], str], what: str
) -> list[str]:
    """Snake-case names of a Title Case (or already snake case) column; unknown names raise."""
    cells = raw.frame[column]
    mapping: dict[str, str] = {}
    for name in pd.unique(cells):
        try:
            mapping[name] = normalise(name)
        except ValueError:
            row = int(np.flatnonzero((cells == name).to_numpy())[0])
            raise raw.error(row, column, f"unknown {what} {name!r}") from None
    return [mapping[c] for c in cells]


def read_series_descriptions(path: str | Path) -> pd.DataFrame:
    """`{train,test}_series_descriptions.csv` -> `study_id`, `series_id` (int64),
    `series_description` (one of SERIES_TYPES). A repeated (study, series) raises."""
    raw = _read_raw(path, SERIES_DESCRIPTION_COLUMNS)
    out = pd.DataFrame(
        {
            "study_id": _int_column(raw, "study_id"),
            "series_id": _int_column(raw, "series_id"),
        }
    )
    desc = raw.frame["series_description"]
    bad = ~desc.isin(SERIES_TYPES).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise raw.error(
            row,
            "series_description",
            f"unknown series description {desc.iloc[row]!r}, expected one of "
            f"{', '.join(SERIES_TYPES)}",
        )
    out["series_description"] = desc.astype(str).to_numpy()
    _check_unique(raw, ("study_id", "series_id"), out[["study_id", "series_id"]])
    return out


def read_submission(path: str | Path, *, validate: bool = True) -> pd.DataFrame:
    """A submission or `sample_submission.csv` -> `row_id` (str) + `normal_mild`, `moderate`,
    `severe` (float64), in file order.

    With `validate=True` (the default) a malformed row id, a non-numeric or non-finite
    probability or a repeated row id raises `TableError`. With `validate=False` only the CSV
    structure and the header are checked and every cell is returned as a string, indexed by
    its file line (index name `line`), for `lsdc.inference.submission.validate_submission`
    to list every problem at once.
    """
    if not validate:
        path = Path(path)
        raw = _read_raw(path, _header_of(path))
        frame = raw.frame.copy()
        frame.index = pd.Index(raw.lines, name="line")
        return frame
    raw = _read_raw(path, SUBMISSION_COLUMNS)
    for row, row_id in enumerate(raw.frame["row_id"]):
        try:
            parse_row_id(row_id)
        except ValueError:
            raise raw.error(
                row, "row_id", f"malformed row id {row_id!r}, expected <study_id>_<target>"
            ) from None
    out = pd.DataFrame({"row_id": raw.frame["row_id"].astype(str).to_numpy()})
    for col in PROB_COLUMNS:
        out[col] = _float_column(raw, col)
    _check_unique(raw, ("row_id",), out[["row_id"]])
    return out


def _header_of(path: Path) -> tuple[str, ...]:
    """The (stripped) header names of a CSV file, for reading every column as is."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except OSError as exc:
        raise TableError(path, None, None, f"cannot open: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise TableError(path, 1, None, f"unreadable header: {exc}") from exc
    if header is None:
        raise TableError(path, 1, None, "empty file, expected a header line")
    return tuple(h.strip() for h in header)
