"""Predictor: a run folder -> fold-averaged probabilities; flip TTA is left/right equivariant."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lsdc.data.sequence import SequenceDataset, collate_sequence, mirror_images, mirror_targets
from lsdc.fileio import atomic_write_json
from lsdc.inference.predictor import Predictor
from lsdc.models.registry import build_model
from lsdc.preprocess.cache import StudyCache
from lsdc.training.engine import save_model_weights

KWARGS = dict(backbone="test_convnext", d_model=32, num_heads=2, num_layers=1, dim_feedforward=64)


def _make_run(tmp_path, cache, folds=(0, 1)):
    run = tmp_path / "run"
    for k in folds:
        torch.manual_seed(k)
        (run / f"fold{k}").mkdir(parents=True)
        save_model_weights(
            build_model("sequence", **KWARGS), run / f"fold{k}" / "model.safetensors"
        )
    atomic_write_json(
        run / "run.json",
        {
            "task": "sequence",
            "model_name": "sequence",
            "model_kwargs": KWARGS,
            "folds": list(folds),
            "cache_config": StudyCache.open(cache).config,
        },
    )
    return run


def test_predicts_fold_average_from_run_folder(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=3, size=32, missing={2: 0})
    run = _make_run(tmp_path, cache)
    pred = Predictor.from_run(run, device="cpu").predict_cache(cache, batch_size=2)
    assert pred.study_ids.tolist() == [1000, 1001, 1002]
    assert pred.probs.shape == (3, 25, 3)
    np.testing.assert_allclose(pred.probs.sum(-1), 1.0)
    # equals the mean of the two folds predicted separately
    single = [
        Predictor.from_run(run, folds=[k], device="cpu").predict_cache(cache).probs for k in (0, 1)
    ]
    np.testing.assert_allclose(pred.probs, (single[0] + single[1]) / 2, atol=1e-6)
    sub = pred.to_submission()
    assert len(sub) == 75


def test_a_run_trained_from_pretrained_weights_predicts_without_them(
    toy_sequence_cache, tmp_path, monkeypatch
):
    """Issue 19, item 6: the predictor rebuilt each model with its pretrained settings, so a run
    trained from a local file no longer there (or from the hub, offline) could not predict."""
    cache = toy_sequence_cache(n_studies=2, size=32)
    run = _make_run(tmp_path, cache)
    info = json.loads((run / "run.json").read_text())
    info["model_kwargs"].update(pretrained=True, pretrained_path="weights/gone.safetensors")
    (run / "run.json").write_text(json.dumps(info))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    moved = shutil.move(run, tmp_path / "elsewhere" / "run")  # the folder moved, too
    monkeypatch.chdir(tmp_path)  # the relative path resolves nowhere
    pred = Predictor.from_run(moved, device="cpu").predict_cache(cache)
    assert pred.probs.shape == (2, 25, 3)


def test_autocast_inference_is_close_to_full_precision(toy_sequence_cache, tmp_path):
    """The path `predict` takes on CUDA (autocast), run on the CPU in bfloat16."""
    cache = toy_sequence_cache(n_studies=3, size=32)
    run = _make_run(tmp_path, cache)
    full = Predictor.from_run(run, device="cpu").predict_cache(cache, batch_size=2)
    mixed = Predictor.from_run(run, device="cpu", amp=True)
    assert mixed.amp and mixed.amp_dtype == torch.bfloat16
    half = mixed.predict_cache(cache, batch_size=2, num_workers=2)
    np.testing.assert_allclose(half.probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(half.probs, full.probs, atol=0.03)


def test_flip_tta_is_left_right_equivariant(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=2, size=32)
    predictor = Predictor.from_run(_make_run(tmp_path, cache, folds=(0,)), tta_flip=True)
    batch = collate_sequence([SequenceDataset(cache)[i] for i in range(2)])
    probs = predictor.predict_batch(batch)
    mirrored = predictor.predict_batch({**batch, "images": mirror_images(batch["images"])})
    torch.testing.assert_close(mirrored, mirror_targets(probs, dim=1), atol=1e-5, rtol=1e-4)
    # without TTA the untrained model is not symmetric (so the test above can fail)
    plain = Predictor.from_run(_make_run(tmp_path / "b", cache, folds=(0,)))
    a = plain.predict_batch(batch)
    b = plain.predict_batch({**batch, "images": mirror_images(batch["images"])})
    assert not torch.allclose(b, mirror_targets(a, dim=1), atol=1e-5)


def test_refuses_cache_with_other_preprocessing(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=2, size=32)
    other = toy_sequence_cache(n_studies=2, size=16)
    predictor = Predictor.from_run(_make_run(tmp_path, cache, folds=(0,)))
    with pytest.raises(ValueError, match="other settings"):
        predictor.predict_cache(other)


def test_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        Predictor.from_run(tmp_path)


def test_predict_submission_fills_uncached_listed_studies_with_the_prior(
    toy_sequence_cache, tmp_path
):
    import pandas as pd

    from lsdc.fileio import save_npz
    from lsdc.inference.predictor import predict_submission
    from lsdc.inference.submission import validate_submission_file
    from lsdc.training.engine import class_prior

    cache = toy_sequence_cache(n_studies=2, size=32)
    run = _make_run(tmp_path, cache, folds=(0,))
    labels = np.zeros((4, 25), np.int64)
    labels[0, :] = 2  # one severe study: the prior is not uniform
    save_npz(
        run / "oof.npz",
        {"study_ids": np.arange(4), "probs": np.zeros((4, 25, 3)), "labels": labels},
        {},
    )
    desc = tmp_path / "test_series_descriptions.csv"
    pd.DataFrame(
        {
            "study_id": [1000, 1001, 77],
            "series_id": [1, 2, 3],
            "series_description": ["Sagittal T1", "Axial T2", "Sagittal T1"],
        }
    ).to_csv(desc, index=False)
    report = predict_submission(run, cache, tmp_path / "sub.csv", series_descriptions=desc)
    assert report.predicted == 2 and report.filled == [77]
    assert validate_submission_file(report.path, desc) == []
    sub = pd.read_csv(report.path).set_index("row_id")
    row = sub.loc["77_spinal_canal_stenosis_l1_l2"].to_numpy()
    np.testing.assert_allclose(row, class_prior(labels)[0], rtol=1e-6)


def test_run_calibration_is_applied_to_the_fold_mean(toy_sequence_cache, tmp_path):
    from lsdc.inference.calibration import CALIBRATION_FILE, Calibration, apply_calibration

    cache = toy_sequence_cache(n_studies=2, size=32)
    run = _make_run(tmp_path, cache, folds=(0,))
    raw = Predictor.from_run(run, device="cpu").predict_cache(cache).probs
    cal = Calibration(temperature=0.5, severe_scale=2.0)
    cal.save(run / CALIBRATION_FILE)
    got = Predictor.from_run(run, device="cpu").predict_cache(cache).probs
    np.testing.assert_allclose(got, apply_calibration(raw, cal), atol=1e-6)
    off = Predictor.from_run(run, device="cpu", calibrate=False).predict_cache(cache).probs
    np.testing.assert_allclose(off, raw, atol=1e-9)


def test_unwritable_output_folder_fails_before_any_inference(
    toy_sequence_cache, tmp_path, monkeypatch
):
    from lsdc.inference.predictor import predict_submission

    cache = toy_sequence_cache(n_studies=2, size=32)
    run = _make_run(tmp_path, cache, folds=(0,))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    calls = []
    monkeypatch.setattr(Predictor, "predict_cache", lambda *a, **k: calls.append(1))
    with pytest.raises(PermissionError, match="a-file/sub: cannot write here"):
        predict_submission(run, cache, blocker / "sub" / "submission.csv")
    assert calls == []
