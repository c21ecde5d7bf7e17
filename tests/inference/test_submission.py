"""Building, writing and validating submissions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lsdc.constants import PROB_COLUMNS, TARGETS
from lsdc.inference.submission import (
    build_submission,
    validate_submission,
    validate_submission_file,
    write_submission,
)
from lsdc.io.tables import read_submission

STUDIES = [4003253, 4646740]


def descriptions(study_ids=STUDIES) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "study_id": np.repeat(study_ids, 2),
            "series_id": np.arange(2 * len(study_ids)) + 10,
            "series_description": ["Sagittal T1", "Axial T2"] * len(study_ids),
        }
    )


def probs(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet([3, 1, 1], size=(n, 25)).astype(np.float32)


def test_build_submission_order_and_values():
    p = probs()
    sub = build_submission(STUDIES, p)
    assert list(sub.columns) == ["row_id", *PROB_COLUMNS]
    assert len(sub) == 50
    assert sub["row_id"].iloc[0] == "4003253_spinal_canal_stenosis_l1_l2"
    assert sub["row_id"].iloc[26] == f"4646740_{TARGETS[1]}"
    np.testing.assert_allclose(sub.iloc[26][list(PROB_COLUMNS)].to_numpy(float), p[1, 1], 1e-6)
    assert np.abs(sub[list(PROB_COLUMNS)].sum(axis=1) - 1).max() < 1e-12
    assert validate_submission(sub, descriptions()) == []


def test_build_submission_rescales_rows_to_one():
    p = probs().astype(np.float64) * 5
    sub = build_submission(STUDIES, p)
    np.testing.assert_allclose(sub.iloc[0][list(PROB_COLUMNS)].to_numpy(float), p[0, 0] / 5)


@pytest.mark.parametrize("bad", [[-0.1, 0.6, 0.5], [np.inf, 0, 0], [0, 0, 0]])
def test_build_submission_rejects_bad_rows(bad):
    p = probs().astype(np.float64)
    p[1, 3] = bad
    with pytest.raises(ValueError, match=f"row 4646740_{TARGETS[3]}"):
        build_submission(STUDIES, p)


def test_build_submission_rejects_shape_and_repeats():
    with pytest.raises(ValueError, match="shape"):
        build_submission(STUDIES, probs()[:, :24])
    with pytest.raises(ValueError, match="repeated"):
        build_submission([1, 1], probs())


def test_write_round_trip(tmp_path):
    sub = build_submission(STUDIES, probs())
    path = write_submission(sub, tmp_path / "out" / "submission.csv")
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    back = read_submission(path)
    assert back["row_id"].tolist() == sub["row_id"].tolist()
    np.testing.assert_allclose(back[list(PROB_COLUMNS)], sub[list(PROB_COLUMNS)], atol=1e-9)
    assert validate_submission_file(path, _desc_csv(tmp_path)) == []


def _desc_csv(tmp_path, study_ids=STUDIES):
    path = tmp_path / "test_series_descriptions.csv"
    descriptions(study_ids).to_csv(path, index=False)
    return path


def test_validate_lists_every_problem(tmp_path):
    sub = build_submission(STUDIES, probs())
    path = tmp_path / "sub.csv"
    write_submission(sub, path)
    lines = path.read_text().splitlines()
    # file line n holds sub row n - 2
    lines[2] = lines[2].split(",")[0] + ",0.5,0.5,0.5"  # sums to 1.5
    lines[3] = lines[3].split(",")[0] + ",abc,0.5,0.5"  # non-numeric
    lines[4] = lines[4].split(",")[0] + ",1.2,-0.2,0"  # negative
    lines[5] = "4003253_spinal_canal_stenosis_l9_l10,0.2,0.3,0.5"  # malformed (and row missing)
    del lines[26:]  # every row of the second study
    lines.append(lines[10])  # duplicate, on line 27
    lines.append("5555_spinal_canal_stenosis_l1_l2,1,0,0")  # unknown study
    path.write_text("\n".join(lines) + "\n")
    problems = validate_submission_file(path, _desc_csv(tmp_path))
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert "line 3: row '4003253_spinal_canal_stenosis_l2_l3': probabilities sum to 1.5" in text
    assert "line 4: row '4003253_spinal_canal_stenosis_l3_l4': column 'normal_mild': " in text
    assert "non-numeric value 'abc'" in text
    assert "line 5: row '4003253_spinal_canal_stenosis_l4_l5': column 'moderate': " in text
    assert "negative probability -0.2" in text
    assert "line 27: row '4003253_left_neural_foraminal_narrowing_l5_s1': repeated" in text
    assert "line 6: row '4003253_spinal_canal_stenosis_l9_l10': malformed row id" in text
    assert "repeated row id (first at 11)" in text
    assert "study 5555: 1 rows for a study not in the series descriptions" in text
    assert "study 4003253: 1 rows missing: 4003253_spinal_canal_stenosis_l5_s1" in text
    assert "study 4646740: all 25 rows missing" in text


def test_validate_columns():
    sub = build_submission(STUDIES, probs()).rename(columns={"severe": "sev"})
    problems = validate_submission(sub, descriptions())
    assert len(problems) == 1
    assert "missing severe; unexpected sev" in problems[0]
    swapped = build_submission(STUDIES, probs())[["row_id", "moderate", "normal_mild", "severe"]]
    assert "wrong order" in validate_submission(swapped, descriptions())[0]
    no_ids = build_submission(STUDIES, probs()).drop(columns="row_id")
    assert len(validate_submission(no_ids, descriptions())) == 1


def test_validate_numeric_frame_with_nan():
    sub = build_submission(STUDIES, probs())
    sub.loc[7, "severe"] = np.nan
    problems = validate_submission(sub, descriptions())
    assert problems == [f"row '4003253_{TARGETS[7]}': column 'severe': non-finite value nan"]


def test_six_decimal_thirds_like_the_competition_sample_are_valid():
    sub = build_submission(STUDIES, probs()).astype({c: object for c in PROB_COLUMNS})
    sub.loc[:, list(PROB_COLUMNS)] = "0.333333"
    assert validate_submission(sub, descriptions()) == []
    sub.loc[3, "severe"] = "0.333330"  # off by 3e-6: still reported
    (problem,) = validate_submission(sub, descriptions())
    assert "sum to" in problem


def test_rows_rounded_to_four_decimals_are_warnings_not_problems(tmp_path):
    from typer.testing import CliRunner

    from lsdc.cli import app

    sub = build_submission(STUDIES, probs()).astype({c: object for c in PROB_COLUMNS})
    sub.loc[:, list(PROB_COLUMNS)] = "0.3333"  # sums to 0.9999
    sub.loc[0, "severe"] = "0.3"  # sums to 0.9666: wrong, not rounded
    warnings: list[str] = []
    problems = validate_submission(sub, descriptions(), warnings)
    assert len(problems) == 1 and "sum to 0.9666" in problems[0]
    assert len(warnings) == len(sub) - 1 and "renormalises" in warnings[0]
    assert len(validate_submission(sub, descriptions())) == len(sub)  # no list: all problems

    sub.loc[0, "severe"] = "0.3334"
    path = tmp_path / "rounded.csv"
    sub.to_csv(path, index=False)
    result = CliRunner().invoke(
        app, ["validate-submission", str(path), "--series-descriptions", _desc_csv(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert f"valid ({len(sub) - 1} warnings)" in result.stdout
