"""Calibration fitted on OOF: temperature and any-severe scale, cross-fitting, the run file."""

from __future__ import annotations

import numpy as np
import pytest

from lsdc.inference.calibration import (
    Calibration,
    apply_calibration,
    cross_fitted,
    fit_calibration,
)
from lsdc.metrics import score_arrays


def _rows(n: int, seed: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the real class balance and predictions that point at the true class
    with `confidence` logits: > about 1.5 over-confident, < 1 timid for this noise level."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=(n, 25), p=[0.77, 0.16, 0.07])
    noisy = np.where(rng.random((n, 25)) < 0.35, rng.integers(0, 3, (n, 25)), labels)
    logits = np.eye(3)[noisy] * confidence
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return labels, probs


def test_identity_changes_nothing_and_rows_stay_normalised():
    _, probs = _rows(20, 0, 2.0)
    np.testing.assert_allclose(apply_calibration(probs, Calibration()), probs, atol=1e-9)
    cal = apply_calibration(probs, Calibration(temperature=2.0, severe_scale=3.0))
    np.testing.assert_allclose(cal.sum(-1), 1.0)
    # the scale moves only spinal Severe: a foraminal row keeps its order, a spinal one grows
    assert cal[:, 0, 2].mean() > apply_calibration(probs, Calibration(2.0, 1.0))[:, 0, 2].mean()


def test_over_confident_predictions_are_softened_and_score_better():
    labels, probs = _rows(300, 1, 6.0)
    cal = fit_calibration(labels, probs)
    assert cal.temperature > 1.5
    before = score_arrays(labels, probs)["score"]
    assert score_arrays(labels, apply_calibration(probs, cal))["score"] < before - 0.1


def test_fit_never_makes_the_fitted_rows_worse():
    labels, probs = _rows(200, 2, 1.2)
    cal = fit_calibration(labels, probs)
    before = score_arrays(labels, probs)["score"]
    assert score_arrays(labels, apply_calibration(probs, cal))["score"] <= before + 1e-12
    assert fit_calibration(np.full((3, 25), -1), probs[:3]) == Calibration()


def test_cross_fitting_uses_only_the_other_folds():
    labels, probs = _rows(200, 3, 6.0)
    folds = np.arange(200) % 2
    out = cross_fitted(labels, probs, folds)
    expect = apply_calibration(
        probs[folds == 0], fit_calibration(labels[folds == 1], probs[folds == 1])
    )
    np.testing.assert_allclose(out[folds == 0], expect)
    np.testing.assert_array_equal(cross_fitted(labels, probs, np.zeros(200, int)), probs)


def test_file_round_trip_and_bad_file_is_named(tmp_path):
    path = tmp_path / "calibration.json"
    Calibration(1.3, 0.7).save(path)
    assert Calibration.load(path) == Calibration(1.3, 0.7)
    path.write_text('{"temperature": -1, "severe_scale": 1}')
    with pytest.raises(ValueError, match="calibration.json"):
        Calibration.load(path)
