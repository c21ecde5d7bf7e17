"""The official metric against hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from lsdc.constants import PROB_COLUMNS, SEVERITIES, TARGETS, make_row_id
from lsdc.io.tables import labels_to_long
from lsdc.metrics import (
    EPS,
    SCORE_KEYS,
    MetricError,
    score,
    score_arrays,
    weighted_log_loss,
)

SPINAL = [TARGETS.index(f"spinal_canal_stenosis_{lv}") for lv in ("l1_l2", "l2_l3")]


def wide_from_codes(study_ids: list[int], codes: np.ndarray) -> pd.DataFrame:
    """Wide label table from (S, 25) codes, -1 = empty cell."""
    out = {"study_id": np.asarray(study_ids, dtype=np.int64)}
    for j, target in enumerate(TARGETS):
        out[target] = pd.array(
            [SEVERITIES[c] if c >= 0 else None for c in codes[:, j]], dtype="string"
        )
    return pd.DataFrame(out)


def submission_from_probs(study_ids: list[int], probs: np.ndarray) -> pd.DataFrame:
    rows = []
    for s, sid in enumerate(study_ids):
        for t, target in enumerate(TARGETS):
            rows.append([f"{sid}_{target}", *probs[s, t]])
    return pd.DataFrame(rows, columns=["row_id", *PROB_COLUMNS])


@pytest.fixture
def case():
    """Three studies with mixed severities and a few unlabelled cells."""
    rng = np.random.default_rng(0)
    codes = rng.choice(3, size=(3, 25), p=[0.6, 0.25, 0.15])
    codes[0, 7] = codes[2, 24] = -1
    # Spinal: study 101 and 202 without a Severe level (max weight 2 and 1), 303 with one.
    codes[:, :5] = [[1, 0, 0, -1, 1], [-1, 0, 0, 0, 0], [2, 0, 0, -1, 1]]
    probs = rng.dirichlet([2, 1, 1], size=(3, 25))
    return [101, 202, 303], codes, probs


def test_perfect_prediction_scores_about_zero(case):
    ids, codes, _ = case
    probs = np.eye(3)[np.clip(codes, 0, None)]
    result = score(wide_from_codes(ids, codes), submission_from_probs(ids, probs))
    assert list(result) == list(SCORE_KEYS)
    for key, value in result.items():
        assert 0 <= value < 1e-12, key


def test_uniform_prediction(case):
    ids, codes, _ = case
    result = score(
        wide_from_codes(ids, codes), submission_from_probs(ids, np.full((3, 25, 3), 1 / 3))
    )
    for group in ("spinal", "foraminal", "subarticular"):
        assert result[group] == pytest.approx(math.log(3), abs=1e-12)
    # any_severe: prediction 1/3 for every study; study 303 is severe (weight 4, -log 1/3),
    # studies 101 and 202 are not (weight = their max spinal weight, -log 2/3).
    w = [max(2.0**c for c in codes[s, :5] if c >= 0) for s in range(2)]
    y_severe = [bool((codes[s, :5] == 2).any()) for s in range(2)]
    assert not any(y_severe)
    expected = (w[0] * math.log(1.5) + w[1] * math.log(1.5) + 4 * math.log(3)) / (sum(w) + 4)
    assert result["any_severe_spinal"] == pytest.approx(expected, abs=1e-12)
    assert result["score"] == pytest.approx((3 * math.log(3) + expected) / 4, abs=1e-12)


def test_hand_computed_two_studies():
    # Only spinal l1_l2 and l2_l3 labelled, plus one foraminal and one subarticular cell.
    codes = np.full((2, 25), -1)
    codes[0, SPINAL] = [0, 2]  # study 1: Normal/Mild, Severe
    codes[1, SPINAL] = [1, 1]  # study 2: Moderate, Moderate
    codes[0, TARGETS.index("left_neural_foraminal_narrowing_l4_l5")] = 1
    codes[1, TARGETS.index("right_subarticular_stenosis_l5_s1")] = 2
    probs = np.full((2, 25, 3), np.nan)  # unlabelled rows may hold anything
    probs[0, SPINAL] = [[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]
    probs[1, SPINAL] = [[0.1, 0.6, 0.3], [0.5, 0.4, 0.1]]
    probs[0, TARGETS.index("left_neural_foraminal_narrowing_l4_l5")] = [0.5, 0.25, 0.25]
    probs[1, TARGETS.index("right_subarticular_stenosis_l5_s1")] = [0.1, 0.1, 0.8]
    result = score_arrays(codes, probs)
    spinal = 1 * -math.log(0.8) + 4 * -math.log(0.5) + 2 * -math.log(0.6) + 2 * -math.log(0.4)
    assert result["spinal"] == pytest.approx(spinal / 9, abs=1e-12)
    assert result["foraminal"] == pytest.approx(-math.log(0.25), abs=1e-12)
    assert result["subarticular"] == pytest.approx(-math.log(0.8), abs=1e-12)
    # any_severe: study 1 label 1, p = max(0.1, 0.5), w 4; study 2 label 0, p = 0.3, w 2.
    any_severe = (4 * -math.log(0.5) + 2 * -math.log(1 - 0.3)) / 6
    assert result["any_severe_spinal"] == pytest.approx(any_severe, abs=1e-12)
    assert result["score"] == pytest.approx(
        (spinal / 9 - math.log(0.25) - math.log(0.8) + any_severe) / 4, abs=1e-12
    )


def test_rows_are_normalised_before_the_log(case):
    ids, codes, probs = case
    wide = wide_from_codes(ids, codes)
    base = score(wide, submission_from_probs(ids, probs))
    scale = np.random.default_rng(1).uniform(0.2, 9.0, size=(3, 25, 1))
    scaled = score(wide, submission_from_probs(ids, probs * scale))
    for key in SCORE_KEYS:
        assert scaled[key] == pytest.approx(base[key], abs=1e-12)


def test_zero_probability_is_clipped_not_infinite():
    loss = weighted_log_loss(np.array([2]), np.array([[1.0, 0.0, 0.0]]), np.array([4.0]))
    assert loss == pytest.approx(-math.log(EPS))
    assert math.isfinite(loss)


def test_missing_labelled_row_is_an_error_naming_it(case):
    ids, codes, probs = case
    sub = submission_from_probs(ids, probs)
    lacking = make_row_id(202, "left_subarticular_stenosis", "l2_l3")
    sub = sub[sub.row_id != lacking]
    with pytest.raises(MetricError, match=lacking):
        score(wide_from_codes(ids, codes), sub)


def test_unlabelled_rows_may_be_absent_and_are_ignored(case):
    ids, codes, probs = case
    wide = wide_from_codes(ids, codes)
    base = score(wide, submission_from_probs(ids, probs))
    changed = probs.copy()
    changed[codes < 0] = [0.0, 0.0, 1.0]  # a confident severe on unlabelled cells, spinal too
    assert score(wide, submission_from_probs(ids, changed)) == base
    sub = submission_from_probs(ids, probs)
    unlabelled = {f"{ids[s]}_{TARGETS[t]}" for s, t in np.argwhere(codes < 0)}
    assert score(wide, sub[~sub.row_id.isin(unlabelled)]) == base


def test_extra_rows_are_ignored(case):
    ids, codes, probs = case
    wide = wide_from_codes(ids, codes)
    base = score(wide, submission_from_probs(ids, probs))
    extra = submission_from_probs([999], np.full((1, 25, 3), np.nan))
    shuffled = pd.concat([extra, submission_from_probs(ids, probs)]).sample(frac=1, random_state=0)
    assert score(wide, shuffled) == pytest.approx(base, abs=1e-15)


def test_any_severe_leaves_out_studies_without_spinal_labels(case):
    ids, codes, probs = case
    codes = codes.copy()
    codes[0, :5] = -1
    with_study = score_arrays(codes, probs)
    without = score_arrays(codes[1:], probs[1:])
    assert with_study["any_severe_spinal"] == pytest.approx(without["any_severe_spinal"])


def test_long_labels_score_like_wide(case):
    ids, codes, probs = case
    wide = wide_from_codes(ids, codes)
    sub = submission_from_probs(ids, probs)
    assert score(labels_to_long(wide), sub) == score(wide, sub)


def test_matches_sklearn_log_loss_per_group(case):
    from sklearn.metrics import log_loss

    ids, codes, probs = case
    result = score_arrays(codes, probs)
    mask = codes[:, 5:15] >= 0
    y = codes[:, 5:15][mask]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = log_loss(y, probs[:, 5:15][mask], sample_weight=2.0**y, labels=[0, 1, 2])
    assert result["foraminal"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("value", "match"),
    [([0.5, -0.1, 0.6], "negative"), ([np.nan, 0.5, 0.5], "non-finite"), ([0, 0, 0], "sum")],
)
def test_unscorable_labelled_row_named(case, value, match):
    ids, codes, probs = case
    probs = probs.copy()
    t = TARGETS.index("right_neural_foraminal_narrowing_l3_l4")
    probs[1, t] = value
    named = f"row 202_right_neural_foraminal_narrowing_l3_l4 has .*{match}"
    with pytest.raises(MetricError, match=named):
        score_arrays(codes, probs, ids)
    with pytest.raises(MetricError, match=named):
        score(wide_from_codes(ids, codes), submission_from_probs(ids, probs))
    probs[1, t] = [0.2, 0.3, 0.5]
    probs[0, 7] = value  # an unlabelled cell: never read
    score_arrays(codes, probs, ids)


def test_empty_group_is_nan_not_dropped():
    codes = np.full((1, 25), -1)
    codes[0, 0] = 0
    result = score_arrays(codes, np.full((1, 25, 3), 1 / 3))
    assert math.isnan(result["foraminal"]) and math.isnan(result["score"])
    assert result["spinal"] == pytest.approx(math.log(3))


def test_shape_errors():
    with pytest.raises(MetricError, match="expected labels"):
        score_arrays(np.zeros((2, 25), int), np.zeros((2, 24, 3)))
