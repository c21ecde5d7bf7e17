"""Scores on a phantom's held-out truth: models next to the class prior, uniform and the oracle.

Input: a phantom (or any RSNA-format) dataset folder with `train.csv` and `truth/test_labels.csv`
(and `truth/studies.jsonl` for the oracle), and each model's test predictions as
(study_ids (n,), probs (n, 25, 3)). Output: `score_table`, a JSON-serialisable dict with the
four terms and the score of every model and baseline on the same rows, each model's ratio to
the class prior and the share of the prior -> oracle gap it closes. The demo's report and the
benchmarks both score through here, so their figures agree.

The oracle is what a model that measured every narrowing exactly could say: per metric group, a
multinomial logistic regression from the phantom's true narrowing fraction to the label, fitted
on the training studies. The labels' grader noise keeps its score above zero, so it marks the
attainable floor on the phantom better than a perfect (zero) score would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.constants import (
    PROB_COLUMNS,
    SEVERITIES,
    TARGETS,
    parse_row_id,
)
from lsdc.io.tables import read_submission, read_train_labels
from lsdc.metrics import GROUP_TARGETS, SCORE_KEYS, labels_array, score_arrays, submission_array

__all__ = [
    "BASELINES",
    "AlignedPredictions",
    "align_predictions",
    "class_prior_probs",
    "confusion_matrices",
    "gap_closed",
    "narrowing_table",
    "oracle_probs",
    "ratio",
    "read_submission_predictions",
    "score_table",
    "heldout_scores",
    "uniform_probs",
]

PRIOR, WEIGHTED, UNIFORM, ORACLE = "class prior", "weighted prior", "uniform", "oracle"
BASELINES: tuple[str, ...] = (PRIOR, WEIGHTED, UNIFORM, ORACLE)

Predictions = Mapping[str, tuple[np.ndarray, np.ndarray]]


def ratio(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """a[k] / b[k] for every key of `a` with a non-zero b[k]."""
    return {k: float(a[k] / b[k]) for k in a if b.get(k)}


def class_prior_probs(train_labels: np.ndarray, n: int) -> np.ndarray:
    """The class prior of `train_labels` (S, 25) codes (-1 = unlabelled), the same for each
    of `n` studies: (n, 25, 3)."""
    from lsdc.training.engine import class_prior  # torch: only when a prior is asked for

    prior = class_prior(np.asarray(train_labels))
    return np.repeat(prior[None], n, axis=0)


def uniform_probs(n: int) -> np.ndarray:
    """1/3 for every class of every target of `n` studies: (n, 25, 3)."""
    return np.full((n, len(TARGETS), len(SEVERITIES)), 1.0 / len(SEVERITIES))


def gap_closed(model: float, prior: float, oracle: float) -> float | None:
    """Share of the class prior -> oracle gap that a score of `model` closes:
    (prior - model) / (prior - oracle). 0 for the prior, 1 for the oracle, negative when worse
    than the prior; None when the gap is zero (nothing to close)."""
    gap = prior - oracle
    if gap == 0 or not np.isfinite(gap):
        return None
    return float((prior - model) / gap)


def narrowing_table(data_dir: str | Path) -> dict[int, np.ndarray]:
    """The phantom's true narrowing fraction (25,) per study, from truth/studies.jsonl."""
    path = Path(data_dir) / "truth" / "studies.jsonl"
    out: dict[int, np.ndarray] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        out[int(rec["study_id"])] = np.array([rec["narrowing"][t] for t in TARGETS], dtype=float)
    return out


