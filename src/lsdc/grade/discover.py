"""Find the DICOM images under any mix of folders, files and DICOMDIRs, and group them by study
and series: what a scanner or PACS export holds, with no table to say which file is what.

Files are DICOM by content (a Part 10 preamble, or a bare dataset pydicom reads with
`force=True` that names its SOP instance), never by name. The same SOPInstanceUID found twice is
kept once and the copy named. Nothing here reads pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from lsdc.io.dicom import (
    SliceReadError,
    is_little_endian,
    open_dicom,
    raw_free_text,
    raw_text,
    raw_ushort,
)
from lsdc.parallel import parallel_map

# Media Storage Directory Storage: a DICOMDIR.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# The header elements identification needs (read without the pixels), as tags: their raw values
# are parsed here, which costs a fraction of pydicom's keyword lookup and value conversion.
_TAGS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "Modality": 0x00080060,
    "StudyID": 0x00200010,
    "PatientID": 0x00100020,
    "SeriesNumber": 0x00200011,
    "SeriesDescription": 0x0008103E,
    "ProtocolName": 0x00181030,
    "ImageType": 0x00080008,
    "EchoTime": 0x00180081,
    "RepetitionTime": 0x00180080,
    "InversionTime": 0x00180082,
    "ScanningSequence": 0x00180020,
    "ImageOrientationPatient": 0x00200037,
    "ImagePositionPatient": 0x00200032,
    "PixelSpacing": 0x00280030,
    "InstanceNumber": 0x00200013,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
}
_FREE_TEXT = {"SeriesDescription", "ProtocolName", "StudyID", "PatientID"}


@dataclass(frozen=True)
class FoundFile:
    """The header facts of one image file that grouping and identification need."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    study_id: str
    patient_id: str
    series_number: int | None
    description: str
    protocol: str
    image_type: tuple[str, ...]
    echo_time: float | None
    repetition_time: float | None
    inversion_time: float | None
    scanning_sequence: str
    orientation: tuple[float, ...] | None  # (6,) ImageOrientationPatient
    position: tuple[float, ...] | None  # (3,) ImagePositionPatient
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    rows: int
    cols: int


@dataclass
class FoundSeries:
    uid: str
    files: list[FoundFile]

    @property
    def first(self) -> FoundFile:
        return self.files[0]


@dataclass
class FoundStudy:
    uid: str
    series: dict[str, FoundSeries]

    @property
    def study_id(self) -> str:
        """DICOM StudyID, else PatientID, else '' (the caller numbers the study)."""
        first = next(iter(self.series.values())).first
        return first.study_id or first.patient_id


@dataclass
class Discovery:
    studies: dict[str, FoundStudy] = field(default_factory=dict)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (copy, kept)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    dicomdirs: list[Path] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)  # the inputs, as given

    def shown(self, path: Path) -> str:
        """`path` as the user knows it: from the input folder that holds it (its name first), so
        reports name files without this machine's absolute paths."""
        for root in self.roots:
            base = root if root.is_dir() else root.parent
            try:
                return str(Path(base.name) / path.relative_to(base))
            except ValueError:
                continue
        return path.name

    def study_warnings(self, study_uid: str) -> list[str]:
        """The duplicates of this study's files, one line each."""
        kept = {
            f.path: f.sop_instance_uid
            for s in self.studies.get(study_uid, FoundStudy(study_uid, {})).series.values()
            for f in s.files
        }
        return [
            f"{self.shown(copy)}: a second copy of SOPInstanceUID {kept[orig]} (read once, "
            f"from {self.shown(orig)})"
            for copy, orig in self.duplicates
            if orig in kept
        ]


def _text(ds: pydicom.Dataset, name: str) -> str:
    tag = _TAGS[name]
    text = raw_free_text(ds, tag) if name in _FREE_TEXT else raw_text(ds, tag)
    return text or ""


def _float(ds: pydicom.Dataset, name: str) -> float | None:
    try:
        v = float(_text(ds, name).split("\\")[0])
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def _floats(ds: pydicom.Dataset, name: str, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in _text(ds, name).split("\\"))
    except ValueError:
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _int(ds: pydicom.Dataset, name: str) -> int | None:
    v = _float(ds, name)
    return int(v) if v is not None else None


