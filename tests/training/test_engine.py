"""The shared engine on the sequence model: a 1-epoch CV smoke run, checkpoints, resume."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lsdc.cli import app
from lsdc.fileio import load_npz
from lsdc.metrics import score_arrays
from lsdc.training.engine import load_checkpoint_state, run_cross_validation
from lsdc.training.sequence import SequenceTrainConfig, sequence_task, train_sequence

TINY = [
    "model.backbone=test_convnext",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_layers=1",
    "model.dim_feedforward=64",
    "engine.batch_size=2",
    "engine.progress_bar=false",
]


@pytest.mark.slow
def test_one_epoch_two_fold_smoke_run(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=6, size=64, missing={0: 2})
    run = tmp_path / "run"
    args = ["train", "sequence", str(cache), "--out", str(run), "--folds", "2", "--epochs", "1"]
    # OOF without the mirror view, so that each epoch's val_score (one view) is the OOF's.
    result = CliRunner().invoke(app, [*args, *TINY, "engine.oof_tta_flip=false"])
    assert result.exit_code == 0, result.output
    assert "OOF spinal" in result.output and "class prior" in result.output
    arrays, _ = load_npz(run / "oof.npz")
    assert sorted(arrays["study_ids"].tolist()) == list(range(1000, 1006))
    assert arrays["probs"].shape == (6, 25, 3)
    np.testing.assert_allclose(arrays["probs"].sum(-1), 1.0, atol=1e-6)
    files = ("config.yaml", "run.json", "folds.csv", "oof.csv", "summary.json", "curves.png")
    for name in (*files, "calibration.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["oof_score_calibrated"]) == set(summary["oof_score"])
    # Rerun (folds done, so only the OOF step) without calibration: no stale file survives.
    from lsdc.config import load_config

    cfg = load_config(SequenceTrainConfig, run / "config.yaml")
    cfg.engine.calibrate = False
    run_cross_validation(run, sequence_task(cache, cfg), cfg.engine)
    assert not (run / "calibration.json").exists()
    assert "oof_score_calibrated" not in json.loads((run / "summary.json").read_text())
    assert set(summary["oof_score"]) == {
        "spinal",
        "foraminal",
        "subarticular",
        "any_severe_spinal",
        "score",
    }
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 6 * 25 and list(oof.columns) == [
        "row_id",
        "normal_mild",
        "moderate",
        "severe",
    ]
    for k in (0, 1):
        fold = run / f"fold{k}"
        hist = json.loads((fold / "history.json").read_text())
        assert [h["epoch"] for h in hist] == [0]
        # One epoch kept as "last": the epoch's validation saw the fold's OOF weights and rows.
        rows = np.isin(arrays["study_ids"], load_npz(fold / "oof.npz")[0]["study_ids"])
        fold_score = score_arrays(arrays["labels"][rows], arrays["probs"][rows])["score"]
        assert hist[0]["val_score"] == pytest.approx(fold_score, abs=1e-4)
        # Lightning checkpoints load without unpickling arbitrary objects
        ckpt = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["epoch"] == 0
        state = load_checkpoint_state(fold / "checkpoints" / "best.ckpt")
        assert any(k.startswith("backbones.") for k in state)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_fold_resumes_from_last_checkpoint(toy_sequence_cache, tmp_path):
    import lightning as L

    class StopAtSecondEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise _Interrupt

    cache = toy_sequence_cache(n_studies=4, size=32)
    from lsdc.config import load_config

    cfg = load_config(
        SequenceTrainConfig, None, [*TINY, "engine.epochs=2", "engine.folds=2", "engine.keep=best"]
    )
    run = tmp_path / "run"
    task = sequence_task(cache, cfg)
    with pytest.raises(_Interrupt):
        run_cross_validation(run, task, cfg.engine, callbacks=[StopAtSecondEpoch()])
    fold0 = run / "fold0"
    assert (fold0 / "checkpoints" / "last.ckpt").exists()
    assert not (fold0 / "result.json").exists()
    first = json.loads((fold0 / "history.json").read_text())
    assert [h["epoch"] for h in first] == [0]
    steps = torch.load(fold0 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert steps > 0

    res = run_cross_validation(run, task, cfg.engine)
    hist = json.loads((fold0 / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[0] == first[0], "epoch 0 was not trained again"
    # the optimiser continued from the checkpoint: exactly one more epoch of steps
    ckpt = torch.load(fold0 / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * steps
    assert res.probs.shape == (4, 25, 3)
    # the fold keeps its best-val_loss weights (engine.keep=best) for inference
    from safetensors.torch import load_file

    kept = load_file(fold0 / "model.safetensors")
    best = load_checkpoint_state(fold0 / "checkpoints" / "best.ckpt")
    assert kept.keys() == best.keys() and all(torch.equal(kept[k], best[k]) for k in kept)

    # A finished run is not retrained: same OOF, fold files untouched.
    mtime = (fold0 / "model.safetensors").stat().st_mtime_ns
    again = run_cross_validation(run, task, cfg.engine)
    np.testing.assert_array_equal(again.probs, res.probs)
    assert (fold0 / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_default_keeps_the_last_epoch(toy_sequence_cache, tmp_path):
    # An unbiased OOF: no fold picks its weights on its own validation studies.
    from lsdc.training.engine import EngineConfig

    assert EngineConfig().keep == "last"
    cache = toy_sequence_cache(n_studies=4, size=64)
    run = tmp_path / "run"
    train_sequence(cache, run, folds=2, epochs=2, overrides=TINY)
    from safetensors.torch import load_file

    kept = load_file(run / "fold0" / "model.safetensors")
    last = load_checkpoint_state(run / "fold0" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(kept[k], last[k]) for k in kept)


def test_unknown_keep_setting_fails_before_training(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=4, size=16)
    with pytest.raises(ValueError, match="engine.keep"):
        train_sequence(
            cache, tmp_path / "run", folds=2, epochs=1, overrides=[*TINY, "engine.keep=x"]
        )
    assert not (tmp_path / "run" / "folds.csv").exists()


def test_run_folder_refuses_another_config(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=4, size=16)
    run = tmp_path / "run"
    run.mkdir()
    from lsdc.config import save_config

    save_config(SequenceTrainConfig(), run / "config.yaml")
    (run / "fold0").mkdir()
    (run / "fold0" / "result.json").write_text("{}")  # a fold finished with those settings
    with pytest.raises(ValueError, match="another configuration"):
        train_sequence(cache, run, folds=2, epochs=1, overrides=TINY)


def test_a_run_that_failed_before_training_can_be_retried_with_other_settings(
    toy_sequence_cache, tmp_path
):
    from lsdc.training.engine import resolve_run_config

    cache = toy_sequence_cache(n_studies=4, size=16)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="folds"):
        train_sequence(cache, run, folds=10, epochs=1, overrides=TINY)
    assert (run / "config.yaml").exists()  # the failed attempt left its settings
    cfg, saved = resolve_run_config(SequenceTrainConfig, run, folds=2, epochs=1)
    assert cfg.engine.folds == 2 and not saved.exists() and not (run / "folds.csv").exists()


def test_weighted_class_prior_minimises_the_weighted_log_loss():
    from lsdc.constants import SEVERITY_WEIGHTS
    from lsdc.training.engine import weighted_class_prior

    rng = np.random.default_rng(0)
    # many rows, so the prior's +1 smoothing is negligible against the perturbations below
    labels = rng.choice(3, size=(4000, 25), p=[0.75, 0.18, 0.07])
    labels[:5, 0] = -1
    q = weighted_class_prior(labels)
    np.testing.assert_allclose(q.sum(1), 1.0)
    w = np.asarray(SEVERITY_WEIGHTS)

    def loss(p, t):  # weighted log loss of a constant prediction p (3,) on target t
        y = labels[:, t][labels[:, t] >= 0]
        return float((w[y] * -np.log(p[y])).sum() / w[y].sum())

    for t in (0, 7):
        best = loss(q[t], t)
        for d in ([0.02, -0.01, -0.01], [-0.02, 0.01, 0.01], [0.0, 0.01, -0.01]):
            assert best < loss(q[t] + np.asarray(d), t)


def test_prior_init_sees_only_the_training_folds_labels(toy_sequence_cache, tmp_path):
    from lsdc.config import load_config

    cache = toy_sequence_cache(n_studies=6, size=32)
    overrides = [*TINY, "engine.epochs=1", "engine.folds=2"]
    cfg = load_config(SequenceTrainConfig, None, overrides)  # prior_init is the default
    task = sequence_task(cache, cfg)
    assert task.init_model is not None
    seen: list[np.ndarray] = []
    init = task.init_model

    def spy(model, labels):
        seen.append(labels.copy())
        init(model, labels)
        assert model.head.weight.abs().sum() == 0

    task.init_model = spy
    run = tmp_path / "run"
    run_cross_validation(run, task, cfg.engine)
    folds = pd.read_csv(run / "folds.csv")
    row = {int(s): i for i, s in enumerate(task.study_ids)}
    for k, labels in enumerate(seen):
        train = folds.loc[folds["fold"] != k, "study_id"]
        np.testing.assert_array_equal(labels, task.labels[[row[int(s)] for s in train]])
    assert len(seen) == 2
    # without the switch nothing is initialised
    plain = load_config(SequenceTrainConfig, None, [*overrides, "prior_init=false"])
    assert sequence_task(cache, plain).init_model is None


def test_channels_last_weights_save_and_load_into_a_plain_model(tmp_path):
    # Training and inference run NHWC; the saved file must not depend on the layout.
    from lsdc.models.registry import build_model
    from lsdc.training.engine import CHANNELS_LAST, load_model_weights, save_model_weights

    torch.manual_seed(0)
    kwargs = {"backbone": "resnet10t", "d_model": 32, "num_layers": 1, "dim_feedforward": 32}
    trained = build_model("sequence", **kwargs).to(memory_format=CHANNELS_LAST).eval()
    convs = [p for p in trained.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=CHANNELS_LAST) for p in convs)
    save_model_weights(trained, tmp_path / "w.safetensors")
    plain = load_model_weights(build_model("sequence", **kwargs), tmp_path / "w.safetensors")
    batch = {"images": torch.rand(2, 3, 10, 32, 32), "series_mask": torch.ones(2, 3, dtype=bool)}
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(batch)["logits"], trained(batch)["logits"])


@pytest.mark.slow
def test_weight_averaging_keeps_and_validates_the_average(toy_sequence_cache, tmp_path):
    from safetensors.torch import load_file

    cache = toy_sequence_cache(n_studies=4, size=64)
    run = tmp_path / "run"
    # One step an epoch here (2 training studies, batch 2): a 4-step time constant.
    over = [*TINY, "engine.ema_epochs=4", "engine.train_folds=[0]"]
    train_sequence(cache, run, folds=2, epochs=2, overrides=over)
    ckpt = torch.load(run / "fold0" / "checkpoints" / "last.ckpt", weights_only=True)
    average, raw = ckpt["state_dict"], ckpt["current_model_state"]
    kept = load_file(run / "fold0" / "model.safetensors")
    name = next(k for k in kept if k.endswith("weight") and kept[k].ndim > 1)
    torch.testing.assert_close(kept[name], average[f"model.{name}"].contiguous())
    assert not torch.equal(average[f"model.{name}"], raw[f"model.{name}"])
    # A rerun resumes the finished fold instead of training it again.
    mtime = (run / "fold0" / "model.safetensors").stat().st_mtime
    train_sequence(cache, run, folds=2, epochs=2, overrides=over)
    assert (run / "fold0" / "model.safetensors").stat().st_mtime == mtime


def test_weight_averaging_copies_integer_buffers_and_averages_floats():
    from torch.optim.swa_utils import AveragedModel

    from lsdc.training.engine import _ema_callback

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            # An index table, as the multitask model keeps its targets' order.
            self.register_buffer("index", torch.arange(25), persistent=False)

    ema = _ema_callback()
    ema.decay = 1 - 1 / 25  # the decay of 25 steps an epoch, which once truncated 3 to 2
    net = Net()
    avg = AveragedModel(net, use_buffers=True, **ema._kwargs)
    avg.update_parameters(net)
    with torch.no_grad():
        net.w.fill_(1.0)
    for _ in range(5):
        avg.update_parameters(net)
    torch.testing.assert_close(avg.module.index, torch.arange(25))
    torch.testing.assert_close(avg.module.w, torch.full((3,), 1 - ema.decay**5))


def test_sync_batchnorm_reaches_the_trainer_and_is_refused_on_cpu_processes(
    toy_sequence_cache, tmp_path, monkeypatch
):
    import lightning as L

    from lsdc.config import load_config

    class Built(Exception):
        pass

    seen: dict = {}

    def trainer(**kwargs):
        seen.update(kwargs)
        raise Built

    cache = toy_sequence_cache(n_studies=4, size=32)
    monkeypatch.setattr(L, "Trainer", trainer)
    on = [*TINY, "engine.sync_batchnorm=true", "engine.folds=2"]
    cfg = load_config(SequenceTrainConfig, None, on)
    with pytest.raises(Built):
        run_cross_validation(tmp_path / "run", sequence_task(cache, cfg), cfg.engine)
    assert seen["sync_batchnorm"] is True
    # torch's SyncBatchNorm fails on CPU tensors in the first step: refused before training.
    cfg = load_config(
        SequenceTrainConfig, None, [*on, "engine.accelerator=cpu", "engine.devices=2"]
    )
    with pytest.raises(ValueError, match="sync_batchnorm needs GPUs"):
        run_cross_validation(tmp_path / "cpu", sequence_task(cache, cfg), cfg.engine)
    assert not (tmp_path / "cpu").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs g++")
def test_a_compiled_model_trains_and_saves_the_same_weight_names(
    toy_sequence_cache, tmp_path, monkeypatch
):
    """engine.compile=true (torch.compile, inductor on the CPU here): one fold trains, and its
    saved weights load into a plain model."""
    # A cache of its own: inductor trusts whatever its shared cache in /tmp holds, and a compile
    # killed mid-link there (an interrupted run) leaves an empty .so that fails every later load.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from lsdc.models.registry import build_model
    from lsdc.training.engine import load_model_weights

    cache = toy_sequence_cache(n_studies=4, size=32)
    run = tmp_path / "run"
    train_sequence(
        cache, run, folds=2, epochs=1,
        overrides=[*TINY, "engine.compile=true", "engine.train_folds=[0]"],
    )  # fmt: skip
    info = json.loads((run / "run.json").read_text())
    plain = build_model(info["model_name"], **info["model_kwargs"])
    load_model_weights(plain, run / "fold0" / "model.safetensors")


def test_an_interrupted_compile_leaves_no_kernel_that_breaks_the_next(tmp_path, monkeypatch):
    from lsdc.training.engine import remove_truncated_kernels

    # A compile killed mid-link leaves an empty .so, which inductor would load ever after.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    (tmp_path / "jo").mkdir()
    empty, cut, good = tmp_path / "jo" / "a.so", tmp_path / "jo" / "b.so", tmp_path / "c.so"
    empty.write_bytes(b"")
    cut.write_bytes(b"\x7fE")
    good.write_bytes(b"\x7fELF" + bytes(60))
    (tmp_path / "kernel.py").write_text("")
    assert remove_truncated_kernels() == []  # too new: perhaps another process's, being linked
    for path in (empty, cut, good):
        os.utime(path, (time.time() - 60, time.time() - 60))
    assert sorted(remove_truncated_kernels()) == [empty, cut]
    assert good.exists() and (tmp_path / "kernel.py").exists()
    assert remove_truncated_kernels(tmp_path / "none") == []


@pytest.mark.slow
def test_folds_side_by_side_give_the_oof_of_folds_one_after_the_other(
    toy_sequence_cache, tmp_path, one_thread
):
    cache = toy_sequence_cache(n_studies=6, size=32)
    args = {"folds": 2, "epochs": 2, "overrides": TINY}
    alone = train_sequence(cache, tmp_path / "alone", **args)
    # Each fold's process enters the context and trains with the callbacks it gives.
    side = train_sequence(
        cache,
        tmp_path / "side",
        fold_workers=2,
        fold_context=_marking_context,
        **args,
    )
    marks = sorted((tmp_path / "side").glob("fold*/marked"))
    assert marks == [tmp_path / "side" / "fold0" / "marked", tmp_path / "side" / "fold1" / "marked"]
    pids = {int(m.read_text()) for m in marks}  # two processes of their own, not this one
    assert len(pids) == 2 and os.getpid() not in pids
    np.testing.assert_array_equal(side.study_ids, alone.study_ids)
    np.testing.assert_allclose(side.probs, alone.probs, atol=1e-5)
    for k in (0, 1):
        a = json.loads((tmp_path / "alone" / f"fold{k}" / "history.json").read_text())
        b = json.loads((tmp_path / "side" / f"fold{k}" / "history.json").read_text())
        assert [e["val_loss"] for e in a] == pytest.approx([e["val_loss"] for e in b], abs=1e-5)


@contextlib.contextmanager
def _marking_context():
    from lightning.pytorch.callbacks import Callback

    class Mark(Callback):
        def on_train_end(self, trainer, pl_module):
            (Path(trainer.default_root_dir) / "marked").write_text(str(os.getpid()))

    yield [Mark()]


def _fold_or_fail(out, k):
    if k == 1:
        raise ValueError("a broken fold")
    (out / f"fold{k}").write_text("trained")


def test_a_failed_fold_is_named_and_the_others_still_train(tmp_path):
    from lsdc.training.engine import _side_by_side

    with pytest.raises(RuntimeError, match=r"fold 1: ValueError: a broken fold") as err:
        _side_by_side(functools.partial(_fold_or_fail, tmp_path), [0, 1, 2], 2, tmp_path)
    assert "fold 0" not in str(err.value) and "fold 2" not in str(err.value)
    assert (tmp_path / "fold0").read_text() == (tmp_path / "fold2").read_text() == "trained"
