"""`lsdc grade` end to end: a scanner-layout export of the phantom the shared `fitted` runs were
trained beside, graded with no table, must identify every series as the competition's tables
do and give exactly `lsdc predict`'s grades; its SR round-trips and its report's images exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsdc.cli import main
from lsdc.constants import TARGETS
from lsdc.grade.grading import ERROR_FILE, SUMMARY_CSV, grade, study_folder_name
from lsdc.grade.sr import read_sr
from lsdc.io.dicomwrite import write_slice
from lsdc.synth import generate_dataset


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `fitted` phantom's studies exported as a scanner would, plain and with a DICOMDIR."""
    root = tmp_path_factory.mktemp("grade_exports")
    same = {"train_studies": 10, "test_studies": 3, "size": 64, "seed": 3, "progress": False}
    generate_dataset(root / "plain", layout="scanner", **same)
    generate_dataset(root / "dicomdir", layout="scanner", dicomdir=True, **same)
    return root


def _quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_a_scanner_export_is_graded_as_predict_grades_the_competition_layout(
    fitted: Path, exports: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lsdc.pipeline import predict

    plain = exports / "plain" / "test_export"
    # A study lsdc cannot read (a CT localiser alone) beside the others: named, not fatal.
    write_slice(
        plain / "stray" / "ct1",
        np.zeros((8, 8), np.uint16),
        study_id=99,
        series_id=1,
        instance_number=1,
        position=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(1.0, 1.0),
        slice_thickness=1.0,
        series_description="SCOUT",
        extra={"Modality": "CT"},
    )
    out = tmp_path / "out"
    rep = grade(
        [plain], fitted / "runs", out, submission=tmp_path / "sub.csv", log=_quiet, progress=False
    )
    ref = predict(
        fitted / "data", fitted / "runs", tmp_path / "ref.csv", log=_quiet, progress=False
    )

    # Identification: every series as the competition's tables name it; the localiser skipped.
    manifest = pd.read_csv(exports / "plain" / "truth" / "test_export_manifest.csv")
    truth = dict(zip(manifest["series_instance_uid"], manifest["series_type"], strict=False))
    assert len(rep.graded) == 3
    for g in rep.graded:
        for s in g.series:
            expected = truth[s.series_instance_uid]
            if expected == "Localizer":
                assert not s.used and "localiser" in s.reason
            else:
                assert (s.series_type, s.used) == (expected, True), s.reason

    # Grades: exactly predict's on the same studies (StudyID is the competition's study id).
    mine = pd.read_csv(tmp_path / "sub.csv").sort_values("row_id").reset_index(drop=True)
    theirs = pd.read_csv(ref.path).sort_values("row_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, theirs)
    summary = pd.read_csv(out / SUMMARY_CSV)
    assert len(summary) == 25 * 3 and set(summary["target"]) == set(TARGETS)

    # The stray study's folder says why it was not graded; the duplicate file is named.
    (stray_uid,) = rep.failed
    assert "modality CT" in (out / study_folder_name(stray_uid) / ERROR_FILE).read_text()
    warnings = [w for g in rep.graded for w in g.warnings]
    assert sum("second copy of SOPInstanceUID" in w for w in warnings) == 1

    for g in rep.graded:
        folder = out / study_folder_name(g.study_instance_uid)
        saved = json.loads((folder / "grades.json").read_text())
        assert saved["study_instance_uid"] == g.study_instance_uid
        assert [x["target"] for x in saved["grades"]] == list(TARGETS)
        # The SR says what grades.json says, point for point.
        sr = read_sr(folder / "sr.dcm")
        for grade_ in g.grades:
            assert sr[grade_.target].severity_index == grade_.severity_index
            np.testing.assert_allclose(sr[grade_.target].probs, grade_.probs, atol=1e-9)
        for k in g.keypoints:
            sop, col, row = sr[k.target].point
            assert sop == k.sop_instance_uid
            np.testing.assert_allclose((col, row), (k.column, k.row), atol=1e-3)
        # Every image the page shows exists, and is named by the page.
        html = (folder / "report.html").read_text()
        images = re.findall(r'<img[^>]*src="([^"]+)"', html)
        assert images and all((folder / src).is_file() for src in images)

    # The same export behind a DICOMDIR, given as the DICOMDIR file alone, through the command
    # line: the same grades.
    args = [str(exports / "dicomdir" / "test_export" / "DICOMDIR"), "--runs", str(fitted / "runs")]
    args += ["--out", str(tmp_path / "out2"), "--submission", str(tmp_path / "sub2.csv")]
    try:
        main(["grade", *args])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    assert "3 studies graded" in out and "Sagittal T1 = " in out
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "sub2.csv").sort_values("row_id").reset_index(drop=True), mine
    )


def test_nothing_to_grade_is_said_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no DICOM image found .*1 files were not"):
        grade([tmp_path / "in"], tmp_path / "runs", tmp_path / "out", log=_quiet, progress=False)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_over_the_input_is_refused(tmp_path: Path) -> None:
    from lsdc.fileio import InputOverwriteError

    (tmp_path / "in").mkdir()
    with pytest.raises(InputOverwriteError):
        grade([tmp_path / "in"], tmp_path / "runs", tmp_path / "in" / "out", log=_quiet)
    # A work folder among the inputs would be read as part of the export next time.
    with pytest.raises(InputOverwriteError, match="work"):
        grade(
            [tmp_path / "in"],
            tmp_path / "runs",
            tmp_path / "out",
            work_dir=tmp_path / "in" / "work",
            log=_quiet,
        )


def test_staged_series_keep_their_files_names_and_warnings_name_the_users_files(
    tmp_path: Path,
) -> None:
    from lsdc.grade.discover import discover
    from lsdc.grade.grading import StagedStudy, _unstaged, stage
    from lsdc.grade.identify import identify_study

    for inst in (1, 2, 3):
        write_slice(
            tmp_path / "export" / "S1" / f"IM000{inst}",
            np.full((8, 8), inst, np.uint16),
            study_id=5,
            series_id=1,
            instance_number=inst,
            position=(0.0, 0.0, 4.0 * inst),
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            pixel_spacing=(0.5, 0.5),
            slice_thickness=4.0,
            series_description="AX T2 TSE",
        )
    found = discover([tmp_path / "export"])
    (study,) = found.studies.values()
    st = StagedStudy(study, 5, identify_study(study))
    stage([st], tmp_path / "staged")
    folder = tmp_path / "staged" / "test_images" / "5"
    (series_dir,) = folder.iterdir()
    assert sorted(p.name for p in series_dir.iterdir()) == ["IM0001", "IM0002", "IM0003"]
    said = _unstaged(f"multitask: file {series_dir / 'IM0002'} skipped (truncated)", st, found)
    assert said == "multitask: file export/S1/IM0002 skipped (truncated)"
    said = _unstaged(f"sequence: {series_dir}: unreadable", st, found)
    assert said == "sequence: series AX T2 TSE: unreadable"