def read_found(path: Path) -> FoundFile | str:
    """The facts of one image file, or the reason it is not one lsdc can use."""
    try:
        # The readers' own opening: a bare dataset (no preamble) is read as they read it.
        ds = open_dicom(path, stop_before_pixels=True, specific_tags=list(_TAGS.values()))
    except SliceReadError as exc:
        return "not DICOM" if isinstance(exc.__cause__, InvalidDicomError) else exc.reason
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (
        str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    )
    if sop_class == DICOMDIR_SOP_CLASS:
        return "DICOMDIR"
    missing = [
        k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _text(ds, k)
    ]
    if missing:
        return f"no {', '.join(missing)}"
    little = is_little_endian(ds)
    rows, cols = raw_ushort(ds, _TAGS["Rows"], little), raw_ushort(ds, _TAGS["Columns"], little)
    if not rows or not cols:
        return f"not an image (SOP class {sop_class or 'unknown'})"
    spacing = _floats(ds, "PixelSpacing", 2)
    return FoundFile(
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        study_id=_text(ds, "StudyID"),
        patient_id=_text(ds, "PatientID"),
        series_number=_int(ds, "SeriesNumber"),
        description=_text(ds, "SeriesDescription"),
        protocol=_text(ds, "ProtocolName"),
        image_type=tuple(t.strip().upper() for t in _text(ds, "ImageType").split("\\") if t),
        echo_time=_float(ds, "EchoTime"),
        repetition_time=_float(ds, "RepetitionTime"),
        inversion_time=_float(ds, "InversionTime"),
        scanning_sequence=_text(ds, "ScanningSequence").upper(),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=_floats(ds, "ImagePositionPatient", 3),
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        instance_number=_int(ds, "InstanceNumber"),
        rows=rows,
        cols=cols,
    )


def _walk(inputs: Sequence[Path]) -> Iterable[Path]:
    for root in inputs:
        if root.is_file():
            yield root
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such file or folder")
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    yield Path(folder) / name


def dicomdir_files(path: Path) -> list[Path]:
    """The files a DICOMDIR references (those that exist)."""
    from pydicom.fileset import FileSet

    fs = FileSet(pydicom.dcmread(path))
    return [Path(inst.path) for inst in fs if Path(inst.path).is_file()]


def _order(f: FoundFile) -> tuple:
    return (f.instance_number if f.instance_number is not None else 1 << 30, str(f.path))


def discover(
    inputs: Sequence[str | Path], *, workers: int = 1, progress: bool = False
) -> Discovery:
    """Every DICOM image under `inputs` (folders walked, DICOMDIRs followed), grouped by
    StudyInstanceUID and SeriesInstanceUID; each series' files by InstanceNumber, then path."""
    roots = [Path(p) for p in inputs]
    found = Discovery(roots=roots)
    seen_paths: set[Path] = set()
    queue = []
    for p in _walk(roots):
        key = p.resolve()
        if key not in seen_paths:
            seen_paths.add(key)
            queue.append(p)
    by_sop: dict[str, FoundFile] = {}
    pending = queue
    while pending:
        more: list[Path] = []
        outcomes = parallel_map(
            read_found, pending, workers=workers, desc="reading headers", progress=progress
        )
        results = {o.item: (o.result if o.ok else f"unreadable ({o.error})") for o in outcomes}
        for path in pending:  # input order, so that which copy is kept does not vary
            res = results[path]
            if res == "DICOMDIR":
                found.dicomdirs.append(path)
                try:
                    listed = dicomdir_files(path)
                except Exception as exc:  # noqa: BLE001 - a damaged DICOMDIR loses only itself
                    found.skipped.append((path, f"unreadable DICOMDIR ({exc})"))
                    continue
                for f in listed:
                    if f.resolve() not in seen_paths:
                        seen_paths.add(f.resolve())
                        more.append(f)
                continue
            if isinstance(res, str):
                found.skipped.append((path, res))
                continue
            if res.sop_instance_uid in by_sop:
                found.duplicates.append((path, by_sop[res.sop_instance_uid].path))
                continue
            by_sop[res.sop_instance_uid] = res
            study = found.studies.setdefault(res.study_uid, FoundStudy(res.study_uid, {}))
            study.series.setdefault(res.series_uid, FoundSeries(res.series_uid, [])).files.append(
                res
            )
        pending = more
    for study in found.studies.values():
        for series in study.series.values():
            series.files.sort(key=_order)
    return found
