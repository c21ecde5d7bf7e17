"""Folder faults: empty, missing or extra folders and stray files are named by `lsdc index`,
counted among what is left out downstream, and reported by preprocessing; other studies go on."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pydicom

from lsdc.constants import AXIAL_T2, SAGITTAL_T1


def test_empty_series_folder(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    study = fx.studies(data)[0]
    folder = fx.series_dir(data, study, SAGITTAL_T1)
    for p in fx.dcm_files(folder):
        p.unlink()
    result = fx.index(data)
    assert fx.problems_about(result, f"{folder}: unusable series: no files")
    assert result.counts["skip: empty series folder"] == 1

    rep = fx.run_sequence(data, tmp_path / "cache")
    # Before: "0 failed" and nothing else. Now the study is cached, degraded, and says why.
    assert rep.failed == {} and rep.written == fx.studies(data)
    assert any(f"series {folder.name}" in w and "no files" in w for w in rep.warnings[study])
    assert "1 studies degraded" in rep.summary(tmp_path / "cache")
    fx.no_partial_files(tmp_path)


def test_missing_series_folder(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    study = fx.studies(data)[1]
    folder = fx.series_dir(data, study, AXIAL_T2)
    shutil.rmtree(folder)
    assert fx.problems_about(fx.index(data), f"{folder}: listed in the descriptions table")
    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    text = " ".join(rep.warnings[study])
    assert f"series {folder.name}: listed in the descriptions table but has no folder" in text
    assert f"no readable {AXIAL_T2} series" in text
    fx.no_partial_files(tmp_path)


def test_study_on_disk_but_not_in_the_descriptions_table(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    src = data / "train_images" / str(fx.studies(data)[0])
    extra = data / "train_images" / "123456"
    shutil.copytree(src, extra)
    result = fx.index(data)
    assert fx.problems_about(result, f"{extra}: study not in descriptions table")
    assert result.counts["skip: study not in descriptions table"] == 1

    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.written == fx.studies(data) and 123456 not in rep.written
    assert "not in train_series_descriptions.csv" in rep.left_out[123456]
    assert "study 123456: has images" in rep.summary(tmp_path / "cache")
    fx.no_partial_files(tmp_path)


def test_labelled_study_without_images(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    gone = fx.studies(data)[2]
    shutil.rmtree(data / "train_images" / str(gone))
    result = fx.index(data)
    assert fx.problems_about(result, f"study {gone}: labelled study without images")
    assert fx.problems_about(result, f"{gone}/")  # each listed series: "has no folder"

    rep = fx.run_sequence(data, tmp_path / "cache")
    assert f"study {gone} has no folder" in rep.failed[gone]
    assert rep.written == [s for s in fx.studies(data) if s != gone]
    assert str(gone) in (tmp_path / "cache" / "errors.jsonl").read_text()
    fx.no_partial_files(tmp_path)


def test_stray_files_and_folders(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    study = fx.studies(data)[0]
    folder = fx.series_dir(data, study, SAGITTAL_T1)
    (folder / "notes.txt").write_text("scanner notes\n")
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    (data / "train_images" / "thumbs").mkdir()
    (data / "train_images" / "README").write_text("copied from a share\n")

    result = fx.index(data)
    assert fx.problems_about(result, f"{folder / 'notes.txt'}: ")
    assert not fx.problems_about(result, ".DS_Store")
    assert fx.problems_about(result, "thumbs: not a <study_id> folder")
    assert fx.problems_about(result, "README: not a <study_id> folder")

    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    assert any("notes.txt" in w for w in rep.warnings[study])
    fx.no_partial_files(tmp_path)


def test_study_folder_without_series(fx: ModuleType, data: Path, tmp_path: Path) -> None:
    study = fx.studies(data)[1]
    folder = data / "train_images" / str(study)
    shutil.rmtree(folder)
    folder.mkdir()
    assert fx.problems_about(fx.index(data), f"{folder}: study has no series folder")
    rep = fx.run_sequence(data, tmp_path / "cache")
    assert "has no series folder" in rep.failed[study]
    assert rep.written == [s for s in fx.studies(data) if s != study]
    fx.no_partial_files(tmp_path)


def test_an_unlisted_series_never_replaces_the_listed_one(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    """Issue 20, bad 1: a blank copy of the Sagittal T1 under a new (lower) series id, not in the
    table. Before, the sequence cache took it as the study's T1 (channel 0 all zeros), silently."""
    import numpy as np

    from lsdc.preprocess.cache import StudyCache

    study = fx.studies(data)[0]
    listed = fx.series_dir(data, study, SAGITTAL_T1)
    copy = listed.parent / "1"
    shutil.copytree(listed, copy)
    for p in fx.dcm_files(copy):
        ds = pydicom.dcmread(p)
        ds.PixelData = bytes(len(ds.PixelData))
        ds.save_as(p)
    result = fx.index(data)
    assert fx.problems_about(result, f"{copy}: series not in descriptions table")
    assert result.counts["skip: series not in descriptions table"] == 1

    cache = tmp_path / "cache"
    rep = fx.run_sequence(data, cache)
    assert rep.failed == {} and rep.written == fx.studies(data)
    assert (
        "series 1: not listed in the descriptions table for this study; ignored"
        in (rep.warnings[study])
    )
    arrays, meta = StudyCache.open(cache).load(study)
    assert meta["series"][SAGITTAL_T1]["series_ids"] == [int(listed.name)]
    assert np.asarray(arrays["images"][0]).max() > 0  # the listed, not the blank, T1
    fx.no_partial_files(tmp_path)


