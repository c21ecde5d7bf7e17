"""Finding DICOM images by content under folders, files and DICOMDIRs, grouped by study and
series, duplicates read once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lsdc.grade.discover import discover
from lsdc.io.dicomwrite import write_slice


def _slice(path: Path, study: int, series: int, inst: int) -> Path:
    return write_slice(
        path,
        np.full((8, 8), inst, np.uint16),
        study_id=study,
        series_id=series,
        instance_number=inst,
        position=(0.0, 0.0, 4.0 * inst),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(0.5, 0.5),
        slice_thickness=4.0,
        series_description="AX T2 FSE",
    )


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    # Two studies mixed in one tree, files named by UID, IM0001 or nothing.
    for inst in (3, 1, 2):
        _slice(root / "A" / "B" / f"IM000{inst}", 11, 1, inst)
    for inst in (1, 2):
        _slice(root / "A" / f"{inst}.DCM", 12, 5, inst)
    _slice(root / "C" / "x" / "noext", 12, 6, 1)
    shutil.copy(root / "A" / "B" / "IM0001", root / "C" / "copy_of_im1")  # a duplicate
    (root / "C" / "notes.txt").write_text("not an image")
    (root / "C" / "empty").write_bytes(b"")
    return root


def test_files_are_found_by_content_and_grouped(export: Path) -> None:
    found = discover([export])
    assert len(found.studies) == 2
    by_id = {s.study_id: s for s in found.studies.values()}
    assert sorted(by_id) == ["11", "12"]
    (series,) = by_id["11"].series.values()
    assert [f.instance_number for f in series.files] == [1, 2, 3]  # ordered, not by name
    assert [f.path.name for f in series.files] == ["IM0001", "IM0002", "IM0003"]
    assert sorted(len(s.files) for s in by_id["12"].series.values()) == [1, 2]
    f = series.files[0]
    assert f.description == "AX T2 FSE" and f.modality == "MR" and f.rows == 8
    assert f.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_a_duplicate_is_read_once_and_named(export: Path) -> None:
    found = discover([export])
    assert [(c.name, k.name) for c, k in found.duplicates] == [("copy_of_im1", "IM0001")]
    study = next(s for s in found.studies.values() if s.study_id == "11")
    (line,) = found.study_warnings(study.uid)
    assert (
        line.startswith("export/C/copy_of_im1: a second copy") and "from export/A/B/IM0001" in line
    )
    assert str(export) not in line  # no absolute path of this machine
    skipped = {p.name: why for p, why in found.skipped}
    assert skipped == {"notes.txt": "not DICOM", "empty": "zero-byte file"}


def test_the_same_file_given_twice_is_not_a_duplicate(export: Path) -> None:
    found = discover([export / "A", export / "A" / "1.DCM"])
    assert not found.duplicates
    assert sum(len(s.files) for st in found.studies.values() for s in st.series.values()) == 5


def test_a_bare_dataset_without_preamble_is_read(tmp_path: Path) -> None:
    src = _slice(tmp_path / "a.dcm", 3, 1, 1)
    ds = pydicom.dcmread(src)
    bare = tmp_path / "bare"
    ds.preamble = None
    del ds.file_meta  # no preamble, no meta: a bare explicit-VR little-endian dataset
    ds.save_as(bare, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    found = discover([bare])
    assert len(found.studies) == 1 and not found.skipped


def test_a_dicomdir_is_followed(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    staging = tmp_path / "staging"
    files = [_slice(staging / f"{i}.dcm", 21, 2, i) for i in (1, 2)]
    fs = FileSet()
    for p in files:
        ds = pydicom.dcmread(p)
        ds.StudyDate, ds.StudyTime, ds.PatientName = "20260101", "120000", "X"
        fs.add(ds)
    media = tmp_path / "media"
    fs.write(media)
    # Given the DICOMDIR file alone, its referenced files are found.
    found = discover([media / "DICOMDIR"])
    assert found.dicomdirs == [media / "DICOMDIR"]
    (study,) = found.studies.values()
    assert sum(len(s.files) for s in study.series.values()) == 2
    # Walking the folder finds the same files once.
    again = discover([media])
    assert not again.duplicates
    assert sum(len(s.files) for st in again.studies.values() for s in st.series.values()) == 2


def test_a_missing_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover([tmp_path / "nowhere"])
