"""The DICOM Structured Report of one graded study, and the reader that takes it back.

`write_sr` turns a `StudyGrades` into a TID 1500 Measurement Report stored as a Comprehensive SR
instance of the graded study: one measurement group per target (25), each with the target's
finding, disc level and side, the most probable severity and the three class probabilities, and,
where a model placed a keypoint, that point on its source image. `read_sr` gives back, per
target, what a checker needs: the severity index, the probabilities and the point.

Why Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33): the report holds codes, numbers and 2-D
image points (SCOORD), all of which it carries. Comprehensive 3D SR adds only SCOORD3D, which we
do not write (switch to it if the keypoints' patient coordinates are ever added), and is a newer
class that older archives may refuse. Enhanced SR would also hold today's content (dciodvfy
accepts it too) but forbids by-reference relationships, which TID 1500 allows, so content added
later could stop fitting it.

Codes: standard ones where a source could be cited when this was written, else the private
scheme `99LSDC`, declared in the Coding Scheme Identification Sequence.
- Procedure reported: LOINC 24968-0 "MR Lumbar spine" (LOINC imaging procedure codes).
- Finding site: SNOMED CT "Level of Lx/Ly intervertebral disc" (DICOM CID 1003, Anatomical
  Reference Basis - Spine), with laterality SNOMED CT 7771000 Left / 24028007 Right (DICOM
  CID 244/247) for the sided conditions.
- Severity: concept SNOMED CT 246112005 "Severity"; values SNOMED CT 6736007 Moderate and
  24484000 Severe (DICOM CID 3716); "Normal/Mild" merges two grades and has no standard code,
  so it is private.
- The finding types (spinal canal stenosis, neural foraminal narrowing, subarticular stenosis)
  and the three probability concepts are private: no verified standard code was found for them.
- Probabilities have the UCUM unit "1" (no units, DICOM CID 7181): a probability is a pure
  number, not a ratio of two measured quantities ("{ratio}").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import lsdc
from lsdc.constants import CONDITION_SERIES, CONDITIONS, LEVELS, TARGETS
from lsdc.fileio import atomic_write_bytes
from lsdc.grade.results import Grade, Keypoint, StudyGrades
from lsdc.io.dicomwrite import deterministic_uid

PRIVATE_SCHEME = "99LSDC"

PROCEDURE_REPORTED = Code("24968-0", "LN", "MR Lumbar spine")

FINDING_TYPES: dict[str, Code] = {
    "spinal_canal_stenosis": Code("SCS", PRIVATE_SCHEME, "Spinal canal stenosis"),
    "neural_foraminal_narrowing": Code("NFN", PRIVATE_SCHEME, "Neural foraminal narrowing"),
    "subarticular_stenosis": Code("SAS", PRIVATE_SCHEME, "Subarticular stenosis"),
}

LEVEL_SITES: dict[str, Code] = {
    "l1_l2": Code("243920003", "SCT", "Level of L1/L2 intervertebral disc"),
    "l2_l3": Code("243921004", "SCT", "Level of L2/L3 intervertebral disc"),
    "l3_l4": Code("243922006", "SCT", "Level of L3/L4 intervertebral disc"),
    "l4_l5": Code("243923001", "SCT", "Level of L4/L5 intervertebral disc"),
    "l5_s1": Code("243927000", "SCT", "Level of L5/S1 intervertebral disc"),
}

LATERALITY: dict[str, Code] = {
    "left": Code("7771000", "SCT", "Left"),
    "right": Code("24028007", "SCT", "Right"),
}

SEVERITY = Code("246112005", "SCT", "Severity")
# By severity index (SEVERITIES order).
SEVERITY_VALUES: tuple[Code, ...] = (
    Code("NORMAL_MILD", PRIVATE_SCHEME, "Normal/Mild"),
    Code("6736007", "SCT", "Moderate"),
    Code("24484000", "SCT", "Severe"),
)
# By severity index, the names of the three probability measurements.
PROBABILITY_NAMES: tuple[Code, ...] = (
    Code("P_NORMAL_MILD", PRIVATE_SCHEME, "Probability of Normal/Mild"),
    Code("P_MODERATE", PRIVATE_SCHEME, "Probability of Moderate"),
    Code("P_SEVERE", PRIVATE_SCHEME, "Probability of Severe"),
)
PROBABILITY_UNIT = Code("1", "UCUM", "no units")

# lsdc (and RSNA) pixel coordinates put pixel centres at integers: (0, 0) is the centre of the
# top-left pixel. DICOM SCOORD image coordinates put (0, 0) at the top-left corner of the
# top-left pixel (PS3.3 C.18.6.1.2), so the same pixel centre is at (0.5, 0.5) there.
SCOORD_OFFSET = 0.5

# Patient and study attributes highdicom reads from the first source as attributes, which a
# scanner or phantom file may lack; all are Type 2 in the SR (present, may be empty).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED_SOURCE = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class SRFinding:
    """One target as an SR holds it."""

    target: str
    severity_index: int  # 0 Normal/Mild, 1 Moderate, 2 Severe
    probs: tuple[float, float, float]  # normal_mild, moderate, severe
    # (sop_instance_uid, column, row) in lsdc's convention (pixel centres at integers); the SR
    # stores coordinates as 32-bit floats, so they come back to that precision (~1e-5 px).
    point: tuple[str, float, float] | None


def split_target(target: str) -> tuple[str, str]:
    """`left_neural_foraminal_narrowing_l4_l5` -> (`left_neural_foraminal_narrowing`, `l4_l5`)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    level = target[-len(LEVELS[0]) :]
    return target[: -len(level) - 1], level


