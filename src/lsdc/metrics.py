"""The official RSNA 2024 LSDC metric (DESIGN §2), as pure functions.

Input: labels (wide or long table, or an (n_studies, 25) code array) and predicted
probabilities (a submission table, or an (n_studies, 25, 3) array). Output: a dict with the four
terms and their mean, keys `spinal`, `foraminal`, `subarticular`, `any_severe_spinal`, `score`.

Details that follow the official Kaggle implementation (sklearn `log_loss` with sample weights):
- Only labelled rows are scored; unlabelled targets' predictions are ignored.
- Sample weight by TRUE severity: 1 Normal/Mild, 2 Moderate, 4 Severe. Each group's loss is the
  weighted mean, sum(w * -log p_true) / sum(w); left and right are pooled in one group.
- Each row is normalised to sum 1, then clipped to [1e-15, 1 - 1e-15], before the log.
- any_severe_spinal, per study with at least one labelled spinal level: label = any labelled
  spinal level Severe; prediction = max `severe` probability over those labelled spinal levels
  (the official code aligns the submission to the solution's labelled rows, so unlabelled levels
  do not count); weight = max sample weight over them; binary weighted log loss.
  The `severe` used is the normalised one (the official code takes the raw column; the two
  agree for any submission whose rows sum to 1, which `validate_submission` requires).
- score = unweighted mean of the four terms. A term with no labelled rows is NaN (and so is the
  score), never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.constants import (
    CONDITION_GROUP,
    CONDITIONS,
    LEVELS,
    METRIC_GROUPS,
    PROB_COLUMNS,
    SEVERITIES,
    SEVERITY_INDEX,
    SEVERITY_WEIGHTS,
    TARGETS,
    make_row_id,
)
from lsdc.io.tables import labels_to_long, long_to_wide, read_submission, read_train_labels

__all__ = [
    "EPS",
    "SCORE_KEYS",
    "MetricError",
    "any_severe_spinal_loss",
    "labels_array",
    "normalise_rows",
    "score",
    "score_arrays",
    "score_files",
    "submission_array",
    "weighted_log_loss",
]

# sklearn's historical log_loss clip, the one the competition's metric ran with.
EPS = 1e-15
SCORE_KEYS: tuple[str, ...] = (*METRIC_GROUPS, "any_severe_spinal", "score")

_SEVERE = SEVERITY_INDEX["Severe"]
_WEIGHTS = np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
# Column indices into TARGETS (condition-major: index = condition * 5 + level) of each group.
GROUP_TARGETS: dict[str, np.ndarray] = {
    g: np.asarray(
        [
            ci * len(LEVELS) + li
            for ci, c in enumerate(CONDITIONS)
            if CONDITION_GROUP[c] == g
            for li in range(len(LEVELS))
        ]
    )
    for g in METRIC_GROUPS
}
_SPINAL_TARGETS = GROUP_TARGETS["spinal"]


class MetricError(ValueError):
    """Inputs the metric cannot score: a missing labelled row, a negative or non-finite
    probability, or a row whose probabilities sum to 0. The message names the row."""


def normalise_rows(probs: np.ndarray) -> np.ndarray:
    """Rows of `probs` (..., k) divided by their sums (float64). Rows must have a positive sum."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=-1, keepdims=True)


