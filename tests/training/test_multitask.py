"""Multitask training: masked losses, keypoint error in mm, a cross-validated run and its
predictions (flip TTA exactness, coordinates table, picture)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lsdc.constants import TARGETS
from lsdc.fileio import load_npz
from lsdc.training.losses import LossConfig
from lsdc.training.multitask import (
    MultitaskLossConfig,
    bilinear_cell_weights,
    keypoint_errors_mm,
    keypoint_losses,
    multitask_loss,
    summarise_errors,
    train_multitask,
)

TINY = [
    "model.backbone=resnet10t", "model.feature_dim=16", "model.hidden_dim=16",
    "model.window_px=8", "engine.batch_size=2", "engine.progress_bar=false",
]  # fmt: skip


# One torch thread: see the `one_thread` fixture.
pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(b: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "logits": torch.randn(b, 25, 3, requires_grad=True),
        "keypoints": torch.rand(b, 25, 2, requires_grad=True),
        "visibility": torch.randn(b, 25, requires_grad=True),
        "crop_present": torch.ones(b, 25, dtype=torch.bool),
    }


def _batch(b: int = 2) -> dict[str, torch.Tensor]:
    return {
        "points": torch.rand(b, 25, 2),
        "point_mask": torch.ones(b, 25, dtype=torch.bool),
        "has_coords": torch.ones(b, dtype=torch.bool),
        "labels": torch.zeros(b, 25, dtype=torch.long),
    }


def test_masked_keypoints_and_missing_crops_do_not_count():
    out, batch = _outputs(), _batch()
    base = keypoint_losses(out, batch)["keypoint_l1"]
    # Move a masked point and a point of a missing crop far away: the loss must not change.
    batch["point_mask"][0, 3] = False
    out["crop_present"][1, 7] = False
    expected = keypoint_losses(out, batch)["keypoint_l1"]
    batch["points"][0, 3] = 100.0
    batch["points"][1, 7] = -100.0
    assert keypoint_losses(out, batch)["keypoint_l1"] == expected
    assert expected != base


def test_study_without_coordinates_teaches_no_visibility():
    out, batch = _outputs(), _batch()
    batch["point_mask"][:] = False
    batch["has_coords"][:] = False
    terms = keypoint_losses(out, batch)
    # Present, so that the visibility head takes part in every backward pass (DDP), but 0 over
    # no keypoints, teaching nothing.
    assert terms["n_visibility"].item() == 0 and terms["n_keypoint_l1"].item() == 0
    assert terms["visibility"].item() == 0.0 and terms["keypoint_l1"].item() == 0.0
    (terms["visibility"] + terms["keypoint_l1"]).backward()
    assert not out["visibility"].grad.any() and not out["keypoints"].grad.any()


def test_unlabelled_targets_are_ignored_and_every_term_reported():
    out, batch = _outputs(), _batch()
    batch["labels"][:, 5:] = -1
    a = multitask_loss(out, batch, MultitaskLossConfig(), LossConfig())
    out2 = {**out, "logits": out["logits"].detach().clone()}
    out2["logits"][:, 5:] = 50.0  # only unlabelled targets change
    b = multitask_loss(out2, batch, MultitaskLossConfig(), LossConfig())
    assert torch.isclose(a["severity"], b["severity"])
    assert {"loss", "severity", "keypoint_l1", "visibility"} <= set(a)
    a["loss"].backward()


def test_keypoint_error_in_mm_by_hand(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=1, size=32)
    from lsdc.data.multitask import MultitaskDataset

    true = MultitaskDataset(cache)[0]["points"].numpy()
    pred = true.copy()
    j = TARGETS.index("spinal_canal_stenosis_l2_l3")
    # The toy window is 64 x 64 series pixels for a 32-px crop, spacing 0.5 mm (rows) x 0.8 mm
    # (columns): 1/64 of the crop in x is 1 pixel = 0.8 mm, in y 0.5 mm.
    pred[0 + j, 0] += 3 / 64
    pred[0 + j, 1] += 4 / 64
    errors = keypoint_errors_mm(cache, [1000], pred[None])
    spinal = errors["Sagittal T2/STIR"]
    assert len(spinal) == 5
    np.testing.assert_allclose(sorted(spinal)[-1], np.hypot(3 * 0.8, 4 * 0.5), atol=1e-4)
    assert np.allclose(sorted(spinal)[:-1], 0, atol=1e-4)
    summary = summarise_errors(errors)
    assert summary["all"]["n"] == 25


@pytest.mark.slow
def test_two_fold_run_predicts_with_exact_flip_tta(toy_multitask_cache, tmp_path):
    from lsdc.data.multitask import collate_multitask, mirror_batch
    from lsdc.inference.predictor import Predictor, coordinates_table, predict_submission

    cache = toy_multitask_cache(n_studies=6, size=32, hires=40)
    run = tmp_path / "run"
    result = train_multitask(cache, run, folds=2, epochs=1, overrides=TINY)
    assert sorted(result.study_ids.tolist()) == list(range(1000, 1006))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["keypoint_error_mm"]["all"]["n"] == 6 * 25
    assert result.outputs["keypoints"].shape == (6, 25, 2)
    assert (run / "curves.png").exists()

    predictor = Predictor.from_run(run, device="cpu", tta_flip=True)
    ds = predictor.family.dataset(cache, None, predictor.info)
    batch = collate_multitask([ds[i] for i in range(3)])
    probs = predictor.predict_batch(batch)
    mirrored = predictor.predict_batch(mirror_batch(batch))
    from lsdc.data.multitask import MIRROR_INDEX

    # Averaging a study with its mirror makes the prediction exactly left/right equivariant.
    torch.testing.assert_close(mirrored, probs[:, list(MIRROR_INDEX)], atol=1e-5, rtol=1e-4)

    # The OOF is predicted as `predict` predicts (with the mirror), so the calibration and the
    # ensemble fitted on it see what they are applied to.
    for k in (0, 1):
        fold = Predictor.from_run(run, folds=[k], device="cpu", tta_flip=True, calibrate=False)
        val = sorted(int(s) for s in load_npz(run / f"fold{k}" / "oof.npz")[0]["study_ids"])
        got = fold.predict_cache(cache, val)
        rows = [result.study_ids.tolist().index(s) for s in got.study_ids]
        np.testing.assert_allclose(got.probs, result.probs[rows], atol=1e-5)

    report = predict_submission(run, cache, tmp_path / "sub.csv", tta_flip=True, device="cpu")
    assert report.predicted == 6 and report.coordinates is not None
    coords = pd.read_csv(report.coordinates)
    assert list(coords.columns) == [
        "study_id", "series_id", "instance_number", "condition", "level", "x", "y",
    ]  # fmt: skip
    assert len(coords) == 6 * 25 and coords["instance_number"].eq(6).all()  # centre slice
    assert coords["condition"].isin(["Spinal Canal Stenosis", "Left Subarticular Stenosis",
        "Right Subarticular Stenosis", "Left Neural Foraminal Narrowing",
        "Right Neural Foraminal Narrowing"]).all()  # fmt: skip
    preds = predictor.predict_cache(cache)
    table = coordinates_table(cache, preds)
    # Crop points map back into the crop's window on the series grid (toy window 20..84).
    assert table["x"].between(20 - 1, 84).all() and table["y"].between(10 - 1, 74).all()

    from lsdc.inference.viz import plot_multitask_study

    png = plot_multitask_study(run, cache, 1000, tmp_path / "mt.png")
    assert png.stat().st_size > 10_000


def test_each_fold_starts_at_its_training_studies_weighted_prior(toy_multitask_cache):
    from lsdc.config import load_config
    from lsdc.models.registry import build_model
    from lsdc.training.engine import weighted_class_prior
    from lsdc.training.multitask import MultitaskTrainConfig, multitask_task

    cfg = load_config(MultitaskTrainConfig, None, TINY)
    task = multitask_task(toy_multitask_cache(n_studies=4, size=32), cfg)
    model = build_model("multitask", **task.model_kwargs)
    train = task.labels[:3]
    task.init_model(model, train)
    expected = torch.as_tensor(np.log(weighted_class_prior(train)), dtype=torch.float32)
    torch.testing.assert_close(model.prior_logits.detach(), expected)


def test_bilinear_heatmap_target_puts_its_mean_on_the_point():
    points = torch.tensor([[0.3, 0.71], [0.5, 0.5], [0.02, 0.97]])
    w = bilinear_cell_weights(points, 16, 8).reshape(3, 16, 8)
    torch.testing.assert_close(w.sum(dim=(1, 2)), torch.ones(3))
    xs, ys = (torch.arange(8) + 0.5) / 8, (torch.arange(16) + 0.5) / 16
    mean = torch.stack([(w.sum(1) * xs).sum(-1), (w.sum(2) * ys).sum(-1)], dim=-1)
    # Inside the outer cell centres the mean is the point; beyond them, the nearest centre.
    torch.testing.assert_close(mean[:2], points[:2])
    torch.testing.assert_close(mean[2], torch.tensor([0.5 / 8, 15.5 / 16]))


def test_bilinear_heatmap_loss_raises_the_cells_around_the_true_point():
    from lsdc.data.multitask import GROUPS

    out, batch = _outputs(1), _batch(1)
    for g in GROUPS:
        n, k = len(g.targets), len(g.targets[0])
        out[f"heatmaps_{g.name}"] = torch.zeros(n, k, 8, 8, requires_grad=True)
    keypoint_losses(out, batch, heatmap_target="bilinear")["heatmap_ce"].backward()
    grad = -out["heatmaps_sagittal"].grad[0, 0]  # first sagittal crop, first keypoint
    x, y = batch["points"][0, GROUPS[0].targets[0][0]] * 8 - 0.5  # in cell-centre units
    row, col = divmod(int(grad.argmax()), 8)
    assert abs(row - float(y)) <= 1 and abs(col - float(x)) <= 1
