"""End to end on the phantom: crop windows hold every labelled point; slice relevance trains."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lsdc.preprocess.multitask import coordinate_table, load_multitask_study, preprocess_dataset
from lsdc.preprocess.slice_relevance import train_slice_relevance


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from lsdc.synth import generate_dataset

    root = tmp_path_factory.mktemp("phantom")
    return generate_dataset(
        root, train_studies=6, test_studies=1, size=64, seed=3, coords_fraction=1.0,
        progress=False,
    )  # fmt: skip


@pytest.mark.slow
def test_phantom_crops_contain_every_labelled_point(phantom, tmp_path):
    # Some labelled studies lack labels of a task (e.g. an axial level): stored as absent.
    overrides = [
        "crop_size=64",
        "selection.without_prediction=absent",
        "selection.prefer_labelled=true",
    ]
    report = preprocess_dataset(phantom, tmp_path / "c", overrides=overrides, progress=False)
    assert report.failed == {}
    table = coordinate_table(tmp_path / "c")
    assert len(table) > 0
    missing = table[~table.valid]
    # Every keypoint the coordinate table gives is inside its crop (labels exist for all studies).
    coords = pd.read_csv(phantom / "train_label_coordinates.csv")
    assert len(table) - len(missing) == len(coords), missing.head()
    for sid in table.study_id.unique():
        for c in load_multitask_study(tmp_path / "c", sid):
            assert c.source == ("labelled" if c.present else None)
            assert c.present or not c.keypoint_mask.any()
            # Absent crops have the shapes of present ones, so studies batch together.
            assert c.image.shape == (3, 64, 64) and c.orientations.shape == (3, 6)


@pytest.mark.slow
def test_phantom_slice_relevance_and_predicted_test_crops(phantom, tmp_path):
    run = tmp_path / "run"
    train_slice_relevance(
        phantom, run, progress=False,
        overrides=["folds=2", "models.rf_trees=30", "models.xgb_trees=20"],
    )  # fmt: skip
    data = json.loads((run / "report.json").read_text())
    assert data["studies"] == 6
    # This process ran XGBoost (training above): the pool's workers, started by a fork
    # server, still run it in 2 processes without hanging.
    report = preprocess_dataset(
        phantom, tmp_path / "t", split="test", relevance_run=run, workers=2,
        overrides=["crop_size=64"], progress=False,
    )  # fmt: skip
    assert len(report.written) == 1 and not report.failed
    crops = load_multitask_study(tmp_path / "t", report.written[0])
    assert {c.source for c in crops if c.present} == {"predicted"}
    assert not any(c.keypoint_mask.any() for c in crops)  # test studies carry no labels

    # Train split: every cross-validated study is cropped on the run's out-of-fold slices, the
    # path a test study takes (a model that never saw it), not on its labelled slices.
    oof = pd.read_csv(run / "oof_slices.csv")
    assert set(oof.study_id) == set(pd.read_csv(phantom / "train.csv").study_id)
    train = preprocess_dataset(
        phantom, tmp_path / "tr", relevance_run=run, overrides=["crop_size=64"], progress=False
    )
    assert len(train.written) == 6 and not train.failed
    for sid in train.written:
        crops = load_multitask_study(tmp_path / "tr", sid)
        assert {c.source for c in crops if c.present} == {"oof"}
        assert any(c.keypoint_mask.any() for c in crops)  # coordinates still mapped in
        for c in crops:
            if c.present:
                assert c.hires.shape[0] == 3 and c.hires.shape[1] > 0
