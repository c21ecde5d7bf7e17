from __future__ import annotations

import numpy as np
import pytest

from lsdc.training.folds import load_folds, make_folds, save_folds


def test_folds_are_study_wise_balanced_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=(60, 25), p=[0.8, 0.15, 0.05])
    ids = list(range(100, 160))
    folds = make_folds(ids, labels, 5, seed=1)
    assert sorted(np.bincount(folds)) == [12] * 5
    np.testing.assert_array_equal(folds, make_folds(ids, labels, 5, seed=1))
    severe_spinal = (labels[:, :5] == 2).any(axis=1)
    per_fold = [severe_spinal[folds == k].sum() for k in range(5)]
    assert max(per_fold) - min(per_fold) <= 1
    path = save_folds(tmp_path / "folds.csv", ids, folds)
    assert load_folds(path) == dict(zip(ids, folds.tolist(), strict=True))


def test_too_few_studies_for_folds():
    with pytest.raises(ValueError, match="folds"):
        make_folds([1, 2], np.zeros((2, 25), int), 3)
    # tiny sets fall back to plain K-fold rather than failing
    folds = make_folds([1, 2, 3], np.zeros((3, 25), int), 3)
    assert sorted(folds) == [0, 1, 2]
