"""Weights and runs-folder faults (issue 20, "trust nothing on disk"): a weights file that was
overwritten, holds NaN or belongs to another model is named in one line before any
preprocessing; a runs folder names no absolute path (checkpoints, fit.log, caches), so moved
elsewhere it still predicts and resumes. Most cases damage a copy of the session's one fitted
runs folder (`fitted`)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from lsdc.constants import SAGITTAL_T1
from lsdc.fileio import CorruptFileError
from lsdc.inference.submission import validate_submission_file
from lsdc.pipeline import predict

RECORD = ".sha256"  # beside each weights file: its SHA-256 at save time, as sha256sum writes it


def _quiet(_: str) -> None:
    pass


def _overwrite_middle(path: Path, size: int = 4096) -> None:
    """`size` bytes of 0xff in the middle of `path`: the damage a safetensors header misses."""
    data = bytearray(path.read_bytes())
    assert len(data) > 4 * size, "the file must be big enough to hit tensor data"
    mid = len(data) // 2
    data[mid : mid + size] = b"\xff" * size
    path.write_bytes(bytes(data))


def _predict_error(fitted: Path, runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """`lsdc predict` as a user runs it; -> its one error line, after checking that it failed
    before preprocessing anything and printed no traceback."""
    from lsdc.cli import main

    work, out = tmp_path / "work", tmp_path / "out" / "submission.csv"
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(["predict", str(fitted / "data"), "--runs", str(runs), "--out", str(out),
              "--work", str(work)])  # fmt: skip
    err = capsys.readouterr().err
    assert ended.value.code == 1, err
    assert "Traceback" not in err
    assert not work.exists() and not out.exists()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.slow
def test_overwritten_weights_fail_predict_before_preprocessing(
    runs_copy: Path, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The case that changed probabilities by up to 0.13 without a word: a valid header, 4 KB of
    # tensor data overwritten.
    runs = runs_copy
    weights = runs / "multitask" / "fold1" / "model.safetensors"
    _overwrite_middle(weights)
    line = _predict_error(fitted, runs, tmp_path, capsys)
    assert f"{weights}: SHA-256 differs from the one recorded at save time" in line


@pytest.mark.slow
def test_non_finite_weights_are_named_with_their_tensor(
    runs_copy: Path, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file, save_file

    runs = runs_copy
    weights = runs / "multitask" / "fold0" / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = math.nan
    save_file(state, str(weights))
    # A correct record: only the finiteness check can catch this file.
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.with_name(weights.name + RECORD).write_text(f"{digest}  {weights.name}\n")
    line = _predict_error(fitted, runs, tmp_path, capsys)
    assert f"{weights}: tensor {name} holds NaN or infinite values" in line


@pytest.mark.slow
def test_weights_of_another_model_are_named(
    runs_copy: Path, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The sequence model's weights, with their record, copied into a multitask fold: a
    # 312-line traceback from load_state_dict before.
    runs = runs_copy
    fold = runs / "multitask" / "fold0"
    for f in (runs / "sequence" / "fold0").glob("model.safetensors*"):
        shutil.copy(f, fold / f.name)
    line = _predict_error(fitted, runs, tmp_path, capsys)
    assert f"{fold / 'model.safetensors'}: not weights of MultitaskModel" in line
    assert "tensors missing" in line and "unexpected tensors" in line


@pytest.mark.slow
def test_weights_without_a_record_load_with_a_warning(
    runs_copy: Path, fitted: Path, tmp_path: Path
) -> None:
    # A runs folder fitted before hashes were recorded still predicts, and says it is unchecked.
    from lsdc.inference.predictor import Predictor

    runs = runs_copy
    weights = runs / "sequence" / "fold1" / "model.safetensors"
    weights.with_name(weights.name + RECORD).unlink()
    with pytest.warns(UserWarning, match=f"{weights}: no SHA-256 recorded"):
        predictor = Predictor.from_run(runs / "sequence", device="cpu")
    assert len(predictor.models) == 2


def test_super_resolution_weights_are_verified(tmp_path: Path) -> None:
    from lsdc.models.superres import SuperResolution, load_sr
    from lsdc.training.superres import save_sr

    weights = save_sr(SuperResolution(scale=2, channels=16, num_blocks=2), tmp_path)
    assert weights.with_name(weights.name + RECORD).is_file()
    load_sr(tmp_path)
    _overwrite_middle(weights, 1024)
    with pytest.raises(CorruptFileError, match=f"{weights}: SHA-256 differs"):
        load_sr(tmp_path)


def _absolute_paths(folder: Path, places: list[Path]) -> list[str]:
    """Files under `folder` whose bytes name one of `places` (as given or resolved); a
    checkpoint is a zip of pickles that stores its strings raw, so bytes show them too."""
    needles = {s.encode() for p in places for s in (str(p), os.path.realpath(p))}
    return [
        f"{path.relative_to(folder)} names {needle.decode()}"
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        for needle in needles
        if needle in path.read_bytes()
    ]


@pytest.mark.slow
def test_a_moved_runs_folder_names_no_absolute_path_and_still_predicts(
    fitted: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Everything: caches, checkpoints, fit.log.
    runs = Path(shutil.copytree(fitted / "runs", tmp_path / "elsewhere" / "runs"))
    assert list(runs.rglob("last.ckpt")), "fit keeps its resume checkpoints"
    assert _absolute_paths(runs, [fitted, tmp_path_factory.getbasetemp()]) == []
    out = tmp_path / "out" / "submission.csv"
    predict(fitted / "data", runs, out, log=_quiet, progress=False)
    assert validate_submission_file(out, fitted / "data" / "test_series_descriptions.csv") == []


@pytest.mark.slow
def test_a_moved_runs_folder_resumes_where_it_is(
    fx: ModuleType, fitted: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first = Path(shutil.copytree(fitted / "runs", tmp_path / "first"))
    fold = first / "multitask" / "fold1"
    for name in ("result.json", "oof.npz", "model.safetensors", "model.safetensors" + RECORD):
        (fold / name).unlink(missing_ok=True)  # as if killed after its last checkpoint
    runs = first.rename(tmp_path / "second")
    fx.fit_tiny(fitted / "data", runs)
    assert not first.exists()  # nothing was written where the checkpoint was made
    fold = runs / "multitask" / "fold1"
    assert (fold / "result.json").exists() and (fold / "model.safetensors").exists()
    # Lightning's resume messages in fit.log and the new checkpoints name no absolute path.
    assert "Restoring states" in (runs / "fit.log").read_text()
    assert _absolute_paths(runs, [fitted, tmp_path_factory.getbasetemp()]) == []


def test_a_checkpoint_of_an_older_lsdc_resumes_its_state_after_a_move(tmp_path: Path) -> None:
    # Lightning's own format (absolute paths): moved, its state used to be dropped with a
    # warning naming both folders, and the best score forgotten.
    import torch

    from lsdc.training.engine import _checkpoint_callback

    old, new = "/old/place/fold0/checkpoints", tmp_path / "fold0" / "checkpoints"
    state = {
        "monitor": "val_loss",
        "best_model_score": torch.tensor(0.5),
        "best_model_path": f"{old}/best.ckpt",
        "current_score": torch.tensor(0.5),
        "dirpath": old,
        "best_k_models": {f"{old}/best.ckpt": torch.tensor(0.5)},
        "kth_best_model_path": f"{old}/best.ckpt",
        "kth_value": torch.tensor(0.5),
        "last_model_path": f"{old}/last.ckpt",
    }
    callback = _checkpoint_callback(new)
    assert callback.state_key.startswith("ModelCheckpoint{")  # where older checkpoints hold it
    callback.load_state_dict(state)
    here = os.path.realpath(new)
    assert callback.best_model_score == 0.5
    assert callback.best_model_path == f"{here}/best.ckpt"
    assert callback.last_model_path == f"{here}/last.ckpt"
    assert list(callback.best_k_models) == [f"{here}/best.ckpt"]
    saved = callback.state_dict()
    assert saved["dirpath"] == "." and saved["best_model_path"] == "best.ckpt"


def test_cache_records_name_data_files_relative_to_the_data_folder(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    # A training cache lives in the runs folder: its errors, warnings and study metas named the
    # absolute paths of unreadable series.
    first, second = fx.studies(data)[:2]
    t1 = fx.series_dir(data, first, SAGITTAL_T1)
    for f in fx.dcm_files(t1):  # one series unreadable: the study is cached degraded
        f.write_bytes(b"not a dicom")
    for f in (data / "train_images" / str(second)).rglob("*.dcm"):  # none readable: failed
        f.write_bytes(b"not a dicom")
    seq, mt = fx.run_sequence(data, tmp_path / "seq"), fx.run_multitask(data, tmp_path / "mt")
    for rep in (seq, mt):
        named = f"series {t1.name}: train_images/{first}/{t1.name}: no readable slice"
        assert named in " ".join(rep.warnings[first])
        assert f": train_images/{second}/" in rep.failed[second]
    assert _absolute_paths(tmp_path / "seq", [data]) == []
    assert _absolute_paths(tmp_path / "mt", [data]) == []