def weighted_log_loss(y_true: np.ndarray, probs: np.ndarray, sample_weight: np.ndarray) -> float:
    """Weighted multiclass log loss: sum(w * -log p[y]) / sum(w).

    y_true (n,) int class indices; probs (n, k), normalised per row then clipped to
    [EPS, 1 - EPS]; sample_weight (n,). NaN when n == 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    w = np.asarray(sample_weight, dtype=np.float64)
    if y_true.size == 0:
        return float("nan")
    p = np.clip(normalise_rows(probs), EPS, 1.0 - EPS)
    p_true = p[np.arange(y_true.size), y_true]
    return float(np.sum(w * -np.log(p_true)) / np.sum(w))


def _binary_log_loss(y_true: np.ndarray, p: np.ndarray, sample_weight: np.ndarray) -> float:
    """Weighted binary log loss of positive-class probabilities `p` (n,), clipped like sklearn."""
    if y_true.size == 0:
        return float("nan")
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    y = np.asarray(y_true, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64)
    losses = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return float(np.sum(w * losses) / np.sum(w))


def any_severe_spinal_loss(spinal_labels: np.ndarray, spinal_probs: np.ndarray) -> float:
    """The any_severe_spinal term.

    spinal_labels (n_studies, 5) int codes, -1 = unlabelled; spinal_probs (n_studies, 5, 3),
    rows already normalised. Studies without any labelled spinal level are left out.
    """
    labelled = spinal_labels >= 0  # (S, 5)
    keep = labelled.any(axis=1)
    labelled, codes = labelled[keep], spinal_labels[keep]
    severe_p = np.where(labelled, spinal_probs[keep][..., _SEVERE], -np.inf).max(axis=1)  # (S,)
    y = ((codes == _SEVERE) & labelled).any(axis=1)
    w = np.where(labelled, _WEIGHTS[np.clip(codes, 0, None)], -np.inf).max(axis=1)
    return _binary_log_loss(y, severe_p, w)


def score_arrays(
    labels: np.ndarray, probs: np.ndarray, study_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """The metric on arrays in TARGETS order.

    labels (n_studies, 25) int: 0/1/2 severity index, -1 = unlabelled (not scored).
    probs (n_studies, 25, 3): probabilities in PROB_COLUMNS order; only labelled entries are
    read, so unlabelled ones may be anything (NaN included). `study_ids`, if given, lets errors
    name the offending row id.
    Returns {spinal, foraminal, subarticular, any_severe_spinal, score} as floats.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    n = labels.shape[0]
    if labels.shape != (n, len(TARGETS)) or probs.shape != (n, len(TARGETS), len(PROB_COLUMNS)):
        raise MetricError(
            f"expected labels (n, {len(TARGETS)}) and probs (n, {len(TARGETS)}, "
            f"{len(PROB_COLUMNS)}), got {labels.shape} and {probs.shape}"
        )
    if np.any((labels < -1) | (labels >= len(SEVERITIES))):
        raise MetricError("label codes must be -1 (unlabelled), 0, 1 or 2")
    labelled = labels >= 0
    _check_probs(probs, labelled, study_ids)
    safe = np.where(labelled[..., None], probs, 1.0)  # unlabelled rows: harmless placeholder
    norm = normalise_rows(safe)

    result: dict[str, float] = {}
    for group in METRIC_GROUPS:
        cols = GROUP_TARGETS[group]
        mask = labelled[:, cols]
        y = labels[:, cols][mask]
        result[group] = weighted_log_loss(y, norm[:, cols][mask], _WEIGHTS[y])
    spinal_labels = np.where(labelled[:, _SPINAL_TARGETS], labels[:, _SPINAL_TARGETS], -1)
    result["any_severe_spinal"] = any_severe_spinal_loss(spinal_labels, norm[:, _SPINAL_TARGETS])
    result["score"] = float(np.mean([result[k] for k in SCORE_KEYS[:-1]]))
    return result


def _check_probs(probs: np.ndarray, labelled: np.ndarray, study_ids: Sequence[int] | None) -> None:
    """Raise MetricError naming the first labelled row that cannot be scored."""
    checks = (
        (~np.isfinite(probs).all(axis=-1), "a non-finite probability"),
        ((probs < 0).any(axis=-1), "a negative probability"),
        (probs.sum(axis=-1) <= 0, "probabilities summing to 0"),
    )
    for bad, what in checks:
        bad = bad & labelled
        if bad.any():
            s, t = (int(v) for v in np.argwhere(bad)[0])
            name = (
                make_row_id(study_ids[s], *_target_parts(t))
                if study_ids is not None
                else f"study index {s}, target {TARGETS[t]}"
            )
            raise MetricError(f"row {name} has {what}: {probs[s, t].tolist()}")


