"""The demo end to end on a tiny phantom: every stage runs and leaves its outputs."""

import json

import pytest

from lsdc.demo import DemoConfig, run_demo
from lsdc.inference.submission import validate_submission_file
from lsdc.metrics import SCORE_KEYS


@pytest.mark.slow
def test_tiny_demo_writes_a_valid_scored_submission(tmp_path):
    cfg = DemoConfig(
        train_studies=10, test_studies=3, size=64, workers=1, folds=2, relevance_folds=2,
        epochs=1, crop_size=32, backbone="test_convnext", multitask_input=32, multitask_epochs=1,
    )  # fmt: skip
    lines: list[str] = []
    report = run_demo(tmp_path, cfg, log=lines.append)

    data = tmp_path / "data"
    assert validate_submission_file(tmp_path / "submission.csv",
                                    data / "test_series_descriptions.csv") == []  # fmt: skip
    figures = json.loads((tmp_path / "demo.json").read_text())["figures"]
    assert set(figures["test"]) == set(SCORE_KEYS)
    assert set(figures["test_class_prior"]) == set(SCORE_KEYS)
    assert 0 < figures["test"]["score"] < 5
    assert set(figures["test_multitask"]) == set(SCORE_KEYS)
    assert validate_submission_file(tmp_path / "submission-multitask.csv",
                                    data / "test_series_descriptions.csv") == []  # fmt: skip
    assert (tmp_path / "submission-multitask_coordinates.csv").exists()
    assert report.figures["slice_relevance"]
    for png in ("phantom", "multitask-crops", "sequence-slices", "multitask-keypoints"):
        assert (tmp_path / "pictures" / f"{png}.png").stat().st_size > 10_000
    assert any("test score" in line for line in lines)

    # A rerun reuses the phantom, caches and finished folds, and gives the same submission.
    first = (tmp_path / "submission.csv").read_text()
    run_demo(tmp_path, cfg, log=lines.append)
    assert (tmp_path / "submission.csv").read_text() == first