def oracle_probs(data_dir: str | Path, study_ids: Sequence[int]) -> np.ndarray | None:
    """The oracle's probabilities (n, 25, 3) for `study_ids` (see the module docstring); None
    when the dataset has no truth/studies.jsonl. KeyError when a study is not in it."""
    from sklearn.linear_model import LogisticRegression

    data_dir = Path(data_dir)
    if not (data_dir / "truth" / "studies.jsonl").exists():
        return None
    fractions = narrowing_table(data_dir)
    ids, labels = labels_array(read_train_labels(data_dir / "train.csv"))
    x_train = np.stack([fractions[int(s)] for s in ids])
    x_test = np.stack([fractions[int(s)] for s in study_ids]).reshape(len(study_ids), -1)
    out = np.zeros((len(study_ids), labels.shape[1], len(SEVERITIES)))
    for idx in GROUP_TARGETS.values():
        f, y = x_train[:, idx].ravel(), labels[:, idx].ravel()
        keep = y >= 0
        # The quadratic term lets one model place both class boundaries (1/3 and 2/3 loss).
        clf = LogisticRegression(C=100.0, max_iter=2000)
        clf.fit(np.c_[f[keep], f[keep] ** 2], y[keep])
        ft = x_test[:, idx].ravel()
        p = np.zeros((len(ft), len(SEVERITIES)))
        p[:, clf.classes_] = clf.predict_proba(np.c_[ft, ft**2])
        out[:, idx] = p.reshape(len(study_ids), len(idx), len(SEVERITIES))
    return out


def read_submission_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A submission CSV -> (study_ids (n,), probs (n, 25, 3)), studies in order of first
    appearance. A study lacking any of its 25 rows is left out: it was not fully predicted, and
    scoring it would mix models' rows."""
    frame: pd.DataFrame = read_submission(path)  # validates every row id
    ids = np.array(list(dict.fromkeys(parse_row_id(r)[0] for r in frame["row_id"])), dtype=np.int64)
    probs = submission_array(frame, ids)
    complete = np.isfinite(probs).all(axis=(1, 2))
    return ids[complete], probs[complete]


@dataclass
class AlignedPredictions:
    """Every model's predictions on the same test rows.

    study_ids (n,) the truth's studies that every model predicted, in the truth's order;
    labels (n, 25) codes, -1 = unlabelled; probs {name: (n, 25, 3)}; test_studies: studies in
    the truth; predicted {name: how many of those the model predicted}."""

    study_ids: np.ndarray
    labels: np.ndarray
    probs: dict[str, np.ndarray]
    test_studies: int
    predicted: dict[str, int]


def align_predictions(data_dir: str | Path, predictions: Predictions) -> AlignedPredictions:
    """Restrict every model's (study_ids, probs) to the studies of truth/test_labels.csv that
    every model predicted, in the truth's order. FileNotFoundError without the truth file;
    ValueError when no study is common to all."""
    truth = Path(data_dir) / "truth" / "test_labels.csv"
    if not truth.exists():
        raise FileNotFoundError(f"{truth}: no held-out truth to score against")
    tids, tlabels = labels_array(read_train_labels(truth))
    common = np.ones(len(tids), dtype=bool)
    positions: dict[str, dict[int, int]] = {}
    predicted: dict[str, int] = {}
    for name, (ids, probs) in predictions.items():
        ids, probs = np.asarray(ids), np.asarray(probs)
        if probs.shape != (len(ids), len(TARGETS), len(PROB_COLUMNS)):
            raise ValueError(
                f"{name}: expected probs ({len(ids)}, {len(TARGETS)}, {len(PROB_COLUMNS)}) "
                f"for {len(ids)} study ids, got {probs.shape}"
            )
        positions[name] = {int(s): i for i, s in enumerate(ids)}
        has = np.array([int(s) in positions[name] for s in tids], dtype=bool)
        predicted[name] = int(has.sum())
        common &= has
    if not common.any():
        raise ValueError(f"no study of {truth} was predicted by every model ({predicted})")
    keep_ids = tids[common]
    probs_out = {
        name: np.asarray(predictions[name][1], dtype=np.float64)[
            [positions[name][int(s)] for s in keep_ids]
        ]
        for name in predictions
    }
    return AlignedPredictions(keep_ids, tlabels[common], probs_out, len(tids), predicted)


