"""Cache and submission faults: a damaged cache file is named and rebuilt, a cache of other
settings is refused with a message saying what to do, and `validate-submission` names the line
and column of every problem (rows rounded to 4 decimals are warnings, not errors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from lsdc.fileio import load_npz
from lsdc.inference.submission import build_submission, validate_submission_file
from lsdc.preprocess.cache import CacheMismatchError, StudyCache


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "garbage"])
def test_a_damaged_cache_file_is_named_and_rebuilt(
    fx: ModuleType,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    cache = tmp_path / "cache"
    first = fx.run_sequence(data, cache)
    study = first.written[0]
    path = cache / f"{study}.npz"
    before = load_npz(path)[0]["images"]
    blob = path.read_bytes()
    path.write_bytes(
        {"truncated": blob[: len(blob) // 2], "zero_bytes": b"", "garbage": b"PK" + blob[-99:]}[
            damage
        ]
    )
    again = fx.run_sequence(data, cache)
    assert str(path) in capsys.readouterr().err
    assert study in again.repaired and again.written == [study]
    assert sorted(again.skipped) == [s for s in first.written if s != study]
    np.testing.assert_array_equal(load_npz(path)[0]["images"], before)
    fx.no_partial_files(tmp_path)


@pytest.mark.parametrize("pipeline", ["sequence", "multitask"])
def test_a_cache_follows_its_inputs(
    fx: ModuleType,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pipeline: str,
) -> None:
    """Issue 20, bad 3: a reused cache (`--work`) returned stale entries, with their stale
    warnings, after a file was repaired or the folder pointed at other data under the same ids.
    Each entry now records its inputs' fingerprint and is built again when they change."""
    run = fx.run_sequence if pipeline == "sequence" else fx.run_multitask
    cache = tmp_path / "cache"
    a, b, c = fx.studies(data)
    broken = fx.dcm_files(fx.series_dir(data, a, "Sagittal T2/STIR"))[1]
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 2])
    first = run(data, cache)
    assert any(broken.name in w for w in first.warnings[a])

    broken.write_bytes(good)  # repaired
    again = run(data, cache)
    assert again.changed == [a] and again.written == [a]
    assert sorted(again.skipped) == [b, c]
    assert f"study {a}'s files or table rows changed" in capsys.readouterr().err
    assert a not in again.warnings and a not in StudyCache.open(cache).warnings()

    # Files of study b written again (other data copied over under the same ids: new mtimes),
    # and one label of study c edited; study a stays cached.
    for f in (data / "train_images" / str(b)).rglob("*.dcm"):
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    edited = pd.read_csv(data / "train.csv")
    row, col = edited.index[edited.study_id == c][0], edited.columns[1]
    edited.loc[row, col] = "Severe" if edited.loc[row, col] != "Severe" else "Moderate"
    edited.to_csv(data / "train.csv", index=False)
    third = run(data, cache)
    assert third.changed == [b, c] and third.skipped == [a]
    fx.no_partial_files(tmp_path)


def test_a_cache_of_other_settings_is_refused(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    from lsdc.preprocess.sequence import preprocess_dataset

    cache = tmp_path / "cache"
    fx.run_sequence(data, cache)
    with pytest.raises(CacheMismatchError) as err:
        preprocess_dataset(data, cache, overrides=["size=40", "num_slices=4"], progress=False)
    assert str(cache / "manifest.json") in str(err.value)
    assert "use another cache folder or delete this one" in str(err.value)


def test_a_cache_of_an_older_format_is_refused(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fx.run_multitask(data, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["config"]["format"] = 2  # what a cache made before the axial-frame fix says
    manifest["config_hash"] = "0123456789abcdef"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="manifest.json: holds pipeline 'multitask'"):
        fx.run_multitask(data, cache)


def test_stray_files_in_a_cache_are_ignored(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    from lsdc.preprocess.cache import StudyCache

    cache = tmp_path / "cache"
    rep = fx.run_sequence(data, cache)
    (cache / "notes.npz").write_bytes(b"not a study")
    (cache / "README").write_text("made on Tuesday\n")
    assert StudyCache.open(cache).study_ids() == rep.written


def _submission(data: Path, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    ids = fx_test_studies(data)
    probs = np.tile(np.array([0.7, 0.2, 0.1]), (len(ids), 25, 1))
    return data / "test_series_descriptions.csv", build_submission(ids, probs)


def fx_test_studies(data: Path) -> list[int]:
    desc = pd.read_csv(data / "test_series_descriptions.csv")
    return sorted(int(s) for s in desc.study_id.unique())


SUBMISSION_FAULTS = {
    # change, text every problem list must contain
    "missing_rows": (lambda s: s.drop(index=range(3, 8)), ": 5 rows missing"),
    "nan": (lambda s: s.assign(moderate=s.moderate.where(s.index != 4, np.nan)), "line 6"),
    "not_summing_to_one": (lambda s: s.assign(severe=s.severe.where(s.index != 9, 0.5)), "line 11"),
    "negative": (lambda s: s.assign(severe=s.severe.where(s.index != 2, -0.1)), "line 4"),
    "unknown_study": (
        lambda s: pd.concat(
            [s, s.iloc[[0]].assign(row_id="42_spinal_canal_stenosis_l1_l2")], ignore_index=True
        ),
        "42",
    ),
    "duplicate_row": (
        lambda s: pd.concat([s, s.iloc[[7]]], ignore_index=True),
        "repeated row id",
    ),
    "bad_row_id": (lambda s: s.assign(row_id=s.row_id.where(s.index != 1, "../x")), "../x"),
}


@pytest.mark.parametrize("kind", sorted(SUBMISSION_FAULTS))
def test_validate_submission_names_each_problem(data: Path, tmp_path: Path, kind: str) -> None:
    desc, sub = _submission(data, tmp_path)
    change, text = SUBMISSION_FAULTS[kind]
    path = tmp_path / "submission.csv"
    change(sub).to_csv(path, index=False)
    problems = validate_submission_file(path, desc)
    assert problems and any(text in p for p in problems), problems


def test_rows_rounded_to_four_decimals_are_warnings(data: Path, tmp_path: Path) -> None:
    desc, sub = _submission(data, tmp_path)
    sub[["normal_mild", "moderate", "severe"]] = [0.3333, 0.3333, 0.3333]
    path = tmp_path / "submission.csv"
    sub.to_csv(path, index=False)
    warnings: list[str] = []
    assert validate_submission_file(path, desc, warnings) == []
    assert warnings
