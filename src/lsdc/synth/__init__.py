"""Phantom generator: complete RSNA-format lumbar spine MRI datasets with known truth.

`generate_dataset` writes train/test DICOM studies, the competition's CSV set and `truth/`
(test labels and coordinates, one JSON line of phantom parameters per study). See DESIGN §5.

Two layouts of the same studies (same pixels, geometry and Study/Series/SOP Instance UIDs):

- `layout="competition"` (default): `{split}_images/<study_id>/<series_id>/<instance>.dcm`, the
  series typed only by `{split}_series_descriptions.csv` (SeriesDescription is the type).
- `layout="scanner"`: a hospital PACS / scanner export under `{split}_export/`, for commands
  that must find and identify series from headers alone (`synth.scanner`). Folder and file
  names vary by study (e.g. `<PatientID>/<StudyDate>_<StudyID>/SE<n>/IM0001`,
  `DICOM/<8 chars>/<8 chars>/<SOPInstanceUID>.dcm`, `.DCM` or no extension, extra levels); two
  studies of each export share a folder; vendor SeriesDescription/ProtocolName spellings
  (Siemens, GE, Philips), SeriesNumber, TR/TE/TI, ScanningSequence, ImageType; a 3-slice
  gradient-echo localiser per study; one file written twice. The CSV tables and `truth/` are
  those of the competition layout, plus `truth/{split}_export_manifest.csv`: one row per file
  (path relative to `{split}_export/`, study and competition series id, series type or
  `Localizer`, the three UIDs, duplicate 0/1, SeriesNumber, InstanceNumber).
  `dicomdir=True` also makes each export a DICOM File-set with `{split}_export/DICOMDIR`:
  pydicom's FileSet then names the files (`PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx`, the DICOM
  media File ID rules), so the drawn naming styles and the shared folder give way to its names;
  the duplicate copy stays at its drawn path, not referenced by the DICOMDIR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from lsdc.fileio import atomic_write_text
from lsdc.parallel import parallel_map
from lsdc.synth import scanner
from lsdc.synth.writer import StudyTask, make_study, write_tables

FORMAT_VERSION = 1
LAYOUTS = ("competition", "scanner")


def study_ids(seed: int, n: int) -> list[int]:
    """Unique numeric study ids (7-10 digits, like the real ones), deterministic per seed."""
    rng = np.random.default_rng([int(seed), 2**31 - 1])
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < n:
        x = int(rng.integers(1_000_000, 4_290_000_000))
        if x not in seen:
            seen.add(x)
            ids.append(x)
    return ids


_OURS = (
    "train_images",
    "test_images",
    "train_export",
    "test_export",
    ".train_export.staging",
    ".test_export.staging",
    "truth",
    "train.csv",
    "train_label_coordinates.csv",
    "train_series_descriptions.csv",
    "test_series_descriptions.csv",
    "sample_submission.csv",
    "preview.png",
)


def _prepare(out: Path) -> None:
    """Create `out`; replace a previous phantom there, never anything else.

    Stale study folders of an earlier run would otherwise mix into the new dataset.
    """
    if out.is_dir() and any(out.iterdir()):
        if not (out / "truth" / "synth.json").is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no phantom (truth/synth.json); "
                "choose an empty or new folder"
            )
        for name in _OURS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out_dir: str | Path,
    *,
    train_studies: int,
    test_studies: int,
    size: int,
    seed: int,
    workers: int = 1,
    coords_fraction: float = 0.7,
    progress: bool = True,
    axial_flip: str = "none",
    axial_slices: int = 0,
    axial_series: int = 0,
    layout: str = "competition",
    dicomdir: bool = False,
) -> Path:
    """Write a phantom dataset to `out_dir` (created) and return its path.

    `size` is the sagittal matrix in pixels (axial ~3/4 of it); 64 for tests, 256-512 for
    realism. `coords_fraction` is the share of train studies with coordinates. Same arguments ->
    byte-identical files, for any `workers`. A previous phantom in `out_dir` is replaced; any
    other non-empty folder raises FileExistsError. Raises RuntimeError naming the studies that
    failed (after every other study is written). `axial_flip` ("none", "rows", "cols", "both")
    stores every axial series with its row direction toward patient right and/or its column
    direction toward anterior: the same phantom, mirrored in its axial images. `axial_slices`
    (> 0: every axial series one stack of that many slices) and `axial_series` (1 or 2 axial
    series in every study) make real-size axial stacks for memory and speed tests; 0 keeps the
    drawn protocol. `layout` "scanner" writes each split as a PACS export with a manifest of
    its files (`dicomdir` adds a DICOMDIR; see the package docstring) instead of
    `{split}_images/`; the tables and `truth/` stay the same.
    """
    from lsdc.synth.acquire import AXIAL_FLIPS

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dicomdir and layout != "scanner":
        raise ValueError("dicomdir needs layout='scanner' (the competition layout has none)")
    if axial_flip not in AXIAL_FLIPS:
        raise ValueError(f"axial_flip must be one of {AXIAL_FLIPS}, got {axial_flip!r}")
    if axial_slices < 0 or axial_slices in (1, 2):
        raise ValueError(f"axial_slices must be 0 (drawn) or >= 3, got {axial_slices}")
    if axial_series not in (0, 1, 2):
        raise ValueError(f"axial_series must be 0 (drawn), 1 or 2, got {axial_series}")
    if train_studies < 0 or test_studies < 0 or train_studies + test_studies == 0:
        raise ValueError("need at least one study (train_studies + test_studies > 0)")
    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    if not 0.0 <= coords_fraction <= 1.0:
        raise ValueError(f"coords_fraction must be in [0, 1], got {coords_fraction}")
    out = Path(out_dir)
    _prepare(out)
    n = train_studies + test_studies
    ids = study_ids(seed, n)
    tasks = []
    is_scanner = layout == "scanner"
    # Scanner layout: which two studies of each export share a folder, which writes a duplicate.
    plans = {
        "train": scanner.plan_export(seed, train_studies, 0),
        "test": scanner.plan_export(seed, test_studies, 1),
    }
    for i in range(n):
        split = "train" if i < train_studies else "test"
        coin = np.random.default_rng([int(seed), i, 6]).random()
        mixed, dup = plans[split]
        k = i if split == "train" else i - train_studies  # position in its split
        tasks.append(
            StudyTask(
                str(out),
                int(seed),
                i,
                ids[i],
                split,
                int(size),
                bool(coin < coords_fraction),
                axial_flip,
                int(axial_slices),
                int(axial_series),
                layout,
                mixed.get(k, "") if is_scanner else "",
                is_scanner and k == dup,
            )
        )
    results, failures = [], []
    for outcome in parallel_map(
        make_study, tasks, workers=workers, desc="synth studies", progress=progress
    ):
        if outcome.ok:
            results.append(outcome.result)
        else:
            failures.append(
                f"study {outcome.item.study_id} (index {outcome.item.index}): {outcome.error}"
            )
    if failures:
        raise RuntimeError(f"{len(failures)} phantom studies failed:\n" + "\n".join(failures))
    write_tables(out, results)
    if is_scanner:
        for code, split in enumerate(("train", "test")):
            rows = [
                row
                for r in sorted(results, key=lambda r: r["index"])
                if r["split"] == split
                for row in r["export"]
            ]
            if dicomdir and rows:
                from lsdc.io.dicomwrite import deterministic_uid

                uid = deterministic_uid("fileset", seed, code)
                rows = scanner.to_file_set(out / f"{split}_export", rows, uid)
            paths = [r["path"] for r in rows]
            if len(set(paths)) != len(paths):
                clash = sorted({p for p in paths if paths.count(p) > 1})
                raise RuntimeError(f"{split}_export: files named twice: {clash[:5]}")
            atomic_write_text(
                out / "truth" / f"{split}_export_manifest.csv", scanner.manifest_csv(rows)
            )
    atomic_write_text(
        out / "truth" / "synth.json",
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "train_studies": train_studies,
                "test_studies": test_studies,
                "size": size,
                "seed": seed,
                "coords_fraction": coords_fraction,
                **({"axial_flip": axial_flip} if axial_flip != "none" else {}),
                **({"axial_slices": axial_slices} if axial_slices else {}),
                **({"axial_series": axial_series} if axial_series else {}),
                **({"layout": layout} if layout != "competition" else {}),
                **({"dicomdir": True} if dicomdir else {}),
            },
            indent=2,
            sort_keys=True,
        )
        + "\n",
    )
    return out


__all__ = ["generate_dataset", "study_ids"]
