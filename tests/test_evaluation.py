"""lsdc.evaluation on a tiny hand-made truth folder (no images, no training)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsdc import evaluation as ev
from lsdc.constants import CONDITIONS, LEVELS, PROB_COLUMNS, SEVERITIES, TARGETS, make_row_id
from lsdc.metrics import score_arrays

N_TRAIN, N_TEST = 40, 6
TEST_IDS = [1001 + i for i in range(N_TEST)]


def _codes_from_narrowing(f: np.ndarray) -> np.ndarray:
    """The phantom's rule without grader noise: <1/3, 1/3-2/3, >2/3 loss of space."""
    return np.digitize(f, [1 / 3, 2 / 3])


def _write_labels(path: Path, ids: list[int], codes: np.ndarray) -> None:
    cells = np.where(codes >= 0, np.array(SEVERITIES, dtype=object)[np.clip(codes, 0, 2)], "")
    frame = pd.DataFrame(cells, columns=list(TARGETS))
    frame.insert(0, "study_id", ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


@pytest.fixture
def truth_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """train.csv, truth/test_labels.csv (one unlabelled cell) and truth/studies.jsonl."""
    rng = np.random.default_rng(0)
    train_ids = list(range(1, N_TRAIN + 1))
    fractions = rng.uniform(0, 1, size=(N_TRAIN + N_TEST, len(TARGETS)))
    codes = _codes_from_narrowing(fractions)
    _write_labels(tmp_path / "train.csv", train_ids, codes[:N_TRAIN])
    test_codes = codes[N_TRAIN:].copy()
    test_codes[0, 3] = -1  # an empty cell: not scored
    _write_labels(tmp_path / "truth" / "test_labels.csv", TEST_IDS, test_codes)
    with (tmp_path / "truth" / "studies.jsonl").open("w") as fh:
        for sid, f in zip(train_ids + TEST_IDS, fractions, strict=True):
            rec = {"study_id": sid, "narrowing": dict(zip(TARGETS, f.tolist(), strict=True))}
            fh.write(json.dumps(rec) + "\n")
    return tmp_path, test_codes


def _one_hot(codes: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    probs = np.full((*codes.shape, 3), eps)
    np.put_along_axis(probs, np.clip(codes, 0, 2)[..., None], 1.0, axis=-1)
    return probs / probs.sum(-1, keepdims=True)


def test_gap_closed_hand_cases() -> None:
    assert ev.gap_closed(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert ev.gap_closed(0.2, 0.8, 0.2) == pytest.approx(1.0)
    assert ev.gap_closed(0.8, 0.8, 0.2) == pytest.approx(0.0)
    assert ev.gap_closed(1.1, 0.8, 0.2) == pytest.approx(-0.5)
    assert ev.gap_closed(0.5, 0.7, 0.7) is None


def test_baseline_probs() -> None:
    labels = np.full((3, len(TARGETS)), -1)
    labels[:2, 0] = 0  # two Normal/Mild on the first target, nothing else labelled
    prior = ev.class_prior_probs(labels, 4)
    assert prior.shape == (4, len(TARGETS), 3)
    # +1 smoothing per class: (2 + 1) / (2 + 3) for Normal/Mild, 1/5 for the others
    np.testing.assert_allclose(prior[:, 0], [[0.6, 0.2, 0.2]] * 4)
    np.testing.assert_allclose(prior[:, 1], 1 / 3)
    np.testing.assert_allclose(ev.uniform_probs(2), 1 / 3)
    assert ev.uniform_probs(2).shape == (2, len(TARGETS), 3)


def test_score_table_perfect_beats_prior_and_oracle_closes_whole_gap(truth_dir) -> None:
    data, codes = truth_dir
    table = ev.score_table(data, {"perfect": (np.array(TEST_IDS), _one_hot(codes))})
    rows = table["rows"]
    assert list(rows) == ["perfect", "class prior", "weighted prior", "uniform", "oracle"]
    assert table["studies"] == N_TEST and table["test_studies"] == N_TEST
    assert rows["perfect"]["score"] < 1e-4 < rows["class prior"]["score"]
    assert rows["oracle"]["gap_closed"] == pytest.approx(1.0)
    assert rows["class prior"]["gap_closed"] == pytest.approx(0.0)
    assert rows["perfect"]["gap_closed"] > 1.0  # beats the oracle: it saw the labels
    assert rows["class prior"]["ratio_to_prior"]["score"] == pytest.approx(1.0)
    assert rows["perfect"]["kind"] == "model" and rows["oracle"]["kind"] == "baseline"
    # noise-free labels: the oracle (true narrowing -> label) is far better than the prior
    assert rows["oracle"]["score"] < 0.5 * rows["class prior"]["score"]
    json.dumps(table, allow_nan=False)  # the report and demo.json store it as it is


def test_uniform_row_is_log3_per_group(truth_dir) -> None:
    data, codes = truth_dir
    table = ev.score_table(data, {"m": (np.array(TEST_IDS), ev.uniform_probs(N_TEST))})
    uniform = table["rows"]["uniform"]
    for group in ("spinal", "foraminal", "subarticular"):
        assert uniform[group] == pytest.approx(math.log(3))
    assert table["rows"]["m"]["score"] == pytest.approx(uniform["score"])


def test_rows_are_intersected(truth_dir) -> None:
    data, codes = truth_dir
    rng = np.random.default_rng(1)
    ids_a = np.array(TEST_IDS[:4])  # studies 0-3
    ids_b = np.array([TEST_IDS[5], TEST_IDS[3], TEST_IDS[2], 99999])  # 2, 3, 5 and a stranger
    probs_a = rng.dirichlet(np.ones(3), size=(4, len(TARGETS)))
    probs_b = rng.dirichlet(np.ones(3), size=(4, len(TARGETS)))
    table = ev.score_table(data, {"a": (ids_a, probs_a), "b": (ids_b, probs_b)})
    assert table["studies"] == 2
    assert table["predicted"] == {"a": 4, "b": 3}
    common = codes[[2, 3]]  # truth order
    assert table["rows"]["a"]["score"] == pytest.approx(
        score_arrays(common, probs_a[[2, 3]])["score"]
    )
    assert table["rows"]["b"]["score"] == pytest.approx(
        score_arrays(common, probs_b[[2, 1]])["score"]
    )

    aligned = ev.align_predictions(data, {"a": (ids_a, probs_a), "b": (ids_b, probs_b)})
    assert aligned.study_ids.tolist() == TEST_IDS[2:4]
    np.testing.assert_array_equal(aligned.probs["b"], probs_b[[2, 1]])


def test_score_table_errors(truth_dir, tmp_path) -> None:
    data, codes = truth_dir
    probs = _one_hot(codes)
    with pytest.raises(ValueError, match="reserved"):
        ev.score_table(data, {"oracle": (np.array(TEST_IDS), probs)})
    with pytest.raises(ValueError, match="every model"):
        ev.score_table(data, {"a": (np.array([5, 6]), probs[:2])})
    with pytest.raises(ValueError, match="expected probs"):
        ev.score_table(data, {"a": (np.array(TEST_IDS), probs[:, :24])})
    with pytest.raises(FileNotFoundError, match="test_labels.csv"):
        ev.score_table(tmp_path / "nowhere", {"a": (np.array(TEST_IDS), probs)})


def test_no_studies_jsonl_means_no_oracle(truth_dir) -> None:
    data, codes = truth_dir
    (data / "truth" / "studies.jsonl").unlink()
    assert ev.oracle_probs(data, TEST_IDS) is None
    table = ev.score_table(data, {"m": (np.array(TEST_IDS), _one_hot(codes))})
    assert "oracle" not in table["rows"]
    assert table["rows"]["m"]["gap_closed"] is None


def test_heldout_scores_layout(truth_dir, tmp_path) -> None:
    data, codes = truth_dir
    out = ev.heldout_scores(data, np.array(TEST_IDS), _one_hot(codes))
    assert set(out) == {
        "studies",
        "model",
        "class_prior",
        "weighted_class_prior",
        "ratio_model_to_prior",
        "oracle",
        "share_of_prior_to_oracle_gap_closed",
    }
    assert out["studies"] == N_TEST
    assert out["model"]["score"] < out["oracle"]["score"] < out["class_prior"]["score"]
    assert out["weighted_class_prior"]["score"] < out["class_prior"]["score"]
    assert ev.heldout_scores(tmp_path / "nowhere", np.array(TEST_IDS), _one_hot(codes)) is None


def test_read_submission_predictions_drops_incomplete_studies(tmp_path) -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=(2, len(TARGETS)))
    rows = []
    for s, sid in enumerate((7, 3)):
        for t, (condition, level) in enumerate(itertools.product(CONDITIONS, LEVELS)):
            if sid == 3 and t == 10:
                continue  # study 3 lacks one row
            rows.append([make_row_id(sid, condition, level), *probs[s, t]])
    path = tmp_path / "sub.csv"
    pd.DataFrame(rows, columns=["row_id", *PROB_COLUMNS]).to_csv(path, index=False)
    ids, got = ev.read_submission_predictions(path)
    assert ids.tolist() == [7]
    np.testing.assert_allclose(got[0], probs[0])


def test_confusion_matrices_hand_case() -> None:
    labels = np.full((2, len(TARGETS)), -1)
    probs = np.tile(np.array([0.1, 0.2, 0.7]), (2, len(TARGETS), 1))  # always Severe
    labels[0, 0] = 0  # spinal, true Normal/Mild -> predicted Severe
    labels[1, 4] = 2  # spinal, true Severe -> Severe
    labels[0, 5] = 1  # left foraminal, Moderate
    probs[0, 5] = [0.1, 0.8, 0.1]  # -> Moderate
    cm = ev.confusion_matrices(labels, probs)
    assert set(cm) == {"spinal", "foraminal", "subarticular"}
    assert cm["spinal"].tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 1]]
    assert cm["foraminal"].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert cm["subarticular"].sum() == 0
