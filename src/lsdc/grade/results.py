"""What `lsdc grade` knows about one graded study: the typed hand-off between grading, the
per-study JSON, the HTML report and the DICOM Structured Report.

Everything here is plain data (JSON-able through `to_dict` / `from_dict`); nothing reads files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lsdc.constants import PROB_COLUMNS, TARGETS

GRADES_FORMAT = 1


@dataclass(frozen=True)
class Grade:
    """The pooled probabilities of one of the 25 targets (they sum to 1)."""

    target: str  # a competition row-id suffix, e.g. "spinal_canal_stenosis_l1_l2"
    normal_mild: float
    moderate: float
    severe: float

    @property
    def probs(self) -> tuple[float, float, float]:
        return (self.normal_mild, self.moderate, self.severe)

    @property
    def severity_index(self) -> int:
        """0 Normal/Mild, 1 Moderate, 2 Severe: the most probable."""
        p = self.probs
        return max(range(3), key=p.__getitem__)


@dataclass(frozen=True)
class Keypoint:
    """Where the model placed one target: a pixel of a named source instance and the same point
    in patient coordinates (LPS mm)."""

    target: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int
    column: float  # x; pixel centres at integers (the RSNA coordinate convention)
    row: float  # y
    patient_mm: tuple[float, float, float]
    source_path: str  # the file that instance was read from


@dataclass(frozen=True)
class SeriesUse:
    """One series of the study and what grading did with it."""

    series_instance_uid: str
    series_number: int | None
    description: str
    files: int
    series_type: str | None  # the type it was identified as, None when skipped
    used: bool  # handed to the models
    reason: str  # how it was identified, or why it was skipped


@dataclass
class StudyGrades:
    """One graded study (`grades` in TARGETS order; `keypoints` only where a model placed one)."""

    study_instance_uid: str
    study_id: str  # DICOM StudyID, else PatientID, else the number lsdc gave it
    grades: list[Grade]
    keypoints: list[Keypoint] = field(default_factory=list)
    series: list[SeriesUse] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # the models that saw the study
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if [g.target for g in self.grades] != list(TARGETS):
            raise ValueError("grades must hold the 25 targets in TARGETS order")

    def grade(self, target: str) -> Grade:
        return self.grades[TARGETS.index(target)]

    def keypoint(self, target: str) -> Keypoint | None:
        return next((k for k in self.keypoints if k.target == target), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": GRADES_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyGrades:
        return cls(
            study_instance_uid=d["study_instance_uid"],
            study_id=d["study_id"],
            grades=[Grade(**{k: g[k] for k in ("target", *PROB_COLUMNS)}) for g in d["grades"]],
            keypoints=[
                Keypoint(**{**k, "patient_mm": tuple(k["patient_mm"])}) for k in d["keypoints"]
            ],
            series=[SeriesUse(**s) for s in d["series"]],
            models=list(d["models"]),
            warnings=list(d["warnings"]),
        )
