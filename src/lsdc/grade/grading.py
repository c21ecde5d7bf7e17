"""`lsdc grade`: DICOM folders, files and DICOMDIRs in; per study a `grades.json`, a
`report.html` and a DICOM SR out, and a summary CSV across studies.

The studies are found and their series identified from the headers (`discover`, `identify`);
the chosen series are then laid out as the competition's folders (links, not copies) with a
descriptions table, and graded by `lsdc.pipeline.predict` itself, so a study graded here gets
exactly what `lsdc predict` gives the same series. One study that cannot be graded does not stop
the others: its folder holds `error.txt` saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsdc.constants import (
    PROB_COLUMNS,
    SEVERITIES,
    TARGETS,
    condition_from_title,
    level_from_title,
)
from lsdc.fileio import (
    atomic_write_text,
    check_output_file,
    check_output_folder,
    work_folder,
)
from lsdc.geometry import pixel_to_patient
from lsdc.grade.discover import Discovery, FoundFile, FoundSeries, FoundStudy, discover
from lsdc.grade.identify import Identification, identify_study
from lsdc.grade.results import Grade, Keypoint, SeriesUse, StudyGrades

SUMMARY_CSV = "grades.csv"
ERROR_FILE = "error.txt"


@dataclass
class StagedStudy:
    """One study laid out for `predict`: its number there, and which file each staged series
    and instance number is."""

    found: FoundStudy
    number: int
    identification: Identification
    series_of: dict[int, FoundSeries] = field(default_factory=dict)  # staged series id ->
    files: dict[tuple[int, int], FoundFile] = field(default_factory=dict)  # (series, instance)
    links: dict[Path, FoundFile] = field(default_factory=dict)  # staged link -> its file


@dataclass
class GradeReport:
    out_dir: Path
    graded: list[StudyGrades]
    failed: dict[str, str]  # StudyInstanceUID -> why
    summary: Path
    submission: Path | None
    discovery: Discovery


def _numbers(studies: Sequence[FoundStudy]) -> dict[str, int]:
    """A positive integer per study for the competition's folders: its StudyID (else PatientID)
    when that is a number no other study has, else the next free number."""
    wanted = {s.uid: s.study_id for s in studies}
    counts: dict[str, int] = {}
    for v in wanted.values():
        counts[v] = counts.get(v, 0) + 1
    out: dict[str, int] = {}
    for uid, v in wanted.items():
        if v.isdigit() and counts[v] == 1 and 0 < int(v) < 2**63:
            out[uid] = int(v)
    nxt = 1
    for s in studies:
        if s.uid not in out:
            while nxt in out.values():
                nxt += 1
            out[s.uid] = nxt
            nxt += 1
    return out


def stage(studies: Sequence[StagedStudy], root: Path) -> Path:
    """Lay the used series out as `root/test_images/<study>/<series>/<file>` (links to the
    found files, under their own names where those are unique in the series, so that what the
    readers say names the user's files; else `<k>.dcm`) with
    `root/test_series_descriptions.csv`; fills each study's maps."""
    rows = ["study_id,series_id,series_description"]
    images = root / "test_images"
    for st in studies:
        used = [c for c in st.identification.choices if c.used]
        numbers = [c.series.first.series_number for c in used]
        unique = all(n is not None and n > 0 for n in numbers) and len(set(numbers)) == len(used)
        for i, choice in enumerate(used, start=1):
            ser = int(choice.series.first.series_number) if unique else i  # type: ignore[arg-type]
            st.series_of[ser] = choice.series
            folder = images / str(st.number) / str(ser)
            folder.mkdir(parents=True, exist_ok=True)
            files = choice.series.files
            names = [f.path.name for f in files]
            # The reader takes InstanceNumber from the header, else from a numeric file name.
            own = len(set(names)) == len(names) and all(f.instance_number for f in files)
            for k, f in enumerate(files, start=1):
                link = folder / (f.path.name if own else f"{k}.dcm")
                os.symlink(f.path.resolve(), link)
                st.links[link] = f
                st.files[(ser, f.instance_number if f.instance_number is not None else k)] = f
            rows.append(f"{st.number},{ser},{choice.series_type}")
    atomic_write_text(root / "test_series_descriptions.csv", "\n".join(rows) + "\n")
    return root


def _series_uses(ident: Identification) -> list[SeriesUse]:
    return [
        SeriesUse(
            series_instance_uid=c.series.uid,
            series_number=c.series.first.series_number,
            description=c.series.first.description,
            files=len(c.series.files),
            series_type=c.series_type,
            used=c.used,
            reason=c.reason,
        )
        for c in ident.choices
    ]


def _keypoints(st: StagedStudy, coords) -> tuple[list[Keypoint], list[str]]:  # noqa: ANN001
    """The predicted points of one study on their source files, in pixels and patient mm."""
    points, problems = [], []
    for row in coords.itertuples(index=False):
        target = f"{condition_from_title(row.condition)}_{level_from_title(row.level)}"
        f = st.files.get((int(row.series_id), int(row.instance_number)))
        if f is None or f.orientation is None or f.position is None or not f.pixel_spacing:
            problems.append(f"{target}: its point has no source instance with geometry")
            continue
        mm = pixel_to_patient(row.x, row.y, f.position, f.orientation, f.pixel_spacing)
        points.append(
            Keypoint(
                target=target,
                series_instance_uid=f.series_uid,
                sop_instance_uid=f.sop_instance_uid,
                sop_class_uid=f.sop_class_uid,
                instance_number=int(row.instance_number),
                column=float(row.x),
                row=float(row.y),
                patient_mm=tuple(round(float(v), 3) for v in mm),  # type: ignore[arg-type]
                source_path=str(f.path.resolve()),
            )
        )
    order = {t: i for i, t in enumerate(TARGETS)}
    return sorted(points, key=lambda k: order[k.target]), problems


def _unstaged(text: str, st: StagedStudy, found: Discovery) -> str:
    """A warning about the staged layout, naming the user's files and series instead."""
    for link, f in st.links.items():
        text = text.replace(str(link), found.shown(f.path))
    for ser, series in st.series_of.items():
        folder = str(next(iter(st.links)).parent.parent / str(ser))
        text = text.replace(folder, f"series {series.first.description or series.uid}")
    return text


def study_folder_name(study_uid: str) -> str:
    """A folder name for a study: its UID (digits and dots) as it is, anything else made safe."""
    safe = "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in study_uid)
    return safe.strip(".") or "study"


def _summary(graded: Sequence[StudyGrades]) -> str:
    lines = ["study_instance_uid,study_id,target," + ",".join(PROB_COLUMNS) + ",severity"]
    for g in graded:
        for gr in g.grades:
            probs = ",".join(f"{p:.6f}" for p in gr.probs)
            sev = SEVERITIES[gr.severity_index]
            lines.append(f"{g.study_instance_uid},{g.study_id},{gr.target},{probs},{sev}")
    return "\n".join(lines) + "\n"


def write_study(result: StudyGrades, folder: Path, used: Sequence[FoundSeries]) -> None:
    """`grades.json`, `report.html` (with its images) and `sr.dcm` of one study; `used` are
    the series the models read, whose first instance the SR names as evidence besides the
    instances the keypoints lie on."""
    import pydicom

    from lsdc.grade.report import write_study_report
    from lsdc.grade.sr import write_sr

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR_FILE).unlink(missing_ok=True)  # an earlier run's failure, graded now
    atomic_write_text(folder / "grades.json", json.dumps(result.to_dict(), indent=1) + "\n")
    write_study_report(result, folder)
    paths = sorted({k.source_path for k in result.keypoints})
    with_points = {k.series_instance_uid for k in result.keypoints}
    paths += [str(s.first.path) for s in used if s.uid not in with_points]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    write_sr(result, sources, folder / "sr.dcm")


