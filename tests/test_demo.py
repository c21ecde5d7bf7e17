"""The demo end to end on a tiny phantom: phantom, fit, predict, report."""

import json
import re

import pytest

from lsdc.demo import DemoConfig, run_demo
from lsdc.inference.submission import validate_submission_file


@pytest.mark.slow
def test_tiny_demo_beats_uniform_and_reports_every_picture(tmp_path):
    cfg = DemoConfig(train_studies=16, test_studies=4, size=64, workers=1, preset="tiny")
    lines: list[str] = []
    report = run_demo(tmp_path, cfg, log=lines.append)

    data = tmp_path / "data"
    sub = tmp_path / "submission.csv"
    assert validate_submission_file(sub, data / "test_series_descriptions.csv") == []
    rows = report.figures["test"]["rows"]
    assert {"ensemble", "multitask", "sequence", "class prior", "uniform", "oracle"} <= set(rows)
    # A model that learned nothing useful scores like uniform or worse; a trained one, even
    # tiny, at least learns the class frequencies.
    assert rows["ensemble"]["score"] < rows["uniform"]["score"]
    assert rows["oracle"]["score"] < rows["class prior"]["score"]

    html = (tmp_path / "report" / "index.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(images) >= 6
    for name in images:
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    for section in ("ensemble", "class prior", "oracle"):
        assert section in html
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert {"fit: multitask", "predict: sequence inference"} <= set(saved["seconds"])
    assert any("x the class prior" in line for line in lines)

    # A rerun reuses the phantom, the runs folder and its folds, and predicts the same.
    first = sub.read_text()
    run_demo(tmp_path, cfg, log=lines.append)
    assert sub.read_text() == first


@pytest.mark.slow
def test_the_multitask_model_reads_a_planted_narrowing(toy_multitask_cache, tmp_path):
    """Beating uniform or the class prior proves nothing: a constant does that. Here each
    keypoint's dot grows with its severity, so only a model that finds the dots and reads them
    beats the best constant (the weighted prior) on studies it did not train on."""
    from lsdc.training.multitask import train_multitask

    cache = toy_multitask_cache(n_studies=40, size=32, ordered=True)
    tiny = [
        "model.backbone=resnet10t", "model.feature_dim=16", "model.hidden_dim=16",
        "model.window_px=8", "engine.batch_size=2", "engine.progress_bar=false",
    ]  # fmt: skip
    train_multitask(cache, tmp_path / "run", folds=2, epochs=10, overrides=tiny)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    model, constant = summary["oof_score"], summary["weighted_prior_score"]
    # Measured 0.75x; a constant cannot go below about 1x on rows it did not see.
    assert model["score"] < 0.85 * constant["score"], (model, constant)