def _target_parts(index: int) -> tuple[str, str]:
    """(condition, level) of TARGETS[index]."""
    ci, li = divmod(index, len(LEVELS))
    return CONDITIONS[ci], LEVELS[li]


def labels_array(solution: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """A wide (study_id + TARGETS, severity strings) or long (study_id, condition, level,
    severity 0/1/2) label table -> (study_ids (S,) int64, codes (S, 25) int, -1 = unlabelled)."""
    if "severity" in solution.columns:
        solution = long_to_wide(solution)
    missing = [c for c in ("study_id", *TARGETS) if c not in solution.columns]
    if missing:
        raise MetricError(
            "labels must be a wide table (study_id + 25 targets) or a long one "
            f"(study_id, condition, level, severity); missing: {', '.join(missing[:5])}"
        )
    study_ids = solution["study_id"].to_numpy(dtype=np.int64)
    if len(np.unique(study_ids)) != len(study_ids):
        raise MetricError("labels repeat a study_id")
    severity = labels_to_long(solution)["severity"]  # study-major, TARGETS order
    codes = severity.fillna(-1).to_numpy(dtype=np.int64).reshape(len(study_ids), len(TARGETS))
    return study_ids, codes


def submission_array(
    submission: pd.DataFrame, study_ids: np.ndarray, labels: np.ndarray | None = None
) -> np.ndarray:
    """Submission rows -> probs (S, 25, 3) aligned to `study_ids`, NaN where a row is absent.

    Rows for other studies are ignored. With `labels` (S, 25) given, a labelled row missing from
    the submission raises MetricError naming it (and how many others are missing).
    """
    missing_cols = [c for c in ("row_id", *PROB_COLUMNS) if c not in submission.columns]
    if missing_cols:
        raise MetricError(f"submission lacks columns: {', '.join(missing_cols)}")
    row_ids = [make_row_id(s, *_target_parts(t)) for s in study_ids for t in range(len(TARGETS))]
    sub = submission.drop_duplicates("row_id", keep="first").set_index("row_id")
    values = sub.reindex(row_ids)[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    probs = values.reshape(len(study_ids), len(TARGETS), len(PROB_COLUMNS))
    if labels is not None:
        present = pd.Index(row_ids).isin(sub.index).reshape(len(study_ids), len(TARGETS))
        lacking = (labels >= 0) & ~present
        if lacking.any():
            s, t = (int(v) for v in np.argwhere(lacking)[0])
            more = int(lacking.sum()) - 1
            extra = f" (and {more} other labelled rows)" if more else ""
            raise MetricError(
                f"submission lacks labelled row {row_ids[s * len(TARGETS) + t]}{extra}"
            )
    return probs


def score(solution: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
    """The official score of `submission` (row_id + normal_mild, moderate, severe) against
    `solution` (wide or long labels). Every labelled row must be present; extra rows are
    ignored. Returns {spinal, foraminal, subarticular, any_severe_spinal, score}."""
    study_ids, labels = labels_array(solution)
    if submission["row_id"].duplicated().any():
        dup = submission.loc[submission["row_id"].duplicated(), "row_id"].iloc[0]
        raise MetricError(f"submission repeats row {dup}")
    probs = submission_array(submission, study_ids, labels)
    return score_arrays(labels, probs, study_ids.tolist())


def score_files(labels_csv: str | Path, submission_csv: str | Path) -> dict[str, float]:
    """`score` of two CSV files (train.csv format, submission format). Reader errors are
    `lsdc.io.tables.TableError`; scoring errors `MetricError` (both ValueError)."""
    return score(read_train_labels(labels_csv), read_submission(submission_csv))
