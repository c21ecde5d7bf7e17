"""A study: its series grouped by type.

`load_study(data_dir, study_id)` reads `<data_dir>/<split>_images/<study_id>/<series_id>/*.dcm`.
Series types come from the series-descriptions table (passed as a mapping). When the table lists
the study, only the series it lists are read: another series folder (a copy, a localiser) is
named in `Study.ignored` and never used. A study the table does not list at all has its series
typed from their DICOM SeriesDescription tag when that names a known type, otherwise kept with
`series_type=None`. The images are the truth for the plane: a series whose
ImageOrientationPatient contradicts its type (a "Sagittal T1" that is axial) is named in
`Study.ignored` and not used, since its contrast cannot be told from its geometry. One unreadable
series is recorded in `Study.errors`; it never ends the study.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsdc.constants import SERIES_TYPES
from lsdc.io.dicom import FLAG_DUPLICATE_POSITIONS, Series, SeriesReadError, read_series


class StudyReadError(Exception):
    """A study folder that cannot be read at all (missing, or holds no series folder)."""

    def __init__(self, folder: Path | str, reason: str):
        self.folder = Path(folder)
        self.reason = reason
        super().__init__(f"{self.folder}: {reason}")


@dataclass
class Study:
    """All readable series of one study. Several series may share a type; a type may be absent."""

    study_id: int
    series: list[Series] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # series that could not be read, with reason
    # Series found but not used (unlisted, or a plane contradicting the type): id -> why.
    ignored: dict[int, str] = field(default_factory=dict)

    def of_type(self, series_type: str) -> list[Series]:
        return [s for s in self.series if s.series_type == series_type]

    def first_of_type(self, series_type: str) -> Series | None:
        found = self.of_type(series_type)
        return found[0] if found else None

    def by_id(self, series_id: int) -> Series:
        """The series with this id; KeyError if absent (or unreadable)."""
        for s in self.series:
            if s.series_id == int(series_id):
                return s
        raise KeyError(f"series {series_id} not in study {self.study_id}")

    @property
    def series_types(self) -> dict[int, str | None]:
        """series_id -> series type (None when unknown)."""
        return {s.series_id: s.series_type for s in self.series}


def study_warnings(study: Study, descriptions: Mapping[int, str] | None = None) -> list[str]:
    """Why a study is degraded, one line each: a series folder that could not be read, a listed
    series without folder, a series ignored (unlisted, plane contradicting its type, blank), an
    unreadable file left out of a series, a series of one slice or with slices sharing a
    position, a series of no known type (not used), a series type it lacks."""
    out = [f"series {e}" for e in study.errors]
    out += [f"series {k}: {why}" for k, why in sorted(study.ignored.items())]
    read = {s.series_id for s in study.series} | set(study.ignored)
    failed = {e.split(":", 1)[0] for e in study.errors}
    for sid in sorted(descriptions or {}):
        if sid not in read and str(sid) not in failed:
            out.append(f"series {sid}: listed in the descriptions table but has no folder")
    for s in study.series:
        for path, reason in s.skipped_files:
            out.append(f"series {s.series_id}: file {Path(path).name} skipped ({reason})")
        if s.num_slices == 1:
            out.append(f"series {s.series_id}: a single slice; its neighbours are repeats of it")
        elif FLAG_DUPLICATE_POSITIONS in s.flags:
            out.append(_shared_positions(s))
        if s.series_type not in SERIES_TYPES:
            out.append(
                f"series {s.series_id}: no known series type (not in the descriptions table, "
                f"SeriesDescription {s.description!r}); not used"
            )
    have = {s.series_type for s in study.series}
    out += [f"no readable {t} series" for t in SERIES_TYPES if t not in have]
    return out


def _shared_positions(series: Series) -> str:
    o = np.asarray(series.orientation, np.float64)
    along = np.round(np.asarray(series.positions) @ np.cross(o[:3], o[3:]), 2)
    distinct = len(np.unique(along))
    if distinct == 1:
        return (
            f"series {series.series_id}: all {series.num_slices} slices share one position "
            "(ImagePositionPatient); their order across the stack is unknown"
        )
    return (
        f"series {series.series_id}: {series.num_slices} slices on only {distinct} positions "
        "(ImagePositionPatient); slices at one position are kept in InstanceNumber order"
    )


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


_KNOWN_TYPES = {_squash(t): t for t in SERIES_TYPES}


def plane_of_type(series_type: str) -> str:
    """The plane a known series type is acquired in: "sagittal" or "axial"."""
    return series_type.split()[0].lower()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plane_conflict(series_type: str | None, orientation_label: str | None) -> str | None:
    """Why a series' type contradicts the plane its ImageOrientationPatient gives (None when
    they agree, or when either is unknown)."""
    if series_type not in SERIES_TYPES or orientation_label is None:
        return None
    expected = plane_of_type(series_type)
    if orientation_label == expected:
        return None
    return (
        f"described as {series_type!r} ({_article(expected)} {expected} series) but its "
        f"ImageOrientationPatient makes it {orientation_label}"
    )


def series_type_from_description(description: str | None) -> str | None:
    """The known series type a description names ("Sagittal T2/STIR", "sagittal t2 stir", ...),
    ignoring case, spaces and punctuation; None when it names none."""
    if not description:
        return None
    return _KNOWN_TYPES.get(_squash(description))


def study_folder(data_dir: str | Path, study_id: int, split: str = "train") -> Path:
    """`<data_dir>/<split>_images/<study_id>`."""
    return Path(data_dir) / f"{split}_images" / str(int(study_id))


def load_study(
    data_dir: str | Path,
    study_id: int,
    *,
    split: str = "train",
    descriptions: Mapping[int, str] | None = None,
) -> Study:
    """Read every series of one study (series folders in numeric order).

    `descriptions` maps series_id -> series type (from `<split>_series_descriptions.csv`).
    StudyReadError when the study folder is missing or holds no series folder; a series that
    cannot be read is listed in `Study.errors` as "<series_id>: <reason>".
    """
    folder = study_folder(data_dir, study_id, split)
    if not folder.is_dir():
        raise StudyReadError(folder, f"study {study_id} has no folder")
    series_dirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not series_dirs:
        raise StudyReadError(folder, f"study {study_id} has no series folder")
    # Numeric folders in numeric order; anything else sorts last and is reported below.
    series_dirs.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    descriptions = descriptions or {}

    study = Study(study_id=int(study_id))
    for sd in series_dirs:
        if not sd.name.isdigit():
            study.errors.append(f"{sd.name}: series folder name is not an integer id ({sd})")
            continue
        series_id = int(sd.name)
        table_type = descriptions.get(series_id)
        if descriptions and table_type is None:
            # A blank copy or a localiser beside the listed series must not stand in for one.
            study.ignored[series_id] = (
                "not listed in the descriptions table for this study; ignored"
            )
            continue
        try:
            series = read_series(sd, study_id=int(study_id), series_id=series_id)
        except SeriesReadError as exc:
            study.errors.append(f"{series_id}: {exc}")
            continue
        # The table types a listed series; the DICOM tag only types the series of a study the
        # table does not list.
        source = table_type if table_type is not None else series.description
        series_type = series_type_from_description(source)
        conflict = plane_conflict(series_type, series.orientation_label)
        if conflict is not None:
            said = "the descriptions table" if table_type is not None else "its SeriesDescription"
            study.ignored[series_id] = f"{conflict} ({said}); not used"
            continue
        if float(series.volume.min()) == float(series.volume.max()):
            study.ignored[series_id] = (
                f"every pixel of its {series.num_slices} slices is "
                f"{float(series.volume.min()):g} (a blank series); not used"
            )
            continue
        series.series_type = series_type
        study.series.append(series)
    return study


def _split_tables(split: str) -> tuple[str, ...]:
    own = f"{split}_series_descriptions.csv"
    return ("train.csv", "train_label_coordinates.csv", own) if split == "train" else (own,)


@functools.lru_cache(maxsize=8)
def _rows_by_study(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    """study id -> a hash of its rows in the CSV at `path` (keyed on size and mtime, so an
    edited table is read again). A table without a study_id column hashes whole, under "*"."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if "study_id" not in header:
            return {"*": hashlib.sha256(fh.read().encode()).hexdigest()}
        col = header.index("study_id")
        rows: dict[str, list[str]] = {}
        for record in reader:
            if len(record) > col:
                rows.setdefault(record[col].strip(), []).append("\x1f".join(record))
    return {k: hashlib.sha256("\n".join(v).encode()).hexdigest() for k, v in rows.items()}


def input_fingerprint(data_dir: str | Path, study_id: int, split: str = "train") -> str:
    """A hash of everything a study's cache entry is made from: each file under its folder
    (path relative to the folder, size, mtime) and its rows in the split's tables. A repaired
    file, a file added or removed, data swapped under the same ids, or an edited label changes
    it. Stat, not content: bench/bench_fingerprint.py measures both against reading the study."""
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    folder = study_folder(data_dir, study_id, split)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:  # vanished or unreadable: the build will name it
                continue
            rel = path.relative_to(folder).as_posix()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for name in _split_tables(split):
        table = data_dir / name
        try:
            st = table.stat()
        except OSError:
            continue
        rows = _rows_by_study(str(table), st.st_size, st.st_mtime_ns)
        h.update(f"{name}\0{rows.get(str(int(study_id)), rows.get('*', ''))}\n".encode())
    return h.hexdigest()[:16]