def _finding_and_side(condition: str) -> tuple[Code, Code | None]:
    side, _, rest = condition.partition("_")
    if side in LATERALITY:
        return FINDING_TYPES[rest], LATERALITY[side]
    return FINDING_TYPES[condition], None


def tracking_uid(study_instance_uid: str, target: str) -> str:
    """The tracking UID of `target` in an SR of the study: derived from both, so that every SR
    written for one study (a re-grade, another model) tracks the same finding with the same UID."""
    return deterministic_uid("sr-tracking", study_instance_uid, target)


def _check_sources(result: StudyGrades, sources: Sequence[Dataset]) -> dict[str, Dataset]:
    if not sources:
        raise ValueError(f"study {result.study_id}: no source headers to build the SR from")
    by_sop: dict[str, Dataset] = {}
    for i, ds in enumerate(sources):
        missing = [k for k in _REQUIRED_SOURCE if not ds.get(k)]
        if missing:
            raise ValueError(f"study {result.study_id}: source #{i} lacks {', '.join(missing)}")
        if ds.StudyInstanceUID != result.study_instance_uid:
            raise ValueError(
                f"study {result.study_id}: source {ds.SOPInstanceUID} belongs to study "
                f"{ds.StudyInstanceUID}, not the graded study {result.study_instance_uid}"
            )
        by_sop.setdefault(str(ds.SOPInstanceUID), ds)
    return by_sop


def _patient_header(first: Dataset) -> Dataset:
    """The first source's attributes without its pixels, with the Type 2 patient and study
    attributes highdicom reads present (empty where the source lacks them, as phantom files and
    some exports do). A new dataset, so that the caller's stays as it was."""
    header = Dataset({tag: elem for tag, elem in first.items() if tag < 0x7FE00000})
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _probabilities(grade: Grade, study_id: str) -> tuple[float, float, float]:
    probs = tuple(float(p) for p in grade.probs)
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs):
        raise ValueError(
            f"study {study_id}: {grade.target} has probabilities {probs} outside [0, 1]"
        )
    return probs  # type: ignore[return-value]


def _point_region(keypoint: Keypoint, source: Dataset, study_id: str) -> hd.sr.ImageRegion:
    if str(source.SeriesInstanceUID) != keypoint.series_instance_uid:
        raise ValueError(
            f"study {study_id}: keypoint of {keypoint.target} names instance "
            f"{keypoint.sop_instance_uid} in series {keypoint.series_instance_uid}, but that "
            f"instance's header is in series {source.SeriesInstanceUID}"
        )
    x, y = keypoint.column + SCOORD_OFFSET, keypoint.row + SCOORD_OFFSET
    columns, rows = source.get("Columns"), source.get("Rows")
    # A point off its image would be drawn nowhere (or somewhere wrong) by a viewer.
    if not (math.isfinite(x) and math.isfinite(y)) or (
        columns and rows and not (0.0 <= x <= columns and 0.0 <= y <= rows)
    ):
        raise ValueError(
            f"study {study_id}: keypoint of {keypoint.target} at column {keypoint.column}, row "
            f"{keypoint.row} lies outside its {columns}x{rows} image {keypoint.sop_instance_uid}"
        )
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[x, y]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _series_images(result: StudyGrades, by_sop: dict[str, Dataset]) -> dict[str, list[Dataset]]:
    """Per condition, one source instance of each used series of the type the condition is read
    on (the RSNA labelling convention): what a group without a keypoint points at."""
    first_of_series: dict[str, Dataset] = {}
    for ds in by_sop.values():
        first_of_series.setdefault(str(ds.SeriesInstanceUID), ds)
    refs: dict[str, list[Dataset]] = {}
    for condition in CONDITIONS:
        refs[condition] = [
            first_of_series[s.series_instance_uid]
            for s in result.series
            if s.used
            and s.series_type == CONDITION_SERIES[condition]
            and s.series_instance_uid in first_of_series
        ]
    return refs


