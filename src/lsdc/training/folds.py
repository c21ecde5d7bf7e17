"""Study-wise stratified K folds, saved with the run (`folds.csv`: study_id,fold)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.constants import SEVERITY_INDEX
from lsdc.fileio import atomic_write_text
from lsdc.metrics import GROUP_TARGETS

FOLDS_FILE = "folds.csv"


def study_strata(labels: np.ndarray) -> np.ndarray:
    """A stratum per study from its labels (n, 25): 2 = any Severe spinal level, 1 = any other
    Severe, 0 = none; plus 3 x (a Moderate-or-worse share above the median) so folds also share
    the burden of disease."""
    labels = np.asarray(labels)
    severe = labels == SEVERITY_INDEX["Severe"]
    spinal = severe[:, GROUP_TARGETS["spinal"]].any(axis=1)
    kind = np.where(spinal, 2, np.where(severe.any(axis=1), 1, 0))
    abnormal = (labels >= SEVERITY_INDEX["Moderate"]).sum(axis=1)
    return kind + 3 * (abnormal > np.median(abnormal))


def make_folds(
    study_ids: Sequence[int], labels: np.ndarray, n_folds: int, seed: int = 42
) -> np.ndarray:
    """Fold (0..n_folds-1) of every study, stratified by `study_strata`; strata too small to
    spread over the folds are merged (finally into plain shuffled K-fold)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(study_ids)
    if n_folds < 2 or n_folds > n:
        raise ValueError(f"need 2 <= folds <= studies, got {n_folds} folds for {n} studies")
    strata = study_strata(labels)
    for key in (strata, strata % 3, (strata % 3) == 2):
        _, counts = np.unique(key, return_counts=True)
        if counts.min() >= n_folds:
            splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
            splits = splitter.split(np.zeros(n), key)
            break
    else:
        splits = KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n))
    folds = np.full(n, -1, np.int64)
    for k, (_, val) in enumerate(splits):
        folds[val] = k
    return folds


def save_folds(path: str | Path, study_ids: Sequence[int], folds: np.ndarray) -> Path:
    frame = pd.DataFrame({"study_id": np.asarray(study_ids, np.int64), "fold": folds})
    return atomic_write_text(path, frame.to_csv(index=False))


def load_folds(path: str | Path) -> dict[int, int]:
    """study_id -> fold, from a `folds.csv`."""
    frame = pd.read_csv(path)
    if list(frame.columns) != ["study_id", "fold"]:
        raise ValueError(f"{path}: expected columns study_id,fold, found {list(frame.columns)}")
    return dict(zip(frame["study_id"].astype(int), frame["fold"].astype(int), strict=True))
