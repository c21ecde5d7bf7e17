"""Slice-relevance features, models, persistence and the training run."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from lsdc.preprocess.slice_relevance import (
    ENSEMBLE,
    MODEL_NAMES,
    FeatureConfig,
    compute_features,
    dataset_descriptions,
    feature_names,
    load_models,
    load_skops,
    predict_slices,
    slice_features,
    task_of,
    tasks_for,
    train_slice_relevance,
)

SAG_ORIENT = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
FAST = ["folds=2", "models.rf_trees=40", "models.xgb_trees=30", "models.mlp_max_iter=200"]


def test_tasks_follow_the_constants():
    assert tasks_for(SAGITTAL_T2) == ("spinal_canal_stenosis",)
    assert tasks_for(SAGITTAL_T1) == (
        "left_neural_foraminal_narrowing",
        "right_neural_foraminal_narrowing",
    )
    assert tasks_for(AXIAL_T2) == ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
    assert task_of(AXIAL_T2, "left_subarticular_stenosis", "l4_l5") == "l4_l5"
    with pytest.raises(ValueError, match="unknown series type"):
        tasks_for("Coronal STIR")


def test_features_shape_names_and_determinism(toy_sagittal):
    vol, _ = toy_sagittal(size=64, slices=7)
    pos = np.c_[np.arange(7) * 3.0, np.zeros(7), np.zeros(7)]
    cfg = FeatureConfig()
    a = slice_features(vol, pos, SAG_ORIENT, SAGITTAL_T1, cfg)
    b = slice_features(vol.copy(), pos.copy(), SAG_ORIENT, SAGITTAL_T1, cfg)
    assert a.shape == (7, len(feature_names(cfg)))
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert a.tobytes() == b.tobytes()
    # A flat volume (no signal) still gives finite features.
    flat = slice_features(np.zeros((3, 64, 64)), pos[:3], SAG_ORIENT, AXIAL_T2, cfg)
    assert np.isfinite(flat).all()


def test_position_features_use_the_patient_axis(toy_sagittal):
    # The same slices listed in the opposite order keep their patient-left offsets.
    vol, _ = toy_sagittal(size=64, slices=5)
    pos = np.c_[np.arange(5) * 3.0 - 6, np.zeros(5), np.zeros(5)]
    names = feature_names(FeatureConfig())
    k = names.index("offset_mm")
    a = slice_features(vol, pos, SAG_ORIENT, SAGITTAL_T1, FeatureConfig())
    b = slice_features(vol[::-1], pos[::-1], -SAG_ORIENT, SAGITTAL_T1, FeatureConfig())
    assert a[:, k].tolist() == [-6.0, -3.0, 0.0, 3.0, 6.0]
    assert b[:, k].tolist() == [6.0, 3.0, 0.0, -3.0, -6.0]


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    root, _ = tiny_dataset
    out = tmp_path_factory.mktemp("relevance_run")
    # Two workers: the CV folds run in a process pool (or in this process, with a warning, when
    # an earlier test already ran XGBoost here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = train_slice_relevance(root, out, overrides=FAST, progress=False, workers=2)
    return root, out, report


def test_training_writes_a_complete_run(trained_run):
    _, out, report = trained_run
    for name in ("config.yaml", "axial_roi.json", "report.json", "report.md", "oof.csv"):
        assert (out / name).is_file(), name
    for slug in ("sagittal_t1", "sagittal_t2_stir", "axial_t2"):
        files = sorted(p.name for p in (out / "models" / slug).iterdir())
        assert files == ["mlp.skops", "models.json", "random_forest.skops", "svm.skops"] + [
            "xgboost.json"
        ]
        json.loads((out / "models" / slug / "xgboost.json").read_text())  # real JSON
    data = json.loads((out / "report.json").read_text())
    assert data["studies"] == 5  # the unlabelled study is not a training study
    methods = {r["method"] for r in data["accuracy"]}
    assert methods == {*MODEL_NAMES, ENSEMBLE, "middle_slice"}
    table = report.table.set_index(["series_type", "method"])
    assert table.loc[("all", ENSEMBLE), "exact"] > table.loc[("all", "middle_slice"), "exact"]
    assert "| all | ensemble |" in (out / "report.md").read_text()


def test_models_load_and_predict_the_labelled_slices(trained_run):
    root, out, _ = trained_run
    from lsdc.io.study import load_study

    m = load_models(out / "models" / "axial_t2")
    assert set(m.models) == set(MODEL_NAMES)
    # The study without coordinates: left foramen on the slice nearest x = +12 mm, right on
    # the one nearest x = -12 mm, the canal on the midline.
    study = load_study(root, 1005, descriptions=dataset_descriptions(str(root), "train")[1005])
    pred = predict_slices(out, study)
    t1 = study.first_of_type(SAGITTAL_T1)
    x = t1.positions[:, 0]
    left = pred[t1.series_id]["left_neural_foraminal_narrowing"]
    right = pred[t1.series_id]["right_neural_foraminal_narrowing"]
    assert abs(x[left.slice_index] - 12) <= 3.0
    assert abs(x[right.slice_index] + 12) <= 3.0
    assert left.instance_number == t1.instance_numbers[left.slice_index]
    t2 = study.first_of_type(SAGITTAL_T2)
    spinal = pred[t2.series_id]["spinal_canal_stenosis"]
    assert abs(t2.positions[spinal.slice_index, 0]) <= 3.0
    assert spinal.scores.shape == (t2.num_slices,)


def test_feature_cache_is_reused(trained_run):
    root, out, _ = trained_run
    report = compute_features(root, out / "features", [1000, 1001], FeatureConfig(), progress=False)
    assert report.written == [] and report.skipped == [1000, 1001]


def test_untrusted_skops_types_are_refused(tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    path = tmp_path / "evil.skops"
    path.write_bytes(sio.dumps(FunctionTransformer(func=os.system)))
    with pytest.raises(ValueError, match="untrusted"):
        load_skops(path)


def test_run_axial_roi_matches_the_dataset_statistics(trained_run):
    from lsdc.preprocess.crops import AxialRoi
    from lsdc.preprocess.multitask import axial_roi_from_coordinates

    root, out, _ = trained_run
    saved = AxialRoi.load(out / "axial_roi.json")
    assert saved.num_points == 5 * 10  # five labelled studies, ten axial points each
    assert saved == axial_roi_from_coordinates(root)
