"""The ensemble: pooling with missing models, fitted weights, honest OOF, portable file."""

import json

import numpy as np
import pytest

from lsdc.inference.calibration import Calibration, apply_calibration, fit_calibration
from lsdc.inference.ensemble import (
    SHRINK,
    Ensemble,
    fit_ensemble,
    load_ensemble,
    paired_se,
    save_ensemble,
)
from lsdc.metrics import score_arrays


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(3, size=(n, 25), p=[0.7, 0.2, 0.1])


def _informative(labels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities leaning toward the true class by `strength` (0 = pure noise)."""
    logits = rng.normal(0, 1, (*labels.shape, 3))
    logits[np.arange(labels.shape[0])[:, None], np.arange(25)[None], labels] += strength
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def _write_run(path, ids, probs, labels):
    from lsdc.fileio import save_npz

    path.mkdir(parents=True)
    save_npz(path / "oof.npz", {"study_ids": ids, "probs": probs, "labels": labels}, {})
    return path


def test_combine_pools_only_the_models_that_saw_a_study():
    prior = np.full((25, 3), [0.5, 0.3, 0.2])
    ens = Ensemble(["a", "b"], ["a", "b"], np.full((3, 2), 0.5), Calibration(), prior)
    a = np.tile([0.8, 0.1, 0.1], (3, 25, 1))
    b = np.tile([0.2, 0.2, 0.6], (3, 25, 1))
    b[1] = np.nan  # what a model that could not see the study leaves
    avail = np.array([[True, True], [True, False], [False, False]])
    out = ens.combine([a, b], avail)
    np.testing.assert_allclose(out[0], np.tile([0.5, 0.15, 0.35], (25, 1)))
    np.testing.assert_allclose(out[1], a[1])
    np.testing.assert_allclose(out[2], prior)
    np.testing.assert_allclose(out.sum(-1), 1.0)


def test_a_model_that_only_adds_noise_is_dropped_and_the_report_is_cross_fitted(tmp_path):
    # The shrink toward equal weights kept a useless model in the pool: on the learning
    # curve's 200 studies the pool scored 0.502 out of fold against 0.472 for the multitask
    # model alone. Here the pool scores 0.32 against 0.28 for the good model alone.
    rng = np.random.default_rng(0)
    ids = np.arange(100, 260)
    labels = _labels(len(ids), rng)
    good = _informative(labels, 2.0, rng)
    noise = _informative(labels, 0.0, rng)
    runs = {
        "good": _write_run(tmp_path / "good", ids, good, labels),
        "noise": _write_run(tmp_path / "noise", ids[::-1], noise[::-1], labels[::-1]),
    }
    ens, report = fit_ensemble(runs, folds=4)
    assert report.chosen == "good"
    np.testing.assert_array_equal(ens.weights, [[1.0, 0.0]] * 3)
    assert report.studies == len(ids) and report.folds == 4
    assert report.pool["score"] - report.models_calibrated["good"]["score"] > report.pool_se > 0
    assert report.score["score"] < report.pool["score"] - 0.01
    assert report.score["score"] <= report.models_calibrated["good"]["score"] + 1e-9
    assert report.score["score"] < report.class_prior["score"]
    # Cross-fitted: never better than the same ensemble scored on the rows it was fitted on.
    in_sample = score_arrays(labels, ens.combine([good, noise]))["score"]
    assert report.score["score"] >= in_sample - 1e-9
    # The saved ensemble is the good model with its own calibration.
    cal = fit_calibration(labels, good, shrink=SHRINK)
    np.testing.assert_allclose(ens.combine([good, noise]), apply_calibration(good, cal))
    # A study no model sees gets the best constant: the weighted prior of the training labels.
    from lsdc.training.engine import weighted_class_prior

    np.testing.assert_allclose(ens.prior, weighted_class_prior(labels))


def test_a_constant_model_stays_in_the_pool_where_mixing_it_helps(tmp_path):
    # Not a rule that single models win: a weakly informative, overconfident model gains from a
    # linear pool with the best constant (a smoothing its calibration cannot give).
    from lsdc.training.engine import weighted_class_prior

    rng = np.random.default_rng(3)
    ids = np.arange(160)
    labels = _labels(len(ids), rng)
    const = np.tile(weighted_class_prior(labels), (len(ids), 1, 1))
    runs = {
        "weak": _write_run(tmp_path / "weak", ids, _informative(labels, 1.0, rng), labels),
        "const": _write_run(tmp_path / "const", ids, const, labels),
    }
    ens, report = fit_ensemble(runs, folds=4)
    assert report.chosen == "pool" and (ens.weights[:, 1] > 0.1).all()
    assert report.score["score"] < report.models_calibrated["weak"]["score"]


def test_the_paired_standard_error_is_wide_for_a_gain_on_few_studies():
    # A pool better on three studies and worse on two: its gain is noise, and the standard
    # error says so. The same gain spread over every study is not.
    rng = np.random.default_rng(1)
    labels = _labels(60, rng)
    alone = _informative(labels, 1.5, rng)
    lumpy = alone.copy()
    lumpy[:3] = np.eye(3)[labels[:3]] * 0.9 + 0.1 / 3
    lumpy[3:5] = np.eye(3)[(labels[3:5] + 1) % 3] * 0.35 + 0.65 / 3
    steady = 0.8 * alone + 0.2 * _informative(labels, 1.5, rng)
    for pool, noise in ((lumpy, True), (steady, False)):
        gain = score_arrays(labels, alone)["score"] - score_arrays(labels, pool)["score"]
        assert gain > 0 and (gain < paired_se(labels, pool, alone)) == noise
    assert paired_se(labels, alone, alone) == 0.0
    # A study set whose only foraminal label is in one study: resamples without it score NaN
    # and are left out, not spread into the figure.
    sparse = labels.copy()
    sparse[1:, 5:15] = -1
    assert np.isfinite(paired_se(sparse, lumpy, alone))
    sparse[:, 5:15] = -1
    assert np.isnan(paired_se(sparse, lumpy, alone))


def test_a_model_kept_alone_falls_back_to_the_others_on_studies_it_could_not_see():
    prior = np.full((25, 3), 1 / 3)
    weights = np.array([[1.0, 0.0]] * 3)
    ens = Ensemble(["a", "b"], ["a", "b"], weights, Calibration(), prior)
    a = np.tile([0.8, 0.1, 0.1], (2, 25, 1))
    b = np.tile([0.2, 0.2, 0.6], (2, 25, 1))
    a[1] = np.nan
    out = ens.combine([a, b], np.array([[True, True], [False, True]]))
    np.testing.assert_allclose(out[0], a[0])
    np.testing.assert_allclose(out[1], b[1])


def test_saved_ensemble_names_runs_relative_to_itself(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.arange(40)
    labels = _labels(40, rng)
    runs = {"m": _write_run(tmp_path / "runs" / "m", ids, _informative(labels, 1.0, rng), labels)}
    ens, report = fit_ensemble(runs, folds=2)
    path = save_ensemble(ens, tmp_path / "runs" / "ensemble.json", report.to_dict())
    raw = json.loads(path.read_text())
    assert raw["runs"] == ["m"] and raw["oof"]["studies"] == 40
    back = load_ensemble(path)
    np.testing.assert_allclose(back.weights, ens.weights)
    assert back.run_dirs(path.parent) == [tmp_path / "runs" / "m"]


def test_load_ensemble_names_a_bad_file(tmp_path):
    bad = tmp_path / "ensemble.json"
    bad.write_text('{"format": 1, "models": ["a"]}')
    with pytest.raises(ValueError, match="ensemble.json"):
        load_ensemble(bad)


def test_calibration_fit_moves_off_the_identity_for_a_mildly_miscalibrated_model():
    # scipy's default Nelder-Mead start at 0 takes steps of 2.5e-4, where the metric moves by
    # less than the tolerance: the search stopped where it began (the identity).
    rng = np.random.default_rng(2)
    labels = _labels(200, rng)
    honest = _informative(labels, 1.0, rng)
    sharp = apply_calibration(honest, Calibration(temperature=0.9))
    cal = fit_calibration(labels, sharp)
    assert cal.temperature > 1.02 and cal.severe_scale > 1.02
    after = score_arrays(labels, apply_calibration(sharp, cal))["score"]
    assert after < score_arrays(labels, sharp)["score"] - 3e-4