def score_table(data_dir: str | Path, predictions: Predictions) -> dict[str, Any]:
    """Every named model and the baselines scored on the phantom's test truth, same rows.

    predictions: {name: (study_ids (n,), probs (n, 25, 3))}. Rows scored: the studies of
    truth/test_labels.csv that every model predicted. Baselines: `class prior` (per-target class
    frequencies of all of train.csv), `weighted prior` (the same times the metric's severity
    weights, renormalised: the best constant), `uniform` (1/3 each) and, with truth/studies.jsonl,
    `oracle`. Returns
      {"studies": rows scored, "test_studies": studies in the truth,
       "predicted": {model: truth studies it predicted}, "models": [names],
       "rows": {name: {"kind": "model" | "baseline", spinal, foraminal, subarticular,
                       any_severe_spinal, score, "ratio_to_prior": {term: ratio},
                       "gap_closed": share of the prior -> oracle gap or None}}}
    """
    clash = [n for n in predictions if n in BASELINES]
    if clash:
        raise ValueError(f"model names {clash} are reserved for the baselines {BASELINES}")
    data_dir = Path(data_dir)
    aligned = align_predictions(data_dir, predictions)
    n = len(aligned.study_ids)
    _, train_labels = labels_array(read_train_labels(data_dir / "train.csv"))
    ids = aligned.study_ids.tolist()

    scored: dict[str, dict[str, float]] = {
        name: score_arrays(aligned.labels, p, ids) for name, p in aligned.probs.items()
    }
    scored[PRIOR] = score_arrays(aligned.labels, class_prior_probs(train_labels, n))
    # The metric-optimal constant (prior x severity weights): what a model that reads nothing
    # from its images can still reach, so the bar a model must clear to be seeing anything.
    from lsdc.training.engine import weighted_class_prior

    weighted = np.repeat(weighted_class_prior(np.asarray(train_labels))[None], n, axis=0)
    scored[WEIGHTED] = score_arrays(aligned.labels, weighted)
    scored[UNIFORM] = score_arrays(aligned.labels, uniform_probs(n))
    oracle = oracle_probs(data_dir, ids)
    if oracle is not None:
        scored[ORACLE] = score_arrays(aligned.labels, oracle)

    prior = scored[PRIOR]
    rows: dict[str, dict[str, Any]] = {}
    for name, terms in scored.items():
        row: dict[str, Any] = {"kind": "baseline" if name in BASELINES else "model"}
        row.update({k: float(terms[k]) for k in SCORE_KEYS})
        row["ratio_to_prior"] = ratio(terms, prior)
        row["gap_closed"] = (
            gap_closed(terms["score"], prior["score"], scored[ORACLE]["score"])
            if ORACLE in scored
            else None
        )
        rows[name] = row
    return {
        "studies": n,
        "test_studies": aligned.test_studies,
        "predicted": aligned.predicted,
        "models": list(predictions),
        "rows": rows,
    }


def heldout_scores(data_dir: str | Path, study_ids: np.ndarray, probs: np.ndarray) -> dict | None:
    """One model vs the class prior (and the oracle) on the test truth, in the benchmarks'
    layout: {studies, model, class_prior, ratio_model_to_prior[, oracle,
    share_of_prior_to_oracle_gap_closed]}; None when the dataset has no truth/test_labels.csv."""
    if not (Path(data_dir) / "truth" / "test_labels.csv").exists():
        return None
    table = score_table(data_dir, {"model": (study_ids, probs)})
    rows = table["rows"]

    def terms(name: str) -> dict[str, float]:
        return {k: rows[name][k] for k in SCORE_KEYS}

    out: dict[str, Any] = {
        "studies": table["studies"],
        "model": terms("model"),
        "class_prior": terms(PRIOR),
        "weighted_class_prior": terms(WEIGHTED),
        "ratio_model_to_prior": rows["model"]["ratio_to_prior"],
    }
    if ORACLE in rows:
        out["oracle"] = terms(ORACLE)
        out["share_of_prior_to_oracle_gap_closed"] = rows["model"]["gap_closed"]
    return out


def confusion_matrices(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """True vs argmax-predicted severity counts (3, 3) per metric group (rows: true), over the
    labelled entries of labels (n, 25) and probs (n, 25, 3)."""
    labels = np.asarray(labels)
    predicted = np.asarray(probs).argmax(axis=-1)
    k = len(SEVERITIES)
    out: dict[str, np.ndarray] = {}
    for group, idx in GROUP_TARGETS.items():
        y, p = labels[:, idx].ravel(), predicted[:, idx].ravel()
        keep = y >= 0
        out[group] = np.bincount(y[keep] * k + p[keep], minlength=k * k).reshape(k, k)
    return out
