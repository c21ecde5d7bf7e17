"""Run-folder, checkpoint and prediction faults on one tiny fitted runs folder (`fitted`, fitted
once per session in conftest.py): `lsdc predict` always writes a complete, valid submission with
a warnings file naming each degraded study; a damaged runs folder is named before any
preprocessing; a damaged resume checkpoint is named and its fold trained again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from lsdc.constants import SAGITTAL_T1, SAGITTAL_T2
from lsdc.fileio import CorruptFileError
from lsdc.inference.submission import validate_submission_file
from lsdc.pipeline import predict


def _quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_predict_writes_a_complete_submission_whatever_the_inputs(
    fx: ModuleType, fitted: Path, tmp_path: Path
) -> None:
    data = Path(shutil.copytree(fitted / "data", tmp_path / "data"))
    a, b, c = fx.studies(data, "test")
    # A: one truncated file and a missing Sagittal T1 folder. B: every file garbage.
    # A study folder on disk but not in the table. C untouched.
    bad = fx.dcm_files(fx.series_dir(data, a, SAGITTAL_T2, "test"))[1]
    bad.write_bytes(bad.read_bytes()[:300])
    t1 = fx.series_dir(data, a, SAGITTAL_T1, "test")
    shutil.rmtree(t1)
    for f in (data / "test_images" / str(b)).rglob("*.dcm"):
        f.write_bytes(b"not a dicom")
    shutil.copytree(data / "test_images" / str(c), data / "test_images" / "777")

    out = tmp_path / "out" / "submission.csv"
    rep = predict(data, fitted / "runs", out, log=_quiet, progress=False)
    assert validate_submission_file(out, data / "test_series_descriptions.csv") == []
    sub = pd.read_csv(out)
    assert len(sub) == 25 * 3 and not sub.row_id.str.startswith("777_").any()
    assert rep.prior_only == [b] and rep.seen_by == {"multitask": 2, "sequence": 2}
    warned = pd.read_csv(rep.warnings_path)
    assert set(warned.study_id) == {a, b}
    text_a = " ".join(warned[warned.study_id == a].problem)
    assert bad.name in text_a and f"folder {t1} missing" in text_a
    assert "given the weighted prior" in " ".join(warned[warned.study_id == b].problem)
    fx.no_partial_files(tmp_path)


@pytest.mark.slow
def test_a_reused_work_folder_never_returns_stale_predictions(
    fx: ModuleType, fitted: Path, tmp_path: Path
) -> None:
    """Issue 20, bad 3: `predict --work W`, then one DICOM file repaired: the next predict gave
    the old probabilities and the old warning ("file 3.dcm skipped")."""
    data = Path(shutil.copytree(fitted / "data", tmp_path / "data"))
    a = fx.studies(data, "test")[0]
    bad = fx.dcm_files(fx.series_dir(data, a, SAGITTAL_T2, "test"))[1]
    good = bad.read_bytes()
    bad.write_bytes(good[:300])
    work, out = tmp_path / "work", tmp_path / "out"
    first = predict(data, fitted / "runs", out / "1.csv", work_dir=work, log=_quiet, progress=False)
    assert any(bad.name in w["problem"] for w in first.warnings if w["study_id"] == a)

    bad.write_bytes(good)  # repaired
    second = predict(
        data, fitted / "runs", out / "2.csv", work_dir=work, log=_quiet, progress=False
    )
    predict(data, fitted / "runs", out / "3.csv", log=_quiet, progress=False)
    assert not any(bad.name in w["problem"] for w in second.warnings)
    assert pd.read_csv(out / "2.csv").equals(pd.read_csv(out / "3.csv"))
    assert not pd.read_csv(out / "1.csv").equals(pd.read_csv(out / "2.csv"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    ["no_plan", "no_ensemble", "truncated_weights", "missing_fold_weights"],
)
def test_a_damaged_runs_folder_is_named_before_any_work(
    runs_copy: Path, fitted: Path, tmp_path: Path, damage: str
) -> None:
    runs = runs_copy
    weights = runs / "sequence" / "fold0" / "model.safetensors"
    expected: tuple[type[Exception], Path, str]
    if damage == "no_plan":
        (runs / "plan.json").unlink()
        expected = (FileNotFoundError, runs / "plan.json", "not a runs folder")
    elif damage == "no_ensemble":
        (runs / "ensemble.json").unlink()
        expected = (FileNotFoundError, runs / "ensemble.json", "run the same lsdc fit again")
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = (CorruptFileError, weights, "unreadable weights")
    else:
        weights.unlink()
        expected = (FileNotFoundError, weights, "fold 0 has no trained weights")
    work = tmp_path / "work"
    out = tmp_path / "out" / "submission.csv"
    with pytest.raises(expected[0]) as err:
        predict(fitted / "data", runs, out, work_dir=work, log=_quiet, progress=False)
    assert str(err.value).startswith(str(expected[1])) and expected[2] in str(err.value)
    assert not work.exists()  # failed before preprocessing anything
    assert not out.exists()


@pytest.mark.slow
def test_a_damaged_resume_checkpoint_is_named_and_its_fold_retrained(
    fx: ModuleType, fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = Path(shutil.copytree(fitted / "runs", tmp_path / "runs"))
    fold = runs / "sequence" / "fold1"
    (fold / "result.json").unlink()  # as if killed mid-fold
    (fold / "model.safetensors").unlink()
    (fold / "checkpoints").mkdir(exist_ok=True)
    last = fold / "checkpoints" / "last.ckpt"
    last.write_bytes(b"PK\x03\x04" + b"\0" * 500)
    # And a study on disk that the descriptions table does not list: fit says it left it out.
    data = Path(shutil.copytree(fitted / "data", tmp_path / "data"))
    first = sorted((data / "train_images").iterdir())[0]
    shutil.copytree(first, data / "train_images" / "555")
    capsys.readouterr()
    lines = fx.fit_tiny(data, runs)
    assert f"{last}: damaged checkpoint" in capsys.readouterr().err
    left = [x for x in lines if "studies left out (sequence_cache)" in x]
    assert left and "555 (has images but is not in train_series_descriptions.csv)" in left[0]
    assert (fold / "result.json").exists() and (fold / "model.safetensors").exists()
    # Weights are written like every other file: as the umask allows, not 0600.
    mask = os.umask(0)
    os.umask(mask)
    assert (fold / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(runs.rglob("*.tmp"))