def test_descriptions_that_contradict_the_images_are_not_used(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    """Issue 20, bad 2: the table swaps a study's Sagittal T1 and Axial T2. Before, lsdc used
    them as given (subarticular points on the sagittal series) and `index` flagged nothing."""
    import pandas as pd

    study = fx.studies(data)[1]
    t1 = int(fx.series_dir(data, study, SAGITTAL_T1).name)
    ax = int(fx.series_dir(data, study, AXIAL_T2).name)
    table = data / "train_series_descriptions.csv"
    desc = pd.read_csv(table)
    rows = desc.study_id == study
    desc.loc[rows & (desc.series_id == t1), "series_description"] = AXIAL_T2
    desc.loc[rows & (desc.series_id == ax), "series_description"] = SAGITTAL_T1
    desc.to_csv(table, index=False)

    result = fx.index(data)
    sagittal_said_axial = fx.problems_about(result, f"/{t1}: series type contradicts")
    assert sagittal_said_axial and "'Axial T2'" in sagittal_said_axial[0]
    assert "makes it sagittal" in sagittal_said_axial[0]
    assert fx.problems_about(result, f"/{ax}: series type contradicts")
    assert result.counts["skip: series type contradicts its orientation"] == 2

    for run in (fx.run_sequence, fx.run_multitask):
        rep = run(data, tmp_path / run.__name__)
        assert rep.failed == {} and study in rep.written
        text = "\n".join(rep.warnings[study])
        assert f"series {t1}: described as 'Axial T2' (an axial series)" in text
        assert f"series {ax}: described as 'Sagittal T1' (a sagittal series)" in text
        assert f"no readable {SAGITTAL_T1} series" in text
        assert f"no readable {AXIAL_T2} series" in text
    fx.no_partial_files(tmp_path)


def test_files_named_dcm_in_capitals_or_without_extension(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    """Issue 20, weak: such files were read, but predict's warnings said "no .dcm file in"."""
    from lsdc.pipeline import input_problems

    a, b, _ = fx.studies(data)
    for p in fx.dcm_files(fx.series_dir(data, a, SAGITTAL_T1)):
        p.rename(p.with_suffix(".DCM"))
    for p in fx.dcm_files(fx.series_dir(data, b, AXIAL_T2)):
        p.rename(p.with_suffix(""))
    empty = fx.series_dir(data, b, SAGITTAL_T1)
    shutil.rmtree(empty)
    empty.mkdir()
    listed, lacking = input_problems(data, "train")
    assert listed == fx.studies(data)
    assert lacking == {b: [f"{SAGITTAL_T1} series {empty.name}: no file in {empty}"]}
    rep = fx.run_sequence(data, tmp_path / "cache")
    assert rep.failed == {} and not any(SAGITTAL_T1 in w for w in rep.warnings.get(a, []))


def test_a_study_with_images_and_points_but_not_in_train_csv(
    fx: ModuleType, data: Path, tmp_path: Path
) -> None:
    """Issue 20, weak: it was cached with every label -1, without a message."""
    import pandas as pd

    from lsdc.preprocess.cache import UNLABELLED

    a, b, _ = fx.studies(data)
    labels = pd.read_csv(data / "train.csv")
    labels[labels.study_id != b].to_csv(data / "train.csv", index=False)
    for run in (fx.run_sequence, fx.run_multitask):
        rep = run(data, tmp_path / run.__name__)
        assert rep.failed == {} and b in rep.written
        assert UNLABELLED in rep.warnings[b] and UNLABELLED not in rep.warnings.get(a, [])