def _group(
    result: StudyGrades,
    grade: Grade,
    by_sop: dict[str, Dataset],
    series_images: dict[str, list[Dataset]],
    algorithm: hd.sr.AlgorithmIdentification,
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    condition, level = split_target(grade.target)
    finding, laterality = _finding_and_side(condition)
    probs = _probabilities(grade, result.study_id)
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(result.study_instance_uid, grade.target), identifier=grade.target
        ),
        finding_type=finding,
        finding_sites=[
            hd.sr.FindingSite(anatomic_location=LEVEL_SITES[level], laterality=laterality)
        ],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=name, value=p, unit=PROBABILITY_UNIT)
            for name, p in zip(PROBABILITY_NAMES, probs, strict=True)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(SEVERITY, SEVERITY_VALUES[grade.severity_index])
        ],
    )
    keypoint = result.keypoint(grade.target)
    if keypoint is not None:
        source = by_sop.get(keypoint.sop_instance_uid)
        if source is None:
            raise ValueError(
                f"study {result.study_id}: keypoint of {grade.target} names instance "
                f"{keypoint.sop_instance_uid} ({keypoint.source_path}), whose header is not "
                "among the sources"
            )
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=_point_region(keypoint, source, result.study_id), **common
        )
    images = series_images[condition]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in images]
        or None,
        **common,
    )


def build_sr(
    result: StudyGrades,
    sources: Sequence[Dataset],
    *,
    series_number: int = 9901,
    manufacturer: str = "lsdc",
) -> hd.sr.ComprehensiveSR:
    """The SR dataset of `result` (see the module docstring); `sources` as for `write_sr`."""
    by_sop = _check_sources(result, sources)
    header = _patient_header(sources[0])
    evidence = [header, *sources[1:]]
    algorithm = hd.sr.AlgorithmIdentification(
        name="lsdc", version=lsdc.__version__, parameters=list(result.models) or None
    )
    series_images = _series_images(result, by_sop)
    groups = [_group(result, g, by_sop, series_images, algorithm) for g in result.grades]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=deterministic_uid("sr-device", manufacturer),
            name="lsdc",
            manufacturer_name=manufacturer,
            model_name="lsdc",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    return hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="lsdc",
        software_versions=lsdc.__version__,
        series_description="lsdc grades",
        # All 25 targets are in it; it stays unverified and preliminary until a reader signs it.
        is_complete=True,
        # A model's output, not a cleared product's: receivers may treat it accordingly.
        content_qualification="RESEARCH",
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="lsdc lumbar spine grading concepts",
                responsible_organization="lsdc project",
            )
        ],
    )


def write_sr(
    result: StudyGrades,
    sources: Sequence[Dataset],
    path: str | Path,
    *,
    series_number: int = 9901,
    manufacturer: str = "lsdc",
) -> Path:
    """Write the SR of one graded study to `path` (atomically) and return `path`.

    `sources`: the headers (PixelData not needed) of every instance a keypoint names plus one
    instance of each series used, all of the graded study; the first gives the patient and study
    attributes. ValueError naming the study when a source or a grade does not fit.
    """
    sr = build_sr(result, sources, series_number=series_number, manufacturer=manufacturer)
    buf = BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())


def read_sr(path: str | Path) -> dict[str, SRFinding]:
    """What an SR written by `write_sr` says about each target, by target name."""
    sr = hd.sr.srread(path)
    content = sr.content
    groups = [
        *content.get_planar_roi_measurement_groups(),
        *content.get_image_measurement_groups(),
    ]
    findings: dict[str, SRFinding] = {}
    for group in groups:
        target = group.tracking_identifier
        if target not in TARGETS:
            raise ValueError(f"{path}: measurement group with unknown target {target!r}")
        if target in findings:
            raise ValueError(f"{path}: two measurement groups for {target}")
        probs = []
        for name in PROBABILITY_NAMES:
            found = group.get_measurements(name=name)
            if len(found) != 1:
                raise ValueError(f"{path}: {target} has {len(found)} {name.meaning!r} values")
            probs.append(float(found[0].value))
        evaluations = group.get_qualitative_evaluations(name=SEVERITY)
        if len(evaluations) != 1:
            raise ValueError(f"{path}: {target} has {len(evaluations)} severity evaluations")
        severity = evaluations[0].value
        index = next(
            (
                i
                for i, code in enumerate(SEVERITY_VALUES)
                if (severity.value, severity.scheme_designator)
                == (code.value, code.scheme_designator)
            ),
            None,
        )
        if index is None:
            raise ValueError(f"{path}: {target} has unknown severity {severity.meaning!r}")
        point = None
        roi = getattr(group, "roi", None)
        if roi is not None:
            # The SCOORD's one child is the image it was SELECTED FROM.
            sop_uid = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            x, y = roi.value[0]
            point = (str(sop_uid), float(x) - SCOORD_OFFSET, float(y) - SCOORD_OFFSET)
        findings[target] = SRFinding(target, index, (probs[0], probs[1], probs[2]), point)
    return findings
