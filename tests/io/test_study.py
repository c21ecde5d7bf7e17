"""load_study: grouping by type, descriptions from the table or the DICOM tag, bad series."""

from __future__ import annotations

import numpy as np
import pytest

from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from lsdc.io.study import (
    StudyReadError,
    load_study,
    series_type_from_description,
    study_warnings,
)


def _write_study(root, dicomfx, study_id=42):
    images = root / "train_images"
    dicomfx.write_series(images, study_id=study_id, series_id=101, description="Sagittal T1", n=3)
    dicomfx.write_series(
        images, study_id=study_id, series_id=102, description="SAG T2 whatever", n=3
    )
    for sid, z0 in [(201, 0.0), (202, 60.0)]:  # two Axial T2 series
        dicomfx.write_series(
            images,
            study_id=study_id,
            series_id=sid,
            orientation=dicomfx.AXIAL,
            origin=(0.0, 0.0, z0),
            description=None,
            n=4,
        )
    dicomfx.write_series(
        images, study_id=study_id, series_id=301, orientation=dicomfx.CORONAL, description=None
    )
    return images / str(study_id)


def test_load_study_groups_series_by_type(tmp_path, dicomfx):
    _write_study(tmp_path, dicomfx)
    descriptions = {101: SAGITTAL_T1, 102: SAGITTAL_T2, 201: AXIAL_T2, 202: AXIAL_T2}
    study = load_study(tmp_path, 42, descriptions=descriptions)
    assert study.study_id == 42 and study.errors == []
    assert [s.series_id for s in study.series] == [101, 102, 201, 202]
    assert [s.series_id for s in study.of_type(AXIAL_T2)] == [201, 202]
    assert study.first_of_type(SAGITTAL_T2).series_id == 102  # the table wins over the tag
    assert all(s.study_id == 42 for s in study.series)
    # The table lists the study, so its other series folder is named and never read.
    assert list(study.ignored) == [301] and "not listed" in study.ignored[301]
    assert "series 301: not listed in the descriptions table" in "\n".join(
        study_warnings(study, descriptions)
    )


def test_an_unlisted_copy_never_stands_in_for_a_listed_series(tmp_path, dicomfx):
    """Fault: a blank copy of the Sagittal T1 under a new series id (listed studies only use
    their listed series; before, the copy, first in folder order, was the study's T1)."""
    images = _write_study(tmp_path, dicomfx)
    dicomfx.write_series(images.parent, study_id=42, series_id=100, description="Sagittal T1", n=3)
    study = load_study(tmp_path, 42, descriptions={101: SAGITTAL_T1, 201: AXIAL_T2})
    assert study.first_of_type(SAGITTAL_T1).series_id == 101
    assert set(study.ignored) == {100, 102, 202, 301}


def test_a_type_contradicting_the_geometry_is_not_used(tmp_path, dicomfx):
    """Fault: the table swaps a Sagittal T1 and an Axial T2. Each series' plane comes from
    ImageOrientationPatient; a contradicted series is named with both readings and not used."""
    _write_study(tmp_path, dicomfx)
    descriptions = {101: AXIAL_T2, 102: SAGITTAL_T2, 201: SAGITTAL_T1, 202: AXIAL_T2}
    study = load_study(tmp_path, 42, descriptions=descriptions)
    assert [s.series_id for s in study.series] == [102, 202]
    assert "'Axial T2' (an axial series)" in study.ignored[101]
    assert "makes it sagittal" in study.ignored[101] and "descriptions table" in study.ignored[101]
    assert "'Sagittal T1' (a sagittal series)" in study.ignored[201]
    assert "makes it axial" in study.ignored[201]
    warnings = study_warnings(study, descriptions)
    assert "no readable Sagittal T1 series" in warnings
    assert not any("has no folder" in w for w in warnings)  # ignored is not missing


def test_single_slice_shared_positions_and_blank_series_are_named(tmp_path, dicomfx):
    images = tmp_path / "train_images"
    dicomfx.write_series(images, study_id=5, series_id=1, description="Sagittal T1", n=1)
    dicomfx.write_series(
        images, study_id=5, series_id=2, description="Sagittal T2/STIR", n=3, step=0.0
    )
    dicomfx.write_series(images, study_id=5, series_id=3, orientation=dicomfx.AXIAL, n=3, fill=0)
    descriptions = {1: SAGITTAL_T1, 2: SAGITTAL_T2, 3: AXIAL_T2}
    study = load_study(tmp_path, 5, descriptions=descriptions)
    assert [s.series_id for s in study.series] == [1, 2]
    warnings = study_warnings(study, descriptions)
    assert "series 1: a single slice; its neighbours are repeats of it" in warnings
    assert any(w.startswith("series 2: all 3 slices share one position") for w in warnings)
    assert any(w.startswith("series 3: every pixel of its 3 slices is 0") for w in warnings)
    assert "no readable Axial T2 series" in warnings


