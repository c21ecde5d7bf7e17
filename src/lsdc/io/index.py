"""Header-only index of a whole RSNA-format dataset: one row per series with its geometry.

`index_dataset(data_dir, split=..., out=..., workers=...)` walks
`<data_dir>/<split>_images/<study_id>/<series_id>/`, reads only the headers of every file
(pixel bytes are skipped, truncation is still detected), and writes a CSV atomically plus a
`*_problems.csv` listing every bad file, unusable series and table mismatch. Series are indexed in
parallel (`lsdc.parallel.parallel_map`, with a progress bar); a bad file or series is reported,
never the end of the run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from lsdc import geometry
from lsdc.io.dicom import (
    FLAG_SKIPPED_FILES,
    SeriesReadError,
    SliceHeader,
    SliceReadError,
    check_usable,
    layout_stack,
    read_header,
    series_files,
)
from lsdc.io.study import plane_conflict, series_type_from_description
from lsdc.parallel import parallel_map

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class SeriesIndexRow:
    """One series of the index (a CSV row). Geometry is that of the majority grid."""

    study_id: int
    series_id: int
    series_type: str | None  # from the descriptions table, else a DICOM tag naming a known type
    table_description: str | None  # `<split>_series_descriptions.csv`, None when not listed
    dicom_description: str | None  # SeriesDescription tag
    orientation_label: str | None
    n_files: int
    n_slices: int  # usable slices
    rows: int | None
    cols: int | None
    row_spacing: float | None
    col_spacing: float | None
    slice_thickness: float | None
    spacing_between_slices: float | None  # measured from positions along the normal
    flags: str  # ";"-joined FLAG_* values (mixed_sizes, skipped_files, mixed_orientation, ...)
    bad_files: int
    error: str | None  # why the series is unusable, None when read_series would load it


@dataclass
class Problem:
    """A bad file, an unusable series or a table mismatch, with the path it concerns."""

    path: str
    reason: str


@dataclass
class IndexResult:
    rows: list[SeriesIndexRow]
    problems: list[Problem]
    split: str
    data_dir: Path
    seconds: float = 0.0
    out: Path | None = None
    problems_out: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)


def index_series(
    folder: Path, study_id: int, series_id: int, table_description: str | None = None
) -> tuple[SeriesIndexRow, list[Problem]]:
    """Index one series folder from headers only; never raises for bad files or series."""
    paths = series_files(folder) if folder.is_dir() else []
    headers: list[SliceHeader] = []
    skipped: list[tuple[Path, str]] = []
    for p in paths:
        try:
            headers.append(read_header(p))
        except SliceReadError as exc:
            skipped.append((p, exc.reason))
    problems = [Problem(str(p), reason) for p, reason in skipped]
    error = None
    try:
        check_usable(folder, len(paths), skipped)
    except SeriesReadError as exc:
        error = exc.reason
        problems.append(Problem(str(folder), f"unusable series: {exc.reason}"))

    descriptions = Counter(h.description for h in headers if h.description)
    dicom_description = descriptions.most_common(1)[0][0] if descriptions else None
    source = table_description if table_description is not None else dicom_description
    row = SeriesIndexRow(
        study_id=study_id,
        series_id=series_id,
        series_type=series_type_from_description(source),
        table_description=table_description,
        dicom_description=dicom_description,
        orientation_label=None,
        n_files=len(paths),
        n_slices=len(headers),
        rows=None,
        cols=None,
        row_spacing=None,
        col_spacing=None,
        slice_thickness=None,
        spacing_between_slices=None,
        flags=FLAG_SKIPPED_FILES if skipped else "",
        bad_files=len(skipped),
        error=error,
    )
    if headers:
        layout = layout_stack(headers)
        row.orientation_label = geometry.orientation_label(layout.orientation)
        row.rows, row.cols, row.row_spacing, row.col_spacing = layout.grid
        row.slice_thickness = layout.slice_thickness
        row.spacing_between_slices = layout.spacing_between_slices
        row.flags = ";".join(([row.flags] if row.flags else []) + layout.flags)
        conflict = plane_conflict(row.series_type, row.orientation_label)
        if conflict is not None:
            problems.append(Problem(str(folder), f"{SKIP_PLANE_CONFLICT}: {conflict}; not used"))
        counts = Counter(h.instance_number for h in headers)
        dup = sorted(n for n, c in counts.items() if c > 1)
        if dup:
            problems.append(
                Problem(
                    str(folder),
                    f"duplicate InstanceNumber {', '.join(map(str, dup[:10]))}"
                    f"{' ...' if len(dup) > 10 else ''}: labels on them are masked",
                )
            )
    return row, problems


def _index_item(
    item: tuple[str, int, int, str | None],
) -> tuple[SeriesIndexRow, list[Problem]]:
    # Top-level (picklable) entry point for the process pool.
    folder, study_id, series_id, description = item
    return index_series(Path(folder), study_id, series_id, description)


def _read_descriptions(
    data_dir: Path, split: str, problems: list[Problem]
) -> dict[tuple[int, int], str] | None:
    path = data_dir / f"{split}_series_descriptions.csv"
    if not path.is_file():
        return None
    from lsdc.io.tables import read_series_descriptions

    try:
        table = read_series_descriptions(path)
    except Exception as exc:  # noqa: BLE001 - a bad table is reported; DICOM tags still index
        problems.append(Problem(str(path), f"descriptions table unusable: {exc}"))
        return None
    return {
        (int(a), int(b)): str(c)
        for a, b, c in zip(
            table["study_id"], table["series_id"], table["series_description"], strict=True
        )
    }


def build_index(
    data_dir: str | Path, *, split: str = "train", workers: int = 1, progress: bool = True
) -> IndexResult:
    """Index every series of `<data_dir>/<split>_images` (headers only, in parallel)."""
    start = time.perf_counter()
    data_dir = Path(data_dir)
    images = data_dir / f"{split}_images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such folder (expected RSNA layout)")
    problems: list[Problem] = []
    descriptions = _read_descriptions(data_dir, split, problems)

    items: list[tuple[str, int, int, str | None]] = []
    seen: set[tuple[int, int]] = set()
    for study_dir in sorted(images.iterdir(), key=lambda p: p.name):
        if study_dir.name.startswith("."):
            continue
        if not study_dir.is_dir() or not study_dir.name.isdigit():
            problems.append(Problem(str(study_dir), "not a <study_id> folder"))
            continue
        series_dirs = [p for p in study_dir.iterdir() if not p.name.startswith(".")]
        if not series_dirs:
            problems.append(Problem(str(study_dir), "study has no series folder"))
        for series_dir in sorted(series_dirs, key=lambda p: p.name):
            if not series_dir.is_dir() or not series_dir.name.isdigit():
                problems.append(Problem(str(series_dir), "not a <series_id> folder"))
                continue
            key = (int(study_dir.name), int(series_dir.name))
            seen.add(key)
            desc = descriptions.get(key) if descriptions is not None else None
            items.append((str(series_dir), key[0], key[1], desc))
    if descriptions is not None:
        table = f"{split}_series_descriptions.csv"
        listed_studies = {k[0] for k in descriptions}
        for study_id in sorted({k[0] for k in seen} - listed_studies):
            problems.append(
                Problem(
                    str(images / str(study_id)),
                    f"{SKIP_UNLISTED_STUDY}: on disk but not in {table}; the sequence "
                    "pipeline and predict leave it out (multitask types its series from DICOM "
                    "tags, without labels unless train.csv has it)",
                )
            )
        for study_id, series_id in sorted(seen - set(descriptions)):
            if study_id in listed_studies:
                problems.append(
                    Problem(
                        str(images / str(study_id) / str(series_id)),
                        f"{SKIP_UNLISTED_SERIES}: the study is in {table} but this series is "
                        "not; ignored",
                    )
                )
        for study_id, series_id in sorted(set(descriptions) - seen):
            problems.append(
                Problem(
                    str(images / str(study_id) / str(series_id)),
                    "listed in the descriptions table but has no folder",
                )
            )

    rows: list[SeriesIndexRow] = []
    series_problems: list[Problem] = []
    outcomes = parallel_map(
        _index_item, items, workers=workers, desc="indexing series", progress=progress
    )
    for outcome in outcomes:
        if outcome.error is not None:  # a bug or an OS error on one series: report, go on
            series_problems.append(Problem(outcome.item[0], f"indexing failed: {outcome.error}"))
            continue
        assert outcome.result is not None
        row, row_problems = outcome.result
        rows.append(row)
        series_problems.extend(row_problems)
    # Completion order varies with workers; the outputs must not.
    rows.sort(key=lambda r: (r.study_id, r.series_id))
    problems.extend(sorted(series_problems, key=lambda p: (p.path, p.reason)))
    if split == "train":
        problems.extend(_check_labels(data_dir, rows, {k[0] for k in seen}, descriptions))
    result = IndexResult(rows=rows, problems=problems, split=split, data_dir=data_dir)
    result.seconds = time.perf_counter() - start
    result.counts = _counts(rows)
    result.counts.update(_skip_counts(problems))
    return result


# Problem reasons that mean data is silently left out downstream start with one of these, so
# the summary can count each kind (`_skip_counts`).
SKIP_UNLISTED_STUDY = "study not in descriptions table"
SKIP_UNLISTED_SERIES = "series not in descriptions table"
SKIP_PLANE_CONFLICT = "series type contradicts its orientation"
SKIP_COORD_UNKNOWN_SERIES = "coordinate on unknown series"
SKIP_COORD_OUTSIDE = "coordinate outside the image"
SKIP_LABELLED_NO_IMAGES = "labelled study without images"
SKIP_LABELLED_UNLISTED = "labelled study not in descriptions table"


def _check_labels(
    data_dir: Path,
    rows: list[SeriesIndexRow],
    on_disk: set[int],
    descriptions: dict[tuple[int, int], str] | None,
) -> list[Problem]:
    """Coordinates that training would silently drop (on a series that is not there or not
    readable, outside the image) and labelled studies that no pipeline reads, each named by
    line or study."""
    from lsdc.io.tables import read_coordinates, read_train_labels

    problems: list[Problem] = []
    labels_path = data_dir / "train.csv"
    if labels_path.is_file():
        try:
            labelled = {int(s) for s in read_train_labels(labels_path)["study_id"]}
        except Exception as exc:  # noqa: BLE001 - reported; the index itself is still useful
            problems.append(Problem(str(labels_path), f"labels table unusable: {exc}"))
            labelled = set()
        listed = {k[0] for k in descriptions} if descriptions is not None else None
        for sid in sorted(labelled):
            if sid not in on_disk:
                problems.append(
                    Problem(f"{labels_path} study {sid}", f"{SKIP_LABELLED_NO_IMAGES}: not used")
                )
            elif listed is not None and sid not in listed:
                problems.append(
                    Problem(
                        f"{labels_path} study {sid}",
                        f"{SKIP_LABELLED_UNLISTED}: the sequence pipeline leaves it out",
                    )
                )
    path = data_dir / "train_label_coordinates.csv"
    if not path.is_file():
        return problems
    try:
        coords = read_coordinates(path)
    except Exception as exc:  # noqa: BLE001 - reported; the index itself is still useful
        return [*problems, Problem(str(path), f"coordinates table unusable: {exc}")]
    grid = {
        (r.study_id, r.series_id): r
        for r in rows
        if r.error is None and r.rows is not None and r.cols is not None
    }
    for i, c in enumerate(coords.itertuples(index=False)):
        where = (
            f"{path} line {i + 2}",  # 1-based, after the header
            f"study {c.study_id} series {c.series_id} instance {c.instance_number} "
            f"{c.condition} {c.level}",
        )
        r = grid.get((int(c.study_id), int(c.series_id)))
        if r is None:
            problems.append(
                Problem(where[0], f"{SKIP_COORD_UNKNOWN_SERIES}: {where[1]}: no readable series")
            )
            continue
        if "mixed_sizes" in r.flags.split(";"):
            continue  # the majority grid is not this instance's; read_series checks it
        assert r.rows is not None and r.cols is not None
        if not (-0.5 <= c.x <= r.cols - 0.5 and -0.5 <= c.y <= r.rows - 0.5):
            problems.append(
                Problem(
                    where[0],
                    f"{SKIP_COORD_OUTSIDE}: {where[1]}: ({c.x:g}, {c.y:g}) outside the "
                    f"{r.rows}x{r.cols} image",
                )
            )
    return problems


_SKIP_KINDS = {
    "empty series folder": lambda p: p.reason == "unusable series: no files",
    "series without orientation/position/spacing": lambda p: (
        any(
            f"missing {t}" in p.reason
            for t in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
        )
        and p.reason.startswith("unusable series")
    ),
    SKIP_UNLISTED_STUDY: lambda p: p.reason.startswith(SKIP_UNLISTED_STUDY),
    SKIP_UNLISTED_SERIES: lambda p: p.reason.startswith(SKIP_UNLISTED_SERIES),
    SKIP_PLANE_CONFLICT: lambda p: p.reason.startswith(SKIP_PLANE_CONFLICT),
    SKIP_COORD_UNKNOWN_SERIES: lambda p: p.reason.startswith(SKIP_COORD_UNKNOWN_SERIES),
    SKIP_COORD_OUTSIDE: lambda p: p.reason.startswith(SKIP_COORD_OUTSIDE),
    SKIP_LABELLED_NO_IMAGES: lambda p: p.reason.startswith(SKIP_LABELLED_NO_IMAGES),
    SKIP_LABELLED_UNLISTED: lambda p: p.reason.startswith(SKIP_LABELLED_UNLISTED),
}


def _skip_counts(problems: list[Problem]) -> dict[str, int]:
    counts = {f"skip: {k}": sum(map(match, problems)) for k, match in _SKIP_KINDS.items()}
    return {k: v for k, v in counts.items() if v}


def _counts(rows: list[SeriesIndexRow]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    counts["studies"] = len({r.study_id for r in rows})
    counts["series"] = len(rows)
    counts["files"] = sum(r.n_files for r in rows)
    counts["slices"] = sum(r.n_slices for r in rows)
    counts["bad_files"] = sum(r.bad_files for r in rows)
    counts["unusable_series"] = sum(r.error is not None for r in rows)
    for r in rows:
        counts[f"type: {r.series_type or 'unknown'}"] += 1
        for flag in filter(None, r.flags.split(";")):
            counts[f"flag: {flag}"] += 1
    return dict(counts)


def index_to_frame(rows: list[SeriesIndexRow]) -> pd.DataFrame:
    """The index as a DataFrame (one row per series, columns as SeriesIndexRow)."""
    import pandas as pd

    columns = [f.name for f in fields(SeriesIndexRow)]
    frame = pd.DataFrame([asdict(r) for r in rows], columns=columns)
    for col in ("rows", "cols"):
        frame[col] = frame[col].astype("Int64")
    return frame


def write_index(result: IndexResult, out: str | Path) -> tuple[Path, Path]:
    """Write the index CSV and `<stem>_problems.csv` next to it, atomically."""
    import pandas as pd

    from lsdc.fileio import atomic_write_text, sibling_csv

    out = Path(out)
    problems_out = sibling_csv(out, "problems")
    atomic_write_text(out, index_to_frame(result.rows).to_csv(index=False, float_format="%.6g"))
    problems = pd.DataFrame([asdict(p) for p in result.problems], columns=["path", "reason"])
    atomic_write_text(problems_out, problems.to_csv(index=False))
    result.out, result.problems_out = out, problems_out
    return out, problems_out


def index_dataset(
    data_dir: str | Path,
    *,
    split: str = "train",
    out: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> IndexResult:
    """Build the index of one split and write it (default `./<split>_series_index.csv`)."""
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    result = build_index(data_dir, split=split, workers=workers, progress=progress)
    write_index(result, Path(out) if out is not None else Path(f"{split}_series_index.csv"))
    return result


def format_summary(result: IndexResult, max_problems: int = 10) -> str:
    """A short human summary of an index run."""
    c = result.counts
    rate = c.get("files", 0) / result.seconds if result.seconds > 0 else float("nan")
    lines = [
        f"{result.split}: {c.get('studies', 0)} studies, {c.get('series', 0)} series, "
        f"{c.get('files', 0)} files ({c.get('slices', 0)} usable slices) in "
        f"{result.seconds:.1f} s ({rate:.0f} files/s)",
    ]
    types = sorted((k[6:], v) for k, v in c.items() if k.startswith("type: "))
    lines.append("series types: " + ", ".join(f"{k} {v}" for k, v in types))
    flags = sorted((k[6:], v) for k, v in c.items() if k.startswith("flag: "))
    if flags:
        lines.append("flags: " + ", ".join(f"{k} {v}" for k, v in flags))
    skips = [(k[6:], v) for k, v in c.items() if k.startswith("skip: ")]
    if skips:
        lines.append("left out downstream: " + ", ".join(f"{k} {v}" for k, v in skips))
    lines.append(
        f"bad files: {c.get('bad_files', 0)}; unusable series: {c.get('unusable_series', 0)}; "
        f"problems: {len(result.problems)}"
    )
    for p in result.problems[:max_problems]:
        lines.append(f"  {p.path}: {p.reason}")
    if len(result.problems) > max_problems:
        lines.append(f"  ... {len(result.problems) - max_problems} more")
    if result.out is not None:
        lines.append(f"index: {result.out}")
        lines.append(f"problems: {result.problems_out}")
    return "\n".join(lines)


__all__ = [
    "IndexResult",
    "Problem",
    "SeriesIndexRow",
    "build_index",
    "format_summary",
    "index_dataset",
    "index_series",
    "index_to_frame",
    "write_index",
]
