"""Slice relevance at scale (issue 10): linear-time members, the fitted vote, and inference
that selects the same slices as the per-slice reference implementation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lsdc.preprocess.slice_relevance import (
    ENSEMBLE,
    MODEL_NAMES,
    ModelConfig,
    VoteSeries,
    fit_member,
    fit_vote_weights,
    load_models,
    soft_vote,
    train_slice_relevance,
    weight_grid,
)
from lsdc.preprocess.slice_relevance.models import forest_proba
from lsdc.preprocess.slice_relevance.persist import load_skops, save_models

FAST = ["folds=2", "models.rf_trees=40", "models.xgb_trees=30", "models.mlp_max_iter=200"]
SAG_ORIENT = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])


# --------------------------------------------------------------------------- the vote


def test_weight_grid_is_the_simplex_with_every_single_member():
    grid = weight_grid(4, 10)
    assert grid.shape == (286, 4)  # C(13, 3)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    for i in range(4):
        assert any(np.array_equal(row, np.eye(4)[i]) for row in grid)


def _random_series(rng, n, names, good):
    """Series of 12 slices, one task; member `good` puts its peak on the truth, the others on
    random slices."""
    out = []
    for _ in range(n):
        truth = int(rng.integers(12))
        proba = {}
        for m in names:
            p = rng.uniform(0, 0.1, size=(12, 2))
            peak = truth if m == good else int(rng.integers(12))
            p[peak, 1] = 0.9
            proba[m] = p
        out.append(VoteSeries(proba, {"t": [truth]}))
    return out


def test_fitted_vote_is_never_worse_than_its_best_member_on_its_data():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    for good in names:
        series = _random_series(rng, 30, names, good)
        w = fit_vote_weights(series, names, ["t"])
        assert sum(w.values()) == pytest.approx(1.0)
        hits = {
            m: sum(int(np.argmax(s.proba[m][:, 1])) == s.targets["t"][0] for s in series)
            for m in names
        }
        ens = sum(int(np.argmax(soft_vote(s.proba, w)[:, 1])) == s.targets["t"][0] for s in series)
        assert ens >= max(hits.values())
        assert w[good] > 0


def test_fitted_vote_likelihood_is_never_below_the_best_member():
    from lsdc.preprocess.slice_relevance.vote import vote_log_likelihood

    rng = np.random.default_rng(3)
    names = ["a", "b", "c", "d"]
    series = _random_series(rng, 25, names, "c")
    w = fit_vote_weights(series, names, ["t"])
    grid = np.vstack([np.eye(4), [[w[n] for n in names]]])
    ll = vote_log_likelihood(series, names, ["t"], grid)
    assert ll[-1] >= ll[:4].max() - 1e-9
    assert max(w, key=w.get) == "c"


def test_vote_defaults_to_equal_weights_without_labels_or_steps():
    names = ["a", "b"]
    s = [VoteSeries({"a": np.ones((3, 2)), "b": np.ones((3, 2))}, {})]
    assert fit_vote_weights(s, names, ["t"]) == {"a": 1.0, "b": 1.0}
    s[0] = VoteSeries(s[0].proba, {"t": [1]})
    assert fit_vote_weights(s, names, ["t"], steps=0) == {"a": 1.0, "b": 1.0}


def test_soft_vote_leaves_out_members_of_weight_zero_without_changing_bits():
    rng = np.random.default_rng(1)
    p = {m: rng.uniform(size=(7, 3)) for m in "abc"}
    w = {"a": 0.3, "b": 0.0, "c": 0.7}
    full = soft_vote(p, w)
    assert full.tobytes() == soft_vote({"a": p["a"], "c": p["c"]}, w).tobytes()


# --------------------------------------------------------------------------- the members


def _toy_training(rng, studies=6, slices=20):
    x, y, g = [], [], []
    for s in range(studies):
        labels = np.zeros(slices, dtype=np.int64)
        labels[rng.choice(slices, 2, replace=False)] = [1, 2]
        x.append(rng.normal(size=(slices, 12)) + labels[:, None])
        y.append(labels)
        g.append(np.full(slices, 100 + s))
    return np.concatenate(x), np.concatenate(y), np.concatenate(g)


def test_svm_is_a_kernel_approximation_calibrated_on_study_folds(tmp_path):
    rng = np.random.default_rng(0)
    x, y, groups = _toy_training(rng)
    model = fit_member("svm", ModelConfig(svm_components=30), 0, x, y, groups)
    assert [name for name, _ in model.steps] == ["scale", "kernel", "svc"]
    assert type(model.named_steps["kernel"]).__name__ == "Nystroem"
    assert type(model.named_steps["svc"].estimator).__name__ == "LinearSVC"
    assert model.named_steps["svc"].cv.get_n_splits() == 3
    p = model.predict_proba(x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    # The persisted model loads under the trusted-type list (GroupKFold included).
    import skops.io as sio

    path = tmp_path / "svm.skops"
    path.write_bytes(sio.dumps(model))
    np.testing.assert_array_equal(load_skops(path).predict_proba(x), p)


def test_svm_calibration_folds_fit_small_training_sets():
    rng = np.random.default_rng(0)
    x, y, groups = _toy_training(rng, studies=3)
    with pytest.raises(ValueError, match="at least 2 studies"):
        fit_member("svm", ModelConfig(), 0, x, y, np.zeros_like(groups))
    # Task 2 labelled in only two series: two calibration folds, not three.
    y[y == 2] = 0
    y[[5, 25]] = 2
    model = fit_member("svm", ModelConfig(svm_components=20), 0, x, y, groups)
    assert model.named_steps["svc"].cv.get_n_splits() == 2
    y[25] = 0
    with pytest.raises(ValueError, match="2 labelled series per task"):
        fit_member("svm", ModelConfig(), 0, x, y, groups)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_members_cap_their_work_beyond_the_phantom_sizes():
    rng = np.random.default_rng(0)
    x, y, groups = _toy_training(rng, studies=10)  # 200 slices
    cfg = ModelConfig(rf_trees=5, rf_max_samples=50, mlp_max_updates=4, mlp_batch_size=50)
    rf = fit_member("random_forest", cfg, 0, x, y, groups)
    assert rf.max_samples == 50
    mlp = fit_member("mlp", cfg, 0, x, y, groups)
    assert mlp.named_steps["mlp"].max_iter == 1  # 4 updates / 4 batches per epoch
    # Below the caps nothing changes: every slice, every epoch.
    big = ModelConfig(rf_trees=5, mlp_max_iter=7)
    assert fit_member("random_forest", big, 0, x, y, groups).max_samples is None
    assert fit_member("mlp", big, 0, x, y, groups).named_steps["mlp"].max_iter == 7


def test_forest_proba_has_the_bits_of_predict_proba():
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x, y, _ = _toy_training(rng)
    rf = RandomForestClassifier(n_estimators=25, random_state=0).fit(x, y)
    for rows in (x[:1], x[:7], x):
        assert forest_proba(rf, rows).tobytes() == rf.predict_proba(rows).tobytes()


# --------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    root, _ = tiny_dataset
    out = tmp_path_factory.mktemp("relevance_scale_run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train_slice_relevance(root, out, overrides=FAST, progress=False)
    return root, out


def test_run_reports_and_saves_the_fitted_vote(run):
    import json

    _, out = run
    report = json.loads((out / "report.json").read_text())
    assert set(report["vote_weights"]) == set(report["fold_vote_weights"])
    for st, w in report["vote_weights"].items():
        assert set(w) == set(MODEL_NAMES) and sum(w.values()) == pytest.approx(1.0)
        assert len(report["fold_vote_weights"][st]) == 2  # one per fold
        fitted = report["fitted_vote_exact_on_oof"][st]
        assert set(fitted) == {*MODEL_NAMES, ENSEMBLE}
        slug = {"Sagittal T1": "sagittal_t1", "Sagittal T2/STIR": "sagittal_t2_stir"}
        saved = load_models(out / "models" / slug.get(st, "axial_t2")).weights
        assert saved == w
    assert "| series type | random_forest |" in (out / "report.md").read_text()


def test_equal_weight_runs_still_load_and_vote_equally(run, tmp_path):
    _, out = run
    m = load_models(out / "models" / "axial_t2")
    m.weights = {n: 1.0 for n in m.models}
    save_models(m, tmp_path / "axial")
    again = load_models(tmp_path / "axial")
    assert again.weights == {n: 1.0 for n in MODEL_NAMES}
