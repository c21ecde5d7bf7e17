"""Training on several processes (Lightning DDP): the OOF holds every validation study of each
fold once, in the order one process gives, and only rank 0 writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsdc.fileio import load_npz
from lsdc.training.engine import EngineConfig, is_global_zero, merge_rows, world_size

SRC = Path(__file__).resolve().parents[2] / "src"

# Appends every atomic write (the temporary file's rename) of every process to $WRITE_LOG.
_AUDIT = """
import os

_replace = os.replace


def replace(src, dst, *args, **kwargs):
    with open(os.environ["WRITE_LOG"], "a") as log:
        log.write(f"{os.getpid()} {os.fspath(dst)}\\n")
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
"""


def _rows(ids: list[int]) -> dict[str, np.ndarray]:
    ids_ = np.asarray(ids, np.int64)
    return {"study_id": ids_, "probs": ids_[:, None] * 10.0 + np.arange(3)}


def test_merge_rows_keeps_each_study_once_in_the_given_order():
    # DistributedSampler(shuffle=False) over 5 studies and 2 processes pads to 6 by repeating
    # the first: rank 0 gets positions 0, 2, 4 and rank 1 gets 1, 3, 0.
    order = [15, 11, 14, 12, 13]
    rank0 = [_rows([15, 14]), _rows([13])]
    rank1 = [_rows([11, 12]), _rows([15])]
    merged = merge_rows([*rank0, *rank1], order)
    assert merged["study_id"].tolist() == order
    np.testing.assert_array_equal(merged["probs"][:, 0], np.asarray(order) * 10.0)
    assert merge_rows([*rank1, *rank0])["study_id"].tolist() == [11, 12, 15, 14, 13]


def test_merge_rows_refuses_rows_of_other_studies():
    with pytest.raises(ValueError, match="unexpected studies, e.g. \\[99\\]"):
        merge_rows([_rows([1, 99])], [1, 2])
    with pytest.raises(ValueError, match="no rows"):
        merge_rows([], [1])


@pytest.mark.parametrize(
    ("env", "writes"),
    [
        ({}, True),  # one process, or rank 0 before Lightning's launcher starts the others
        ({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # started by Lightning in a job
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # Lightning's launcher, second node
        ({"RANK": "3", "LOCAL_RANK": "0"}, False),  # torchrun
        ({"SLURM_PROCID": "2"}, False),  # srun
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ],
)
def test_only_global_rank_zero_writes(monkeypatch, env, writes):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_global_zero() is writes


def test_world_size_counts_processes_and_refuses_device_lists():
    assert world_size(EngineConfig(devices=4, num_nodes=2)) == 8
    assert world_size(EngineConfig(devices="auto", accelerator="cpu")) == 1
    with pytest.raises(ValueError, match="engine.devices"):
        world_size(EngineConfig(devices="0,1"))


TINY = [
    "--folds",
    "2",
    "--epochs",
    "1",
    "model.backbone=test_convnext",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_layers=1",
    "model.dim_feedforward=64",
    "engine.batch_size=2",
    "engine.progress_bar=false",
    "engine.accelerator=cpu",
    "engine.devices=2",
    "engine.strategy=ddp",
]


def _launch(
    argv: list[str], tmp_path: Path, env: dict[str, str] | None = None, ok: bool = True
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python ARGV` (Lightning's launcher starts rank 1 by running it again) -> the finished
    process and the "pid path" lines of every process's writes."""
    audit = tmp_path / "audit"
    audit.mkdir(exist_ok=True)
    (audit / "sitecustomize.py").write_text(_AUDIT)
    log = tmp_path / "writes.log"
    log.unlink(missing_ok=True)
    path = [str(audit), str(SRC), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "WRITE_LOG": str(log),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, log.read_text().splitlines() if log.exists() else []


def _lsdc(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python -m lsdc ARGS` through `_launch`."""
    return _launch(["-m", "lsdc", *args], tmp_path)


@pytest.mark.slow
def test_two_processes_give_the_oof_of_every_validation_study_once(toy_sequence_cache, tmp_path):
    cache = toy_sequence_cache(n_studies=6, size=64)
    run = tmp_path / "run"
    # The OOF without the mirror view, so that each epoch's val_score (one view) is the OOF's.
    tiny = [*TINY, "engine.oof_tta_flip=false"]
    proc, writes = _lsdc(["train", "sequence", str(cache), "--out", str(run), *tiny], tmp_path)
    assert "MEMBER: 2/2" in proc.stderr  # Lightning started the second process
    assert proc.stdout.count("OOF spinal") == 1, proc.stdout  # rank 0 reports, alone

    # Each file written once, all by one process (rank 0: the one that wrote config.yaml).
    pids = {line.split(" ", 1)[0] for line in writes}
    assert len(pids) == 1, writes
    paths = Counter(Path(line.split(" ", 1)[1]).relative_to(run).as_posix() for line in writes)
    assert {p for p, n in paths.items() if n > 1} == set(), paths
    for name in ("config.yaml", "run.json", "oof.npz", "summary.json", "curves.png"):
        assert paths[name] == 1, name

    folds = pd.read_csv(run / "folds.csv")
    val = {k: g["study_id"].tolist() for k, g in folds.groupby("fold")}
    # An odd fold: the validation sampler repeats one of its studies on the second process.
    assert any(len(ids) % 2 for ids in val.values()), val
    from lsdc.metrics import score_arrays

    whole, _ = load_npz(run / "oof.npz")
    assert whole["study_ids"].tolist() == val[0] + val[1]
    for k, ids in val.items():
        arrays, _ = load_npz(run / f"fold{k}" / "oof.npz")
        assert arrays["study_ids"].tolist() == ids  # each once, in the one-process order
        assert paths[f"fold{k}/model.safetensors"] == 1
        # With keep=last after one epoch, the epoch's val_score came from the OOF's weights:
        # equal only if it was computed on the whole validation set, each study once.
        (entry,) = json.loads((run / f"fold{k}" / "history.json").read_text())
        labels = whole["labels"][np.isin(whole["study_ids"], ids)]
        score = score_arrays(labels, arrays["probs"])["score"]
        np.testing.assert_allclose(entry["val_score"], score, rtol=1e-5)
    assert json.loads((run / "summary.json").read_text())["studies"] == len(folds)

    # Resume: both processes skip fold 0 and continue fold 1 from its finished last.ckpt (one
    # on another fold would hang the run or send rows of other studies, which merge_rows
    # refuses); the OOF is the same.
    (run / "fold1" / "result.json").unlink()
    _, writes = _lsdc(["train", "sequence", str(cache), "--out", str(run), *tiny], tmp_path)
    assert not [line for line in writes if "/fold0/" in line], writes
    again, _ = load_npz(run / "oof.npz")
    np.testing.assert_array_equal(again["study_ids"], whole["study_ids"])
    np.testing.assert_allclose(again["probs"], whole["probs"], atol=1e-6)

    from lsdc.inference.predictor import Predictor

    pred = Predictor.from_run(run, device="cpu").predict_cache(cache, batch_size=2)
    assert pred.probs.shape == (len(folds), 25, 3)


# Trains the multitask model (Lightning starts rank 1 by running this file again); with
# STOP_AT_EPOCH set, both processes are interrupted, as by Ctrl-C, when a fold reaches that epoch.
_TRAIN_MULTITASK = """
import os
import sys

import lightning as L

from lsdc.training.multitask import train_multitask


class Interrupt(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if str(trainer.current_epoch) == os.environ.get("STOP_AT_EPOCH"):
            raise KeyboardInterrupt


cache, run, *overrides = sys.argv[1:]
train_multitask(cache, run, overrides=overrides, callbacks=[Interrupt()])
"""

MULTITASK_TINY = [
    "engine.folds=2",
    "engine.epochs=2",
    "model.backbone=resnet10t",
    "model.feature_dim=16",
    "model.hidden_dim=16",
    "model.window_px=8",
    # One study a batch: a process's batch then often holds no keypoint while the other's does.
    "engine.batch_size=1",
    "engine.progress_bar=false",
    "engine.accelerator=cpu",
    "engine.devices=2",
    "engine.strategy=ddp",
    # With the OOF's flip TTA (on by default) and the default heatmap head and teacher forcing.
    "engine.ema_epochs=1",
    # And the demo preset's refiner, read-again windows and jittered teacher forcing.
    "model.refine=true",
    "model.read_refined=true",
    "data.augment.teacher_end=0.5",
    "data.augment.teacher_jitter=0.5",
]


@pytest.mark.slow
def test_multitask_model_trains_and_resumes_on_two_processes(toy_multitask_cache, tmp_path):
    import torch

    from lsdc.inference.predictor import Predictor

    uncoordinated = {1001, 1004}
    cache = toy_multitask_cache(
        n_studies=6, size=32, hires=40, uncoordinated={1, 4}, absent={2: "axial_t2__l1_l2"}
    )
    run = tmp_path / "run"
    script = tmp_path / "train_multitask.py"
    script.write_text(_TRAIN_MULTITASK)
    argv = [str(script), str(cache), str(run), *MULTITASK_TINY]

    # Interrupted when fold 0 starts its second epoch: its first (every process's gradients
    # reduced at each step) is checkpointed.
    proc, _ = _launch(argv, tmp_path, env={"STOP_AT_EPOCH": "1"}, ok=False)
    output = proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode != 0 and "Detected KeyboardInterrupt" in output, output
    last = run / "fold0" / "checkpoints" / "last.ckpt"
    first = json.loads((run / "fold0" / "history.json").read_text())
    assert [h["epoch"] for h in first] == [0]
    steps = torch.load(last, weights_only=True)["global_step"]
    assert steps == 2  # 3 training studies: 2 a process (one repeated), one a batch

    proc, writes = _launch(argv, tmp_path)
    assert len({line.split(" ", 1)[0] for line in writes}) == 1, writes  # rank 0 writes alone
    hist = json.loads((run / "fold0" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[0] == first[0], "epoch 0 was trained again"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 * steps  # continued from the checkpoint
    assert "current_model_state" in ckpt  # the average rode along (engine.ema_epochs)

    folds = pd.read_csv(run / "folds.csv")
    val = {k: g["study_id"].tolist() for k, g in folds.groupby("fold")}
    # Each fold trains on a study without coordinates, and the validation sampler repeats a
    # study of an odd fold on the second process.
    assert all(not uncoordinated <= set(ids) for ids in val.values()), val
    assert any(len(ids) % 2 for ids in val.values()), val
    whole, _ = load_npz(run / "oof.npz")
    assert whole["study_ids"].tolist() == val[0] + val[1]
    assert whole["out_keypoints"].shape == (6, 25, 2)
    for k, ids in val.items():
        arrays, _ = load_npz(run / f"fold{k}" / "oof.npz")
        assert arrays["study_ids"].tolist() == ids  # each once, in the one-process order
        # The OOF (averaged weights, with the mirror view) is what one process predicts.
        fold = Predictor.from_run(run, folds=[k], device="cpu", tta_flip=True, calibrate=False)
        got = fold.predict_cache(cache, ids)
        assert got.study_ids.tolist() == ids
        np.testing.assert_allclose(got.probs, arrays["probs"], atol=1e-5)
    # Every known keypoint of the OOF once: 4 studies with coordinates, less an absent crop's 2.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["keypoint_error_mm"]["all"]["n"] == 4 * 25 - 2
