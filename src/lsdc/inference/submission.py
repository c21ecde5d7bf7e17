"""Submissions: per-study probabilities -> the RSNA submission table, and its validation.

Input: probabilities (n_studies, 25, 3) in TARGETS x PROB_COLUMNS order plus the study ids.
Output: a DataFrame `row_id, normal_mild, moderate, severe` (25 rows per study, study order
kept, targets in file order, as in `sample_submission.csv`) and an atomically written CSV.
`validate_submission` lists every problem of a submission instead of stopping at the first.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.constants import CONDITIONS, LEVELS, PROB_COLUMNS, TARGETS, make_row_id, parse_row_id
from lsdc.fileio import atomic_write_text
from lsdc.io.tables import SUBMISSION_COLUMNS, read_series_descriptions, read_submission

__all__ = [
    "SUM_TOLERANCE",
    "build_submission",
    "validate_submission",
    "validate_submission_file",
    "write_submission",
]

# Rows must sum to 1 within this (the brief's contract; float32 softmax stays far inside it).
SUM_TOLERANCE = 1e-6
# Rows off by more than SUM_TOLERANCE but within this are warnings, not errors: probabilities
# rounded to 4 decimals sum to 0.9999 or 1.0001, and the scorer renormalises every row, so
# the score is unaffected. Beyond it a row is wrong, not rounded.
SUM_WARNING_TOLERANCE = 1e-3
# Rows written with six decimals (0.333333 x 3, as in the competition's own sample submission) sit
# exactly at the tolerance; the slack keeps float rounding from rejecting them.
_SUM_SLACK = 1e-9


def build_submission(study_ids: Sequence[int], probs: np.ndarray) -> pd.DataFrame:
    """(n_studies, 25, 3) probabilities -> submission DataFrame, 25 rows per study.

    Rows are rescaled to sum exactly 1 (the metric normalises rows too, so scores do not
    change). Non-finite or negative values, rows summing to 0 and repeated study ids raise
    ValueError naming the row.
    """
    probs = np.asarray(probs, dtype=np.float64)
    ids = [int(s) for s in study_ids]
    expected = (len(ids), len(TARGETS), len(PROB_COLUMNS))
    if probs.shape != expected:
        raise ValueError(f"probs must have shape {expected}, got {probs.shape}")
    repeated = [s for s, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(f"repeated study ids: {repeated[:10]}")
    row_ids = [make_row_id(s, c, lv) for s in ids for c in CONDITIONS for lv in LEVELS]
    flat = probs.reshape(-1, len(PROB_COLUMNS))
    sums = flat.sum(axis=1)
    bad = ~np.isfinite(flat).all(axis=1) | (flat < 0).any(axis=1) | ~(sums > 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"row {row_ids[i]}: probabilities must be finite, non-negative and not all 0, "
            f"got {flat[i].tolist()} ({int(bad.sum())} bad rows in all)"
        )
    flat = flat / sums[:, None]
    frame = pd.DataFrame(flat, columns=list(PROB_COLUMNS))
    frame.insert(0, "row_id", row_ids)
    return frame


def write_submission(submission: pd.DataFrame, path: str | Path) -> Path:
    """Write `submission` as CSV atomically (temporary file, then rename); returns the path."""
    missing = [c for c in SUBMISSION_COLUMNS if c not in submission.columns]
    if missing:
        raise ValueError(f"submission lacks columns: {', '.join(missing)}")
    text = submission[list(SUBMISSION_COLUMNS)].to_csv(index=False, float_format="%.10g")
    return atomic_write_text(path, text)


def validate_submission(
    submission: pd.DataFrame,
    series_descriptions: pd.DataFrame,
    warnings: list[str] | None = None,
) -> list[str]:
    """Every problem of `submission` against the studies of `series_descriptions`.

    Checks: exact columns `row_id, normal_mild, moderate, severe`; well-formed row ids; no
    row for an unknown study; no repeated row id; all 25 rows for every study in the
    descriptions; finite, non-negative, numeric probabilities summing to 1 within
    SUM_TOLERANCE (rows within SUM_WARNING_TOLERANCE, e.g. rounded to 4 decimals, go to
    `warnings` instead when a list is given, and are problems otherwise). `submission` may hold
    strings (from `read_submission(validate=False)`, whose index is the file line, used to name
    rows) or numbers. Returns [] when valid.
    """
    problems: list[str] = []
    columns = [str(c) for c in submission.columns]
    if columns != list(SUBMISSION_COLUMNS):
        missing = [c for c in SUBMISSION_COLUMNS if c not in columns]
        extra = [c for c in columns if c not in SUBMISSION_COLUMNS]
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if extra:
            detail.append(f"unexpected {', '.join(extra)}")
        if not detail:
            detail.append("wrong order")
        problems.append(
            f"columns must be exactly {','.join(SUBMISSION_COLUMNS)} "
            f"(found {','.join(columns)}: {'; '.join(detail)})"
        )
        if "row_id" not in columns:
            return problems

    by_line = submission.index.name == "line"

    def where(pos: int, row_id: object) -> str:
        prefix = f"line {submission.index[pos]}: " if by_line else ""
        return f"{prefix}row {str(row_id)!r}"

    expected_studies = {int(s) for s in series_descriptions["study_id"]}
    seen: dict[str, int] = {}
    present: dict[int, set[str]] = defaultdict(set)
    unknown_studies: dict[int, int] = Counter()
    for pos, row_id in enumerate(submission["row_id"]):
        row_id = "" if pd.isna(row_id) else str(row_id).strip()
        if row_id in seen:
            problems.append(f"{where(pos, row_id)}: repeated row id (first at {seen[row_id]})")
            continue
        seen[row_id] = submission.index[pos] if by_line else pos
        try:
            study_id, condition, level = parse_row_id(row_id)
        except ValueError:
            problems.append(f"{where(pos, row_id)}: malformed row id, expected <study_id>_<target>")
            continue
        if study_id not in expected_studies:
            unknown_studies[study_id] += 1
            continue
        present[study_id].add(f"{condition}_{level}")
    for study_id, n in sorted(unknown_studies.items()):
        problems.append(f"study {study_id}: {n} rows for a study not in the series descriptions")
    for study_id in sorted(expected_studies):
        lacking = [t for t in TARGETS if t not in present.get(study_id, set())]
        if len(lacking) == len(TARGETS):
            problems.append(f"study {study_id}: all {len(TARGETS)} rows missing")
        elif lacking:
            names = ", ".join(f"{study_id}_{t}" for t in lacking)
            problems.append(f"study {study_id}: {len(lacking)} rows missing: {names}")

    prob_cols = [c for c in PROB_COLUMNS if c in columns]
    if prob_cols:
        problems.extend(_probability_problems(submission, prob_cols, where, warnings))
    return problems


def _probability_problems(
    submission: pd.DataFrame,
    prob_cols: list[str],
    where: Callable[[int, object], str],
    warnings: list[str] | None,
) -> list[str]:
    """Non-numeric, non-finite or negative cells, and rows not summing to 1."""
    problems: list[str] = []
    numeric = {
        c: pd.to_numeric(submission[c], errors="coerce").to_numpy(dtype=np.float64)
        for c in prob_cols
    }
    row_ids = submission["row_id"].tolist()
    row_ok = np.ones(len(submission), dtype=bool)
    for c in prob_cols:
        raw = submission[c].tolist()
        values = numeric[c]
        for pos in np.flatnonzero(~np.isfinite(values) | (values < 0)):
            pos = int(pos)
            cell = raw[pos]
            if np.isnan(values[pos]) and not _is_nan_literal(cell):
                what = f"non-numeric value {cell!r}"
            elif not np.isfinite(values[pos]):
                what = f"non-finite value {cell!r}"
            else:
                what = f"negative probability {float(values[pos])!r}"
            problems.append(f"{where(pos, row_ids[pos])}: column {c!r}: {what}")
            row_ok[pos] = False
    if len(prob_cols) == len(PROB_COLUMNS):
        sums = np.sum([numeric[c] for c in PROB_COLUMNS], axis=0)
        off = np.abs(sums - 1.0)
        for pos in np.flatnonzero(row_ok & (off > SUM_TOLERANCE + _SUM_SLACK)):
            pos = int(pos)
            text = f"{where(pos, row_ids[pos])}: probabilities sum to {sums[pos]:.9g}, not 1"
            if warnings is not None and off[pos] <= SUM_WARNING_TOLERANCE:
                warnings.append(f"{text} (rounded? the scorer renormalises the row)")
            else:
                problems.append(f"{text} (tolerance {SUM_TOLERANCE:g})")
    return problems


def _is_nan_literal(cell: object) -> bool:
    """True for a NaN number or a spelled-out NaN; an empty or text cell is 'non-numeric'."""
    if isinstance(cell, float):
        return math.isnan(cell)
    return str(cell).strip().lower() in {"nan", "-nan", "+nan"}


def validate_submission_file(
    submission_csv: str | Path,
    series_descriptions_csv: str | Path,
    warnings: list[str] | None = None,
) -> list[str]:
    """`validate_submission` of two CSV files. Unreadable files raise `TableError`."""
    submission = read_submission(submission_csv, validate=False)
    descriptions = read_series_descriptions(series_descriptions_csv)
    return validate_submission(submission, descriptions, warnings)
