"""The multitask preprocessing commands: `lsdc preprocess --pipeline multitask`, `lsdc train
slice-relevance`, `lsdc viz crops`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lsdc.cli import app

runner = CliRunner()


def test_preprocess_train_and_viz_commands(tiny_dataset, tmp_path):
    root, _ = tiny_dataset
    cache = tmp_path / "cache"
    res = runner.invoke(
        app,
        ["preprocess", str(root), "--pipeline", "multitask", "--cache", str(cache),
         "crop_size=32", "selection.without_prediction=middle"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "6 written" in res.output
    assert json.loads((cache / "manifest.json").read_text())["config"]["crop_size"] == 32

    run = tmp_path / "run"
    res = runner.invoke(
        app,
        ["train", "slice-relevance", str(root), "--out", str(run),
         "folds=2", "models.rf_trees=20", "models.xgb_trees=10"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| all | ensemble |" in res.output
    assert (run / "models" / "axial_t2" / "xgboost.json").is_file()

    png = tmp_path / "crops.png"
    res = runner.invoke(app, ["viz", "crops", str(cache), "1000", "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unlabelled_preprocessing_without_a_run_fails_clearly(tiny_dataset, tmp_path):
    root, _ = tiny_dataset
    res = runner.invoke(
        app, ["preprocess", str(root), "--pipeline", "multitask", "--cache", str(tmp_path / "c")]
    )
    assert res.exit_code != 0
    assert "relevance-run" in str(res.exception)
