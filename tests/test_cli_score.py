"""`lsdc score` and `lsdc validate-submission` through typer's CliRunner."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lsdc.cli import app
from lsdc.constants import SEVERITIES, TARGETS
from lsdc.inference.submission import build_submission, write_submission
from lsdc.metrics import SCORE_KEYS

STUDIES = [11, 22, 33]
runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    """train.csv (with empty cells), a uniform submission and series descriptions."""
    rng = np.random.default_rng(3)
    codes = rng.choice(3, size=(len(STUDIES), 25))
    labels = [[SEVERITIES[c] for c in row] for row in codes]
    labels[0][4] = labels[2][17] = ""
    lines = [",".join(["study_id", *TARGETS])]
    lines += [",".join([str(s), *row]) for s, row in zip(STUDIES, labels, strict=True)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    sub = build_submission(STUDIES, np.full((len(STUDIES), 25, 3), 1 / 3))
    write_submission(sub, tmp_path / "sub.csv")
    pd.DataFrame(
        {"study_id": STUDIES, "series_id": [1, 2, 3], "series_description": ["Axial T2"] * 3}
    ).to_csv(tmp_path / "desc.csv", index=False)
    return tmp_path


def test_score_table(files):
    result = runner.invoke(app, ["score", str(files / "train.csv"), str(files / "sub.csv")])
    assert result.exit_code == 0, result.output
    for key in SCORE_KEYS:
        assert key in result.stdout
    assert f"{math.log(3):.6f}" in result.stdout


def test_score_json(files):
    args = ["score", str(files / "train.csv"), str(files / "sub.csv"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload) == ["spinal", "foraminal", "subarticular", "any_severe_spinal", "score"]
    assert payload["spinal"] == pytest.approx(math.log(3))
    terms = [payload[k] for k in SCORE_KEYS[:-1]]
    assert payload["score"] == pytest.approx(sum(terms) / 4)


def test_score_missing_row_exit_2_names_row(files):
    text = (files / "sub.csv").read_text().splitlines()
    (files / "sub.csv").write_text("\n".join(text[:1] + text[2:]) + "\n")  # drops row 11_..._l1_l2
    result = runner.invoke(app, ["score", str(files / "train.csv"), str(files / "sub.csv")])
    assert result.exit_code == 2
    assert "11_spinal_canal_stenosis_l1_l2" in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught error


def test_score_malformed_labels_exit_2_one_line(files):
    path = files / "train.csv"
    path.write_text(path.read_text().replace("Severe", "Sever", 1))
    result = runner.invoke(app, ["score", str(path), str(files / "sub.csv")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.csv" in lines[0] and "line " in lines[0]
    assert "Traceback" not in result.output


def test_validate_submission_valid(files):
    args = ["validate-submission", str(files / "sub.csv"), "--series-descriptions"]
    result = runner.invoke(app, [*args, str(files / "desc.csv")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "valid"


def test_validate_submission_lists_problems(files):
    path = files / "sub.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",0.9,0.9,0.9"
    lines[2] = lines[2].split(",")[0] + ",x,0.5,0.5"
    path.write_text("\n".join(lines[:-1]) + "\n")  # last row of study 33 missing
    args = ["validate-submission", str(path), "--series-descriptions", str(files / "desc.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    out = result.stdout.strip().splitlines()
    assert len(out) == 3, result.stdout
    assert any("line 2" in p and "sum to 2.7" in p for p in out)
    assert any("line 3" in p and "non-numeric value 'x'" in p for p in out)
    assert any("study 33: 1 rows missing" in p for p in out)


def test_validate_submission_unreadable_exit_2(files):
    args = ["validate-submission", str(files / "absent.csv"), "--series-descriptions"]
    result = runner.invoke(app, [*args, str(files / "desc.csv")])
    assert result.exit_code == 2
    assert "absent.csv" in result.stderr and "cannot open" in result.stderr