def grade(
    inputs: Sequence[str | Path],
    runs_dir: str | Path,
    out_dir: str | Path,
    *,
    work_dir: str | Path | None = None,
    workers: int = 1,
    device: str = "auto",
    batch_size: int = 8,
    tta_flip: bool = True,
    submission: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> GradeReport:
    """Grade every study found under `inputs` with the models of `runs_dir` into `out_dir`."""
    from lsdc.pipeline import predict

    out = Path(out_dir)
    sources = [("input", Path(p)) for p in inputs] + [("runs folder", Path(runs_dir))]
    check_output_folder(out, sources)
    if work_dir is not None:  # its caches and links must not be found as inputs next time
        check_output_folder(work_dir, sources)
    if submission is not None:
        check_output_file(submission, sources)
    found = discover(inputs, workers=workers, progress=progress)
    log(
        f"[lsdc grade] {len(found.studies)} studies, "
        f"{sum(len(s.series) for s in found.studies.values())} series found"
        + (f"; {len(found.duplicates)} duplicate files read once" if found.duplicates else "")
        + (f"; {len(found.skipped)} files skipped" if found.skipped else "")
    )
    if not found.studies:
        raise FileNotFoundError(
            "no DICOM image found under "
            + ", ".join(str(p) for p in inputs)
            + (f" ({len(found.skipped)} files were not DICOM images)" if found.skipped else "")
        )
    out.mkdir(parents=True, exist_ok=True)
    studies = sorted(found.studies.values(), key=lambda s: s.uid)
    numbers = _numbers(studies)
    failed: dict[str, str] = {}
    staged: list[StagedStudy] = []
    for s in studies:
        ident = identify_study(s)
        if not any(c.used for c in ident.choices):
            failed[s.uid] = "no series lsdc can read: " + "; ".join(
                f"{c.series.first.description or c.series.uid}: {c.reason}" for c in ident.choices
            )
            continue
        staged.append(StagedStudy(s, numbers[s.uid], ident))
    graded: list[StudyGrades] = []
    rep = None
    with contextlib.ExitStack() as stack:
        work = work_folder(stack, work_dir, "lsdc-grade-")
        if staged:
            data = work / "data"
            if data.exists():
                shutil.rmtree(data)  # the layout of an earlier run: series may have changed
            stage(staged, data)
            rep = predict(
                data,
                runs_dir,
                work / "submission.csv",
                work_dir=work / "caches",
                workers=workers,
                device=device,
                batch_size=batch_size,
                tta_flip=tta_flip,
                log=log,
                progress=progress,
            )
            import pandas as pd

            coords = (
                pd.read_csv(rep.coordinates)
                if rep.coordinates is not None
                else pd.DataFrame(columns=["study_id"])
            )
            row_of = {int(s): i for i, s in enumerate(rep.study_ids)}
            for st in staged:
                i = row_of[st.number]
                kps, problems = _keypoints(st, coords[coords["study_id"] == st.number])
                seen = [m for m, p in rep.model_probs.items() if np.isfinite(p[i]).all()]
                warnings = [
                    _unstaged(f"{w['model']}: {w['problem']}", st, found)
                    for w in rep.warnings
                    if int(w["study_id"]) == st.number
                ]
                warnings += [
                    f"no {t} series found: graded by the models that read the others"
                    for t in st.identification.missing
                ]
                warnings += found.study_warnings(st.found.uid) + problems
                result = StudyGrades(
                    study_instance_uid=st.found.uid,
                    study_id=st.found.study_id or str(st.number),
                    grades=[
                        Grade(t, *(float(v) for v in rep.probs[i, j]))
                        for j, t in enumerate(TARGETS)
                    ],
                    keypoints=kps,
                    series=_series_uses(st.identification),
                    models=seen,
                    warnings=warnings,
                )
                folder = out / study_folder_name(st.found.uid)
                try:
                    write_study(result, folder, list(st.series_of.values()))
                except Exception as exc:  # noqa: BLE001 - one study's outputs lose only it
                    why = f"{type(exc).__name__}: {exc}"
                    failed[st.found.uid] = f"writing its outputs failed: {why}"
                    continue
                graded.append(result)
            if submission is not None:
                atomic_write_text(submission, Path(rep.path).read_text())
    for uid, why in failed.items():
        folder = out / study_folder_name(uid)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / ERROR_FILE, f"study {uid} was not graded: {why}\n")
    summary = out / SUMMARY_CSV
    atomic_write_text(summary, _summary(graded))
    return GradeReport(
        out_dir=out,
        graded=graded,
        failed=failed,
        summary=summary,
        submission=Path(submission) if submission is not None and rep is not None else None,
        discovery=found,
    )