def test_a_study_the_table_does_not_list_is_typed_from_dicom_tags_else_unknown(tmp_path, dicomfx):
    _write_study(tmp_path, dicomfx)
    study = load_study(tmp_path, 42, descriptions=None)
    assert study.by_id(101).series_type == SAGITTAL_T1  # from the DICOM SeriesDescription tag
    assert study.by_id(102).series_type is None  # tag names no known type
    assert study.by_id(102).description == "SAG T2 whatever"
    assert study.by_id(102).orientation_label == "sagittal"
    assert study.by_id(202).series_type is None and study.by_id(202).orientation_label == "axial"
    assert study.first_of_type(SAGITTAL_T2) is None  # a type may be missing
    assert study.by_id(301).series_type is None
    assert study.by_id(301).orientation_label == "coronal"


def test_unreadable_series_recorded_not_fatal(tmp_path, dicomfx):
    folder = _write_study(tmp_path, dicomfx)
    broken = folder / "999"
    broken.mkdir()
    (broken / "1.dcm").write_bytes(b"")
    (folder / "notes").mkdir()
    study = load_study(tmp_path, 42)
    assert [s.series_id for s in study.series] == [101, 102, 201, 202, 301]
    assert len(study.errors) == 2
    assert study.errors[0].startswith("999: ") and "zero-byte" in study.errors[0]
    assert str(broken) in study.errors[0]
    assert study.errors[1].startswith("notes: ")
    with pytest.raises(KeyError):
        study.by_id(999)


def test_missing_study_raises_naming_folder(tmp_path, dicomfx):
    with pytest.raises(StudyReadError, match="train_images/7"):
        load_study(tmp_path, 7)
    (tmp_path / "test_images" / "8").mkdir(parents=True)
    with pytest.raises(StudyReadError, match="no series folder"):
        load_study(tmp_path, 8, split="test")


def test_test_split(tmp_path, dicomfx):
    dicomfx.write_series(tmp_path / "test_images", study_id=5, series_id=6, n=2)
    study = load_study(tmp_path, 5, split="test", descriptions={6: SAGITTAL_T1})
    assert study.first_of_type(SAGITTAL_T1).num_slices == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sagittal T1", SAGITTAL_T1),
        ("sagittal t2/stir", SAGITTAL_T2),
        (" Sagittal T2 STIR ", SAGITTAL_T2),
        ("AXIAL_T2", AXIAL_T2),
        ("Axial T1", None),
        ("", None),
        (None, None),
    ],
)
def test_series_type_from_description(text, expected):
    assert series_type_from_description(text) == expected


@pytest.mark.slow
def test_phantom_sagittal_labels_project_onto_labelled_axial_slices(tmp_path):
    # End to end on the phantom: read every study, map each Sagittal T2 spinal-canal point
    # (native pixel -> volume -> patient mm) onto the Axial T2 series that carries the same
    # level's subarticular labels; it must land on (or next to) that labelled slice, between the
    # left and right points.
    from lsdc import geometry
    from lsdc.io.tables import read_coordinates, read_series_descriptions
    from lsdc.synth import generate_dataset

    root = generate_dataset(
        tmp_path / "ph", train_studies=4, test_studies=1, size=64, seed=0, progress=False
    )
    coords = read_coordinates(root / "train_label_coordinates.csv")
    table = read_series_descriptions(root / "train_series_descriptions.csv")
    checked, exact = 0, 0
    for study_id, rows in coords.groupby("study_id"):
        mine = table[table.study_id == study_id]
        study = load_study(
            root,
            int(study_id),
            descriptions=dict(zip(mine.series_id, mine.series_description, strict=True)),
        )
        assert study.errors == []
        for _, level in rows.groupby("level"):
            spinal = level[level.condition == "spinal_canal_stenosis"]
            sub = level[level.condition.str.endswith("subarticular_stenosis")]
            if spinal.empty or sub.empty:
                continue
            src = study.by_id(int(spinal.series_id.iloc[0]))
            i = src.slice_index(int(spinal.instance_number.iloc[0]))
            col, row = src.native_to_volume(i, spinal.x.iloc[0], spinal.y.iloc[0])
            axial = study.by_id(int(sub.series_id.iloc[0]))
            hit = geometry.project_point(src, i, col, row, axial)
            labelled = axial.slice_index(int(sub.instance_number.iloc[0]))
            assert hit.inside and abs(hit.slice_index - labelled) <= 1
            exact += hit.slice_index == labelled
            # Within 3 px of the left/right midpoint (the canal lies between the recesses).
            mid = sub[["x", "y"]].mean().to_numpy()
            assert np.hypot(hit.col - mid[0], hit.row - mid[1]) < 3.0
            checked += 1
    assert checked >= 5 and exact >= 0.7 * checked
